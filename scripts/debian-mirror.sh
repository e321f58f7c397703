#!/usr/bin/env bash
# Prints the Debian mirror this host's apt uses (deb822 .sources first, then sources.list).
# DEBIAN_MIRROR overrides it. The repository never names a mirror itself.
set -euo pipefail
if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
  echo "$DEBIAN_MIRROR"
  exit 0
fi
mirror=""
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
if [[ -z "$mirror" ]]; then
  echo "debian-mirror: cannot find a Debian mirror in apt sources; set DEBIAN_MIRROR" >&2
  exit 1
fi
echo "$mirror"
