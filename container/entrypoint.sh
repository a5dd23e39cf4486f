#!/bin/sh
# Docker entry point: `docker run IMAGE VERB ...` runs `neuromf VERB ...`; `docker run IMAGE CMD ...` runs CMD when it
# is a program in the image (pytest, python, bash), so `docker run IMAGE pytest -q` runs the test suite.
# `exec` keeps the command as PID 1's replacement, so `docker stop` (SIGTERM) reaches Python.
set -e
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec neuromf "$@"
