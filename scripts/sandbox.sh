#!/usr/bin/env bash
# The main job on one machine: a complete sync from the project's sandbox Bulk Data source
# into its sandbox Pathling (both fakes on 127.0.0.1), staging to ./sandbox/staging.
# Run it twice: the second run is incremental (SINCE=auto).
#
#   scripts/sandbox.sh [--pathling-generation 7|9] [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."

generation=9
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pathling-generation) generation="$2"; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done

# Debug builds: they share artifacts with the test suite and build in a fraction of the time;
# the sandbox's few MB do not need an optimised binary. One cargo invocation for both binaries,
# so every dependency is built once with one feature set; its progress shows (a first build
# takes several minutes).
if [ ! -x target/debug/pathling-import ] || [ ! -x target/debug/sandbox-servers ]; then
    echo "sandbox: building pathling-import and the sandbox servers (first time: a few minutes)" >&2
fi
cargo build -p pathling-import-runners --bin pathling-import \
    -p pathling-import-tests --bin sandbox-servers

mkdir -p sandbox
# The servers live as long as their stdin stays open. They keep their ports and jobs in
# sandbox/servers.json, so a sandbox stopped with Ctrl-C resumes its run when started again.
coproc SERVERS {
    exec target/debug/sandbox-servers --pathling-generation "$generation" \
        --state sandbox/servers.json
}
trap 'exec {SERVERS[1]}>&-; wait "$SERVERS_PID" 2>/dev/null || true' EXIT
if ! read -r endpoints <&"${SERVERS[0]}"; then
    echo "sandbox: the sandbox servers did not start (see above)" >&2
    exit 1
fi
source_url=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["source"])' "$endpoints")
target_url=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["target"])' "$endpoints")

cat > sandbox/pathling-import.config.json <<JSON
{
  "sourceEndpoint": "$source_url",
  "sourceClientId": "sandbox-client",
  "sourceClientSecret": "sandbox-secret",
  "since": "auto",
  "stagingUrl": "file://$(pwd)/sandbox/staging/",
  "targetEndpoint": "$target_url",
  "targetAuthenticationEnabled": false,
  "exportRetryWait": 1,
  "importRetryWait": 1,
  "transferRetryWait": 1,
  "stateFile": "sandbox/pathling-import.state.json"
}
JSON
echo "sandbox: source $source_url, Pathling $generation.x at $target_url" >&2
status=0
target/debug/pathling-import sandbox/pathling-import.config.json "${extra[@]}" || status=$?
echo "sandbox: pathling-import exited with $status; staged files are under sandbox/staging/" >&2
exit "$status"
