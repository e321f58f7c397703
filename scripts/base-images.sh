#!/usr/bin/env bash
# Builds kepler-log's local base images without pulling anything from a registry:
#   keplerlog/debian:12          Debian 12 minbase + python3, from a debootstrap root file system
#   keplerlog/debian-systemd:12  the same with systemd as PID 1, for Molecule hosts
# Skips an image that already exists (FORCE=1 rebuilds). DEBIAN_MIRROR overrides the mirror,
# which is otherwise read from this host's apt sources.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BASE_IMAGE=${BASE_IMAGE:-keplerlog/debian:12}
SYSTEMD_IMAGE=${SYSTEMD_IMAGE:-keplerlog/debian-systemd:12}
SUITE=${DEBIAN_SUITE:-bookworm}
FORCE=${FORCE:-0}

have() { [[ "$FORCE" != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }

if have "$BASE_IMAGE"; then
  echo "base-images: $BASE_IMAGE exists"
else
  mirror=$("$here/debian-mirror.sh")
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "base-images: debootstrap $SUITE from $mirror"
  debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # Keep images small and apt quiet inside containers.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$rootfs/etc/apt/apt.conf.d/90keplerlog"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  echo "base-images: imported $BASE_IMAGE"
fi

if have "$SYSTEMD_IMAGE"; then
  echo "base-images: $SYSTEMD_IMAGE exists"
else
  docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$SYSTEMD_IMAGE" \
    -f "$here/images/systemd.Dockerfile" "$here/images" >/dev/null
  echo "base-images: built $SYSTEMD_IMAGE"
fi
