#!/usr/bin/env bash
# The table commit's cost as a series of increments grows (a Delta log version per
# increment, a checkpoint every 10): `table::commit` called in-process N times on a local
# lake, the commit time printed at increments 1, 10, 100, 500 and N (the test profile:
# the commit is bound by its object-store calls, not by CPU). Not a test.
#   bench/commit-cost.sh [N]      (default 1000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HAUL_BENCH_COMMITS="${1:-1000}" cargo test -p haul-tests --test it -- \
  --ignored --exact commit_log::bench_commit_cost_over_a_long_series --nocapture 2>&1 \
  | grep -E "table commit|increment "
