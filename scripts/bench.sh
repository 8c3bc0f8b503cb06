#!/usr/bin/env bash
# Throughput and memory figures for pathling-import (figures, not a timed test).
#
#   scripts/bench.sh [--small-mb N] [--large-gb N] [--files N] [bench options...]
#
# Installs s3s-fs into target/tools when missing, starts it on a free 127.0.0.1 port with a
# temporary data directory and test credentials, builds the release binaries into
# target/bench, and runs tests/src/bin/bench.rs. That serves a synthetic export from the fake
# Bulk Data source (one large file of --large-gb GB plus --files files of --small-mb MB,
# default 1 GB + 200 × 1 MB), measures three baselines (plain download, plain S3 upload,
# plain streaming copy) and the real pathling-import at two export sizes (the large file at
# full size and at 1/--scale-down of it, default 1/10), and prints a table of figures and the
# verdicts on the targets. Other options go to the bench binary (`--help` lists them), e.g.
# --repeat 3, --gzip, --part-mib 16, --memory-mib 64, --concurrency 4, --padding 1000,
# --source-latency-ms 50, --compare LABEL=PATH (another pathling-import binary, runs
# interleaved), --compare-memory LABEL=MIB (this binary again with another TRANSFER_MEMORY).
#
# Needs about twice the export size of free disk (the S3 server stores objects as files; they
# are deleted after each step) and, in the bench process, about 4× the export size of memory
# for the fake Pathling, which reads everything back and parses it. About 2 minutes with the
# defaults on an idle 2-core machine. The machine's other load distorts the figures: the
# table's "other" CPU column shows how much there was.
#
#   scripts/bench.sh fan-out [--files N] [--file-mb N] [--stream-mbps N] [--fan-out N]
#       [--range-mb N] ...
#
# instead measures the Step Functions fan-out (tests/src/bin/fan-out-bench.rs): the same
# export from a source serving each download at a paced rate, staged by the task alone and
# with its Distributed Map played by concurrent item invocations; prints both throughputs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mode=bench
if [ "${1:-}" = "fan-out" ]; then
    mode=fan-out
    shift
fi

tools="$root/target/tools"
s3s_fs="$tools/bin/s3s-fs"
if [ ! -x "$s3s_fs" ]; then
    echo "bench: installing s3s-fs 0.14.1 into $tools (about 2.5 minutes)" >&2
    CARGO_TARGET_DIR="$tools/build" cargo install s3s-fs@0.14.1 --features binary --locked \
        --root "$tools" --quiet
    rm -rf "$tools/build"
fi

echo "bench: building release binaries into target/bench" >&2
export CARGO_TARGET_DIR="$root/target/bench"
# One invocation, so the dependencies are built once with one feature set.
cargo build --release -p pathling-import-runners --bin pathling-import \
    -p pathling-import-tests --bin bench --bin fan-out-bench

work=$(mktemp -d "${TMPDIR:-/tmp}/pathling-import-bench.XXXXXX")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
access_key="bench-access-key"
secret_key="bench-secret-key-$RANDOM$RANDOM"
mkdir -p "$work/s3" "$work/runs"
"$s3s_fs" --host 127.0.0.1 --port "$port" --access-key "$access_key" --secret-key "$secret_key" \
    "$work/s3" > "$work/s3s-fs.log" 2>&1 &
s3s_pid=$!
cleanup() {
    kill "$s3s_pid" 2>/dev/null || true
    wait "$s3s_pid" 2>/dev/null || true
    rm -rf "$work/s3"
    echo "bench: logs kept in $work (remove when done)" >&2
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$s3s_pid" 2>/dev/null; then
        echo "bench: s3s-fs exited; see $work/s3s-fs.log" >&2
        cat "$work/s3s-fs.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "bench: s3s-fs at http://127.0.0.1:$port (pid $s3s_pid), data in $work/s3" >&2
echo "bench: $(nproc) cores, $(free -m | awk '/^Mem:/ {print $2}') MiB memory; $(rustc --version)" >&2

if [ "$mode" = fan-out ]; then
    "$CARGO_TARGET_DIR/release/fan-out-bench" --s3-endpoint "http://127.0.0.1:$port" \
        --access-key "$access_key" --secret-key "$secret_key" "$@"
    exit
fi

"$CARGO_TARGET_DIR/release/bench" \
    --pathling-import "$CARGO_TARGET_DIR/release/pathling-import" \
    --s3-endpoint "http://127.0.0.1:$port" \
    --access-key "$access_key" --secret-key "$secret_key" \
    --s3-server-pid "$s3s_pid" \
    --work-dir "$work/runs" \
    "$@"
