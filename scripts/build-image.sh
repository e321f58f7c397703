#!/usr/bin/env bash
# Builds the service image of one module: keplerlog/{MODULE}:latest and keplerlog/{MODULE}:{VERSION}.
#
#   scripts/build-image.sh MODULE [docker build options...]      (make image MODULE=portal)
#
# MODULE is a directory under files/modules/ (with start.sh, stop.sh and module.env giving
# SERVICE_NAME and MODULE_VERSION). Steps: refresh dist/wheelhouse (scripts/wheelhouse.sh), assemble
# the build context in build/image/MODULE/ (image/ = files/image, wheelhouse/, MODULE/ = the module
# package), then `docker build -f image/Dockerfile` -- the same layout and Dockerfile that
# roles/service_image uses on docker hosts. Only apt inside the build needs the network.
#
# Environment:
#   BASE_IMAGE       base image (default keplerlog/debian:12; `make base-images`)
#   IMAGE_REPO       repository prefix (default keplerlog)
#   IMAGE_VERSION    version tag (default MODULE_VERSION from module.env)
#   SKIP_WHEELHOUSE  1 = use dist/wheelhouse as it is (default: rebuild it first)
# Prints the image reference on the last line of stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
module=${1:-}
if [[ -z "$module" || "$module" == -* ]]; then
  echo "usage: $0 MODULE [docker build options...]  (modules: $(find "$root/files/modules" -mindepth 1 -maxdepth 1 -type d ! -name '_*' -printf '%f ' | sort))" >&2
  exit 2
fi
shift
src="$root/files/modules/$module"
if [[ ! -x "$src/start.sh" || ! -f "$src/module.env" ]]; then
  echo "build-image: $src is not a module package (needs start.sh and module.env)" >&2
  exit 2
fi
SERVICE_NAME=""
MODULE_VERSION=""
# shellcheck disable=SC1091
. "$src/module.env"
: "${SERVICE_NAME:?module.env must set SERVICE_NAME}"
repo=${IMAGE_REPO:-keplerlog}
version=${IMAGE_VERSION:-${MODULE_VERSION:-dev}}
base=${BASE_IMAGE:-keplerlog/debian:12}

if [[ "${SKIP_WHEELHOUSE:-0}" != 1 ]]; then
  "$root/scripts/wheelhouse.sh"
fi
if ! ls "$root"/dist/wheelhouse/keplerlog-*.whl >/dev/null 2>&1; then
  echo "build-image: no keplerlog wheel in dist/wheelhouse (run scripts/wheelhouse.sh)" >&2
  exit 1
fi

ctx="$root/build/image/$module"
rm -rf "$ctx"
mkdir -p "$ctx"
cp -a "$root/files/image" "$ctx/image"
cp -a "$root/dist/wheelhouse" "$ctx/wheelhouse"
# -L: the demo modules link their shared start.sh, stop.sh and program; the image gets copies.
cp -aL "$src" "$ctx/$module"
find "$ctx" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +

echo "build-image: building $repo/$module:$version (service $SERVICE_NAME, base $base)"
# The engine here has no buildx: use the classic builder explicitly.
DOCKER_BUILDKIT=0 docker build \
  -f "$ctx/image/Dockerfile" \
  --build-arg "BASE_IMAGE=$base" \
  --build-arg "MODULE_NAME=$module" \
  --build-arg "PACKAGE_NAME=$module" \
  --build-arg "SERVICE_NAME=$SERVICE_NAME" \
  --build-arg "IMAGE_VERSION=$version" \
  -t "$repo/$module:$version" -t "$repo/$module:latest" \
  "$@" "$ctx"
echo "$repo/$module:$version"
