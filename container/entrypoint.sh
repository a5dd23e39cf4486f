#!/bin/sh
# Docker entry point: `docker run IMAGE VERB ...` runs `neuromf VERB ...`; `docker run IMAGE CMD ...` runs CMD when it
# is a program in the image (pytest, python, bash), so `docker run IMAGE pytest -q` runs the test suite.
# `exec` keeps the command as PID 1's replacement, so `docker stop` (SIGTERM) reaches Python.
set -e
# `docker run --user 1000:1000` (and some Apptainer set-ups) give a uid without a passwd entry: no USER, HOME=/.
# getpass.getuser() (MONAI's import calls it) then raises, and tools that write under HOME fail on a read-only root.
uid=$(id -u)
if [ -z "${USER:-}" ]; then
    USER=$(id -un 2>/dev/null) || USER="uid$uid" # GNU id prints the number and fails for an unknown uid
    export USER
fi
export LOGNAME="${LOGNAME:-$USER}"
if [ -z "${HOME:-}" ] || ! [ -d "$HOME" ] || ! [ -w "$HOME" ]; then
    HOME="${TMPDIR:-/tmp}/neuromf-$uid/home"
    mkdir -p "$HOME"
    export HOME
fi
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec neuromf "$@"
