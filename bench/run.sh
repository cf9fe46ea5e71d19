#!/usr/bin/env bash
# haul's benchmark: `haul run` on the benchmark's `orders` table beside the two anchors
# (the source's raw binary COPY limit and DuckDB's postgres scanner), in one run.
# Not a test: it prints figures.
#   bench/run.sh [ROWS] [extra haul run flags]      e.g.  bench/run.sh 10000000
# Regenerates `orders` only when its row count differs from ROWS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${1:-1000000}"; shift || true
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
RUNS="${RUNS:-3}"
bash scripts/services.sh
have=$(psql "$PGURL" -XtAc "SELECT CASE WHEN to_regclass('public.orders') IS NULL THEN -1 ELSE (SELECT count(*) FROM orders) END")
if [ "$have" != "$ROWS" ]; then
  echo "bench: generating orders with $ROWS rows" >&2
  PGOPTIONS="-c client_min_messages=warning" psql "$PGURL" -X -q -v ON_ERROR_STOP=1 -v nrows="$ROWS" -f bench/gen_orders.sql >/dev/null
fi
cargo build --release --bin haul >&2
OUT=$(mktemp -d /tmp/haul-bench.XXXX)
trap 'rm -rf "$OUT"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# interleaved, each after a `sync`, so no run pays for another's disk writeback
haul_times=(); haul_rss=(); copy_times=(); duck_times=()
for i in $(seq 1 "$RUNS"); do
  rm -rf "$OUT/lake"; sync
  /usr/bin/time -f "%e %M" -o "$OUT/time" ./target/release/haul run --source "$PGURL" --table public.orders \
    --dest "file://$OUT/lake" --workers 2 --progress none --log warn "$@" >/dev/null
  read -r wall rss_kb < "$OUT/time"
  haul_times+=("$wall"); haul_rss+=("$rss_kb")
  parquet_bytes=$(du -sb "$OUT/lake/orders" | cut -f1)
  rm -rf "$OUT/lake"; sync
  a=$(PGURL="$PGURL" bash bench/anchor.sh orders)
  copy_times+=("$(echo "$a" | awk '/copy_binary/ {sub("wall_s=","",$2); print $2}')")
  duck_times+=("$(echo "$a" | awk '/duckdb/ {sub("wall_s=","",$2); print $2}')")
done
haul_wall=$(printf '%s\n' "${haul_times[@]}" | median)
haul_rss_mib=$(( $(printf '%s\n' "${haul_rss[@]}" | sort -n | tail -1) / 1024 ))
copy_wall=$(printf '%s\n' "${copy_times[@]}" | median)
duck_wall=$(printf '%s\n' "${duck_times[@]}" | median)
python3 - "$ROWS" "$haul_wall" "$haul_rss_mib" "$parquet_bytes" "$copy_wall" "$duck_wall" "$RUNS" <<'PY'
import sys
rows, hw, rss, pb, cw, dw, runs = sys.argv[1:]
rows, hw, cw, dw = int(rows), float(hw), float(cw), float(dw)
print(f"rows={rows} runs={runs} (median)")
print(f"haul_run          wall_s={hw:.2f} rows_per_s={rows/hw:,.0f} peak_rss_mib={rss} parquet_mib={int(pb)/2**20:.0f}")
print(f"copy_binary_2x    wall_s={cw:.2f}   haul/copy={hw/cw:.2f}")
print(f"duckdb_scanner    wall_s={dw:.2f}   haul/duckdb={hw/dw:.2f}")
PY
