#!/usr/bin/env bash
# Makes the benchmark's `orders` table hold ROWS rows (bench/gen_orders.sql), regenerating
# it only when its row count differs. Run by bench/run.sh and bench/compare.sh.
#   bench/orders.sh ROWS      (PGURL names the database)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="$1"
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
have=-1
if [ "$(psql "$PGURL" -XtAc "SELECT to_regclass('public.orders') IS NOT NULL")" = t ]; then
  have=$(psql "$PGURL" -XtAc "SELECT count(*) FROM orders")
fi
if [ "$have" != "$ROWS" ]; then
  echo "bench: generating orders with $ROWS rows" >&2
  PGOPTIONS="-c client_min_messages=warning" psql "$PGURL" -X -q -v ON_ERROR_STOP=1 -v nrows="$ROWS" -f bench/gen_orders.sql >/dev/null
fi
