#!/usr/bin/env bash
# Installs the moto S3 server (used by runners/tests/staging.rs) into a virtualenv and prints
# the path of its `moto_server` executable on stdout (and nothing else there, so callers can
# `MOTO_SERVER=$(bash .ci/moto.sh)`). Idempotent: an existing venv with moto is reused.
#
#   MOTO_VENV   where the venv lives (default: .venv, relative to the current directory)
#
# Start it on loopback only, e.g.:
#   "$(bash .ci/moto.sh)" -H 127.0.0.1 -p 5055 &
#   MOTO_ENDPOINT=http://127.0.0.1:5055 cargo test -p pathling-import-runners --test staging
set -euo pipefail

venv="${MOTO_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" >&2
fi

# Reinstall only when moto's server entry point is missing (fresh venv or partial install).
if [ ! -x "$venv/bin/moto_server" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6' >&2
fi

# Absolute path, so the caller can use it from any directory.
cd "$venv/bin" && printf '%s/moto_server\n' "$(pwd -P)"
