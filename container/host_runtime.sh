#!/usr/bin/env bash
# A stand-in for `apptainer` where no container runtime exists (CI, this repository's SLURM test, a laptop with a
# virtual environment): it accepts the subset of the apptainer command line that container/train.sh and
# container/train_worker.sh use and runs the command ON THE HOST, so `neuromf` must be on PATH.
#
#   NEUROMF_RUNTIME=container/host_runtime.sh container/train.sh runspecs/demo.yaml ...
#
#   host_runtime.sh exec [--nv] [--cleanenv] [--bind|-B SRC[:DST[:OPTS]]]... IMAGE CMD [ARG...]
#   host_runtime.sh run  [same options] IMAGE [ARG...]     # like the image's %runscript: neuromf train ARG...
#
# Binds must map a folder onto itself (SRC or SRC:SRC), since nothing is remapped on the host. As apptainer does,
# APPTAINERENV_NAME=value becomes NAME=value for the command. `exec` replaces this shell, so signals sent to this
# process reach the command directly, as they reach the container's process under apptainer.
set -euo pipefail

die() {
    printf 'host_runtime.sh: %s\n' "$*" >&2
    exit 64 # EX_USAGE: not one of the trainer's exit codes (0, 2, 75)
}

[[ $# -ge 1 ]] || die "usage: host_runtime.sh exec|run [--nv] [--bind SRC[:DST]]... IMAGE [CMD ARG...]"
verb=$1
shift
[[ $verb == exec || $verb == run ]] || die "unsupported verb '$verb' (only exec and run)"

check_bind() {
    # SRC[:DST[:OPTS]], possibly a comma-separated list: every DST must equal its SRC.
    local spec src dst rest
    local -a specs
    IFS=, read -r -a specs <<<"$1"
    for spec in "${specs[@]}"; do
        src=${spec%%:*}
        rest=${spec#"$src"}
        rest=${rest#:}
        dst=${rest%%:*}
        [[ -z $dst || $dst == "$src" ]] || die "bind $spec maps $src to a different path; the host cannot remap it"
        [[ -e $src ]] || die "bind source $src does not exist"
    done
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --nv | --cleanenv | --contain | --writable-tmpfs) shift ;;
        --bind | -B)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            check_bind "$2"
            shift 2
            ;;
        --bind=*)
            check_bind "${1#--bind=}"
            shift
            ;;
        -*) die "unsupported option '$1'" ;;
        *) break ;;
    esac
done

[[ $# -ge 1 ]] || die "missing IMAGE"
image=$1
shift
[[ -f $image ]] || die "image $image not found (the host runtime ignores its contents, but it must exist)"

# APPTAINERENV_X=v -> X=v, as apptainer does inside the container.
while IFS= read -r name; do
    export "${name#APPTAINERENV_}=${!name}"
done < <(compgen -e | grep '^APPTAINERENV_' || true)

if [[ $verb == run ]]; then
    exec neuromf train "$@"
fi
[[ $# -ge 1 ]] || die "exec needs a command after the image"
exec "$@"
