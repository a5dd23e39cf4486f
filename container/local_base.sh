#!/usr/bin/env bash
# Build a local base image for the Dockerfile where Docker Hub cannot be reached (this project's CI, an offline build
# host): a minimal Debian made with debootstrap from the Debian mirror, Python in a virtual environment on PATH, and
# a CPU torch wheel. The image has no CUDA: it is for building and testing the image, not for GPU training.
#
#   container/local_base.sh [--tag TAG] [--torch PIP_REQUIREMENT_OR_WHEEL] [--suite SUITE] [--mirror URL]
#
#   --tag TAG      image to create (default neuromf-base:local); then
#                  docker build --build-arg BASE_IMAGE=neuromf-base:local -t neuromf .
#   --torch SPEC   what pip installs for torch (default torch==2.13.0, or a wheel file path)
#   --suite S      Debian suite (default bookworm: Python 3.11)
#   --mirror URL   Debian mirror (default http://deb.debian.org/debian)
#
# Needs root, debootstrap and docker. Takes a few minutes and ~1 GB of disk. Exit 2 on bad input or a missing tool.
set -euo pipefail

TAG=neuromf-base:local
TORCH=torch==2.13.0
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
DOCKER=${DOCKER:-docker}
CA=/etc/ssl/certs/ca-certificates.crt # pip's own bundle lacks a site's proxy CA: use the system's (PIP_CERT)

die() {
    printf 'local_base.sh: %s\n' "$*" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --tag | --torch | --suite | --mirror)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case $1 in
                --tag) TAG=$2 ;;
                --torch) TORCH=$2 ;;
                --suite) SUITE=$2 ;;
                --mirror) MIRROR=$2 ;;
            esac
            shift 2
            ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || die "no debootstrap (apt-get install debootstrap)"
command -v "$DOCKER" >/dev/null 2>&1 || die "no docker"

ROOT=$(mktemp -d "${TMPDIR:-/var/tmp}/neuromf-base.XXXXXX")
cleanup() {
    umount "$ROOT/proc" 2>/dev/null || true
    rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

echo "== debootstrap $SUITE -> $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR" >/dev/null
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The build host's trust store: where PyPI is reached through a TLS-inspecting proxy, its CA is only in the host's.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mount -t proc proc "$ROOT/proc"

torch_req=$TORCH
if [[ -f $TORCH ]]; then # a local wheel: bind it in under its own name (pip reads the version from the name)
    whl=$(basename "$TORCH")
    cp "$TORCH" "$ROOT/tmp/$whl"
    torch_req=/tmp/$whl
fi
echo "== python venv /opt/venv with $TORCH"
chroot "$ROOT" python3 -m venv /opt/venv
chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/root PIP_NO_CACHE_DIR=1 PIP_CERT="$CA" \
    /opt/venv/bin/pip install -q --disable-pip-version-check "$torch_req"
rm -f "$ROOT/tmp/"*.whl
: >"$ROOT/etc/resolv.conf"
umount "$ROOT/proc"
rm -rf "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"*

echo "== docker import -> $TAG"
tar -C "$ROOT" -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV PIP_CERT=$CA" \
    - "$TAG" >/dev/null
echo "== built $TAG"
