#!/usr/bin/env bash
# Build trainer.sif from the Dockerfile in one command: docker build -> docker save -> apptainer build apptainer.def.
#
#   container/build_sif.sh [--base IMAGE] [--tag TAG] [--out trainer.sif] [--archive FILE] [--no-test]
#
#   --base IMAGE    CUDA PyTorch base image (Dockerfile's BASE_IMAGE build argument)
#   --tag TAG       Docker tag to build (default neuromf:latest)
#   --out FILE      the Apptainer image to write (default trainer.sif in the repository)
#   --archive FILE  use this `docker save` archive instead of building (e.g. built on a laptop, copied to a login
#                   node where there is Apptainer but no Docker)
#   --no-test       skip the image's %test section (apptainer build --notest). %test runs as root during the build and
#                   fails where the build host's root lacks capabilities (Apptainer asks for the full set); then
#                   build with --no-test and run `apptainer test trainer.sif` as a normal user, which passes there.
#
# Environment: DOCKER (default docker), APPTAINER (default apptainer, else singularity).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=${DOCKER:-docker}
APPTAINER=${APPTAINER:-$(command -v apptainer || command -v singularity || echo apptainer)}
TAG=neuromf:latest
OUT=$REPO/trainer.sif
BASE=""
ARCHIVE=""
TEST_ARGS=()
ARCHIVE_IN_DEF=build/neuromf-docker.tar # apptainer.def's `From:`, relative to the repository

die() {
    printf 'build_sif.sh: %s\n' "$*" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --base | --tag | --out | --archive)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case $1 in
                --base) BASE=$2 ;;
                --tag) TAG=$2 ;;
                --out) OUT=$(cd "$(dirname "$2")" && pwd)/$(basename "$2") ;;
                --archive) ARCHIVE=$(cd "$(dirname "$2")" && pwd)/$(basename "$2") ;;
            esac
            shift 2
            ;;
        --no-test) TEST_ARGS=(--notest); shift ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

command -v "$APPTAINER" >/dev/null 2>&1 || die "no apptainer (or singularity) found: install it, or set APPTAINER"
cd "$REPO"
mkdir -p build
if [[ -z $ARCHIVE ]]; then
    command -v "$DOCKER" >/dev/null 2>&1 || die "no docker found: build the archive elsewhere and pass --archive"
    build_args=()
    [[ -n $BASE ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE")
    echo "== docker build -t $TAG ${build_args[*]} ."
    "$DOCKER" build "${build_args[@]}" -t "$TAG" .
    echo "== docker save $TAG -> $ARCHIVE_IN_DEF"
    "$DOCKER" save -o "$ARCHIVE_IN_DEF.partial" "$TAG"
    mv -f "$ARCHIVE_IN_DEF.partial" "$ARCHIVE_IN_DEF"
else
    [[ -f $ARCHIVE ]] || die "archive $ARCHIVE not found"
    [[ $ARCHIVE -ef $ARCHIVE_IN_DEF ]] || ln -sf "$ARCHIVE" "$ARCHIVE_IN_DEF"
fi

# Written under a temporary name and moved into place: a failed build never leaves a broken trainer.sif behind.
echo "== $APPTAINER build $OUT apptainer.def"
if ! "$APPTAINER" build --force "${TEST_ARGS[@]}" "$OUT.partial" apptainer.def; then
    rm -f "$OUT.partial"
    [[ ${#TEST_ARGS[@]} -eq 0 ]] &&
        printf 'build_sif.sh: if the %%test section failed (e.g. "operation not permitted" as root), build with --no-test and run "%s test %s" as a normal user\n' "$APPTAINER" "$OUT" >&2
    exit 1
fi
mv -f "$OUT.partial" "$OUT"
echo "== built $OUT"
"$APPTAINER" inspect --labels "$OUT" || true
echo "try: $APPTAINER run-help $OUT;  $APPTAINER exec $OUT neuromf validate runspecs/demo.yaml"
