#!/usr/bin/env bash
# The five-minute demo: starts Postgres if needed, builds haul (the dev profile the test
# suite shares: one build for both), creates a demo `orders` table (200k rows, skewed ids,
# like the benchmark's) in database `test` if it is missing, and extracts it with
# `haul run` into ./lake, partitioned by day.
# Usage: scripts/demo.sh [extra `haul run` flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# (the demo needs only Postgres)
bash scripts/services.sh postgres
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
ROWS="${DEMO_ROWS:-200000}"
if ! psql "$PGURL" -XtAc "SELECT to_regclass('public.orders') IS NOT NULL" | grep -q t; then
  echo "demo: creating public.orders with $ROWS rows" >&2
  PGOPTIONS="-c client_min_messages=warning" psql "$PGURL" -X -q -v ON_ERROR_STOP=1 -v nrows="$ROWS" -f bench/gen_orders.sql >/dev/null
fi
cargo build --bin haul
# a rerun replaces the demo's earlier export once it commits (--overwrite); nothing of the
# lake's records is deleted
./target/debug/haul run --source "$PGURL" --table public.orders \
  --dest file://./lake --partition-by created_at:day --workers 2 --overwrite "$@"
echo "demo: next, README.md's walk-through: export PATH=\"\$PWD/target/debug:\$PATH\" and try haul show ./lake/orders" >&2
