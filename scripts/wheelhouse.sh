#!/usr/bin/env bash
# Builds dist/wheelhouse: the keplerlog wheel and every wheel it depends on, built on the host
# so that images and hosts install them offline (`pip install --no-index --find-links`).
# Containers cannot reach the package index over TLS here, and offline installs are reproducible.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/dist/wheelhouse"
pip="${PIP:-$root/.venv/bin/pip}"
mkdir -p "$out"
rm -f "$out"/keplerlog-*.whl
"$pip" wheel -q --wheel-dir "$out" "$root/files/python-agent"
echo "wheelhouse: $(ls "$out" | wc -l) wheels in $out"
