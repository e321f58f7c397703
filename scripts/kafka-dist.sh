#!/usr/bin/env bash
# Assembles an Apache Kafka server distribution archive from Maven Central (no hand downloads):
#   dist/kafka/kafka_2.13-$KAFKA_VERSION.tgz and its .sha512.
# The jars come from `mvn dependency:copy-dependencies`; bin/ and config/ are kepler-log's own.
# Also fetches the Prometheus JMX exporter java agent (the kafka role's broker metrics) into
#   dist/kafka/jmx_prometheus_javaagent-$JMX_EXPORTER_VERSION.jar (+ .sha256).
# Does nothing when the archive already exists and its checksum matches.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
KAFKA_VERSION=${KAFKA_VERSION:-4.3.1}
name="kafka_2.13-$KAFKA_VERSION"
out="$root/dist/kafka"
archive="$out/$name.tgz"
mkdir -p "$out"
JMX_EXPORTER_VERSION=${JMX_EXPORTER_VERSION:-1.0.1}
jmx="$out/jmx_prometheus_javaagent-$JMX_EXPORTER_VERSION.jar"
if [[ ! -f "$jmx" ]] || ! (cd "$out" && sha256sum -c --status "$(basename "$jmx").sha256" 2>/dev/null); then
  command -v mvn >/dev/null || { echo "kafka-dist: mvn is required (apt-get install maven)" >&2; exit 1; }
  mvn -q -B -f "$here/kafka-dist/pom.xml" dependency:copy \
    -Dartifact="io.prometheus.jmx:jmx_prometheus_javaagent:$JMX_EXPORTER_VERSION" -DoutputDirectory="$out"
  (cd "$out" && sha256sum "$(basename "$jmx")" > "$(basename "$jmx").sha256")
  echo "kafka-dist: fetched $(basename "$jmx")"
fi
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
