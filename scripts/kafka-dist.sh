#!/usr/bin/env bash
# Assembles an Apache Kafka server distribution archive from Maven Central (no hand downloads):
#   dist/kafka/kafka_2.13-$KAFKA_VERSION.tgz and its .sha512.
# The jars come from `mvn dependency:copy-dependencies`; bin/ and config/ are kepler-log's own.
# Does nothing when the archive already exists and its checksum matches.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
KAFKA_VERSION=${KAFKA_VERSION:-4.3.1}
name="kafka_2.13-$KAFKA_VERSION"
out="$root/dist/kafka"
archive="$out/$name.tgz"
mkdir -p "$out"
# The archive is rebuilt when its inputs (pom, launcher, config, version) change.
inputs=$( (echo "$KAFKA_VERSION"; cd "$here/kafka-dist" && find . -type f | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)
if [[ -f "$archive" && -f "$archive.sha512" && "$(cat "$archive.inputs" 2>/dev/null)" == "$inputs" ]] \
    && (cd "$out" && sha512sum -c --status "$name.tgz.sha512"); then
  echo "kafka-dist: $archive is up to date"
  exit 0
fi
command -v mvn >/dev/null || { echo "kafka-dist: mvn is required (apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null || { echo "kafka-dist: java is required (apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/$name/libs"
mvn -q -B -f "$here/kafka-dist/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$work/$name/libs"
cp -r "$here/kafka-dist/bin" "$here/kafka-dist/config" "$work/$name/"
echo "$KAFKA_VERSION" > "$work/$name/VERSION"
# Reproducible archive: fixed order, owner and mtime.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2020-01-01 00:00Z' \
  -C "$work" -cf - "$name" | gzip -n > "$archive.tmp"
mv "$archive.tmp" "$archive"
(cd "$out" && sha512sum "$name.tgz" > "$name.tgz.sha512")
echo "$inputs" > "$archive.inputs"
echo "kafka-dist: built $archive ($(du -h "$archive" | cut -f1)), sha512 $(cut -c1-16 "$archive.sha512")..."
