#!/usr/bin/env bash
# Every cargo-deny check of deny.toml: advisories, bans, licenses and sources. The advisories
# check fetches the RustSec database from GitHub, so run this where GitHub is reachable; CI
# cannot reach it and runs only the three offline checks (.ci/run).
#
#   scripts/deny.sh                 all four checks
#   scripts/deny.sh advisories      one of them
set -euo pipefail
cd "$(dirname "$0")/.."
cargo_deny=$(bash .ci/cargo-deny.sh)
exec "$cargo_deny" check "$@"
