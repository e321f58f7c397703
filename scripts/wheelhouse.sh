#!/usr/bin/env bash
# Builds dist/wheelhouse: the keplerlog wheel and every wheel it depends on, built on the host
# so that images and hosts install them offline (`pip install --no-index --find-links`).
# Containers cannot reach the package index over TLS here, and offline installs are reproducible.
# The keplerlog wheel is rebuilt only when its sources change, and reproducibly
# (SOURCE_DATE_EPOCH): an unchanged wheelhouse keeps images and hosts unchanged (idempotence).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/files/python-agent"
out="$root/dist/wheelhouse"
pip="${PIP:-$root/.venv/bin/pip}"
mkdir -p "$out"
inputs=$(cd "$src" && find pyproject.toml keplerlog -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' \) \
  -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$out/.inputs" 2>/dev/null)" == "$inputs" ]] && compgen -G "$out/keplerlog-*.whl" >/dev/null; then
  echo "wheelhouse: up to date ($(ls "$out"/*.whl | wc -l) wheels in $out)"
  exit 0
fi
rm -f "$out"/keplerlog-*.whl "$out/.inputs"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# Build from a copy so that no build/ or egg-info lands in the source tree.
cp -r "$src/pyproject.toml" "$src/keplerlog" "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
# With the librdkafka extra: images carry both of the agent's Kafka clients (kafka.client).
SOURCE_DATE_EPOCH=1577836800 "$pip" wheel -q --no-build-isolation --wheel-dir "$out" "$build[librdkafka]" 2>/dev/null \
  || SOURCE_DATE_EPOCH=1577836800 "$pip" wheel -q --wheel-dir "$out" "$build[librdkafka]"
echo "$inputs" > "$out/.inputs"
echo "wheelhouse: $(ls "$out"/*.whl | wc -l) wheels in $out"
