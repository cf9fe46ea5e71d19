#!/usr/bin/env bash
# haul's benchmark: `haul run` on the benchmark's `orders` table beside the two anchors
# (the source's raw binary COPY limit and DuckDB's postgres scanner), in one run.
# Not a test: it prints figures.
#   bench/run.sh [ROWS] [extra haul run flags]      e.g.  bench/run.sh 10000000
# With CLUSTER=1 it also runs the same extraction through a coordinator and two worker
# processes (one slot each, like `haul run --workers 2`) and prints that beside the rest.
# With LOAD=1 it also moves `orders` Postgres → Postgres (database `haul_bench_wh` on the
# same server): `haul run --workers 2 --load-target` (which writes the Parquet too) beside
# the plain pipe `psql -c "COPY ... TO STDOUT (FORMAT binary)" | psql -c "COPY ... FROM
# STDIN (FORMAT binary)"`, each into a fresh unindexed table.
# With TLS=1 it also runs `haul run` with `sslmode=require` (the same server over TLS: the
# cost of encryption on the COPY reader) and prints it beside the plain run.
# Regenerates `orders` only when its row count differs from ROWS.
# HAUL_BIN=<path> benchmarks that binary instead of building ./target/release/haul (e.g. a
# build of an earlier commit, to compare two builds against the same anchors).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${1:-1000000}"; shift || true
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
RUNS="${RUNS:-3}"
bash scripts/services.sh
PGURL="$PGURL" bash bench/orders.sh "$ROWS"
if [ -n "${HAUL_BIN:-}" ]; then
  HAUL="$HAUL_BIN"
else
  cargo build --release --bin haul >&2
  HAUL=./target/release/haul
fi
OUT=$(mktemp -d /tmp/haul-bench.XXXX)
PIDS=()
cleanup() {
  # workers first (they deregister with the coordinator), then the coordinator
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; sleep 0.2; done
  wait 2>/dev/null || true
  rm -rf "$OUT"
  if [ "${CLUSTER:-0}" = 1 ]; then
    redis-cli --scan --pattern "haul:bench:$$:*" | xargs -r redis-cli del >/dev/null
    for q in "haul.bench.$$" "haul.bench.$$.dlq"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
  fi
}
trap cleanup EXIT
WH="${WHURL:-${PGURL%/*}/haul_bench_wh}"
if [ "${LOAD:-0}" = 1 ]; then
  if [ "$(psql "${PGURL%/*}/postgres" -XtAc "SELECT 1 FROM pg_database WHERE datname = '${WH##*/}'")" != 1 ]; then
    psql "${PGURL%/*}/postgres" -Xq -c "CREATE DATABASE ${WH##*/}"
  fi
fi
cluster_times=()
if [ "${CLUSTER:-0}" = 1 ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export HAUL_COORDINATOR="http://127.0.0.1:$port" HAUL_QUEUE="haul.bench.$$" HAUL_REDIS_PREFIX="haul:bench:$$:"
  "$HAUL" coordinator --listen "127.0.0.1:$port" --parallelism 2 --log warn &
  PIDS+=($!)
  sleep 1
  for w in 1 2; do
    "$HAUL" worker --id "bench-w$w" --slots 1 --log warn &
    PIDS+=($!)
  done
  sleep 3
fi
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# interleaved, each after a `sync`, so no run pays for another's disk writeback
tls_times=(); haul_times=(); haul_rss=(); copy_times=(); duck_times=(); load_times=(); load_rss=(); pipe_times=()
for i in $(seq 1 "$RUNS"); do
  if [ "${LOAD:-0}" = 1 ]; then
    psql "$WH" -Xq -c "DROP TABLE IF EXISTS orders_haul" -c "DROP TABLE IF EXISTS orders_pipe"
    rm -rf "$OUT/lake"; sync
    /usr/bin/time -f "%e %M" -o "$OUT/time" "$HAUL" run --source "$PGURL" --table public.orders \
      --dest "file://$OUT/lake" --workers 2 --progress none --log warn \
      --load-target "$WH" --target-table public.orders_haul --create-table "$@" >/dev/null
    read -r wall rss_kb < "$OUT/time"
    load_times+=("$wall"); load_rss+=("$rss_kb")
    psql "$WH" -Xq -c "CREATE TABLE orders_pipe (LIKE orders_haul)" -c "CHECKPOINT"
    sync
    /usr/bin/time -f "%e" -o "$OUT/time" bash -c "psql '$PGURL' -Xq -c 'COPY orders TO STDOUT (FORMAT binary)' \
      | psql '$WH' -Xq -c 'COPY orders_pipe FROM STDIN (FORMAT binary)'"
    pipe_times+=("$(cat "$OUT/time")")
    [ "$(psql "$WH" -XtAc "SELECT (SELECT count(*) FROM orders_haul) = (SELECT count(*) FROM orders_pipe)")" = t ] \
      || { echo "bench: orders_haul and orders_pipe differ in row count" >&2; exit 1; }
    psql "$WH" -Xq -c "DROP TABLE orders_haul" -c "DROP TABLE orders_pipe" -c "CHECKPOINT"
  fi
  rm -rf "$OUT/lake"; sync
  /usr/bin/time -f "%e %M" -o "$OUT/time" "$HAUL" run --source "$PGURL" --table public.orders \
    --dest "file://$OUT/lake" --workers 2 --progress none --log warn "$@" >/dev/null
  read -r wall rss_kb < "$OUT/time"
  haul_times+=("$wall"); haul_rss+=("$rss_kb")
  parquet_bytes=$(du -sb "$OUT/lake/orders" | cut -f1)
  if [ "${TLS:-0}" = 1 ]; then
    sep='?'; case "$PGURL" in *\?*) sep='&';; esac
    rm -rf "$OUT/lake"; sync
    /usr/bin/time -f "%e" -o "$OUT/time" "$HAUL" run --source "${PGURL}${sep}sslmode=require" \
      --table public.orders --dest "file://$OUT/lake" --workers 2 --progress none --log warn "$@" >/dev/null
    tls_times+=("$(cat "$OUT/time")")
  fi
  if [ "${CLUSTER:-0}" = 1 ]; then
    rm -rf "$OUT/lake"; sync
    /usr/bin/time -f "%e" -o "$OUT/time" "$HAUL" submit --source "$PGURL" --table public.orders \
      --dest "file://$OUT/lake" --job-id "bench-$$-$i" --progress none --wait "$@" >/dev/null
    cluster_times+=("$(cat "$OUT/time")")
  fi
  rm -rf "$OUT/lake"; sync
  a=$(PGURL="$PGURL" bash bench/anchor.sh orders)
  copy_times+=("$(echo "$a" | awk '/copy_binary/ {sub("wall_s=","",$2); print $2}')")
  duck_times+=("$(echo "$a" | awk '/duckdb/ {sub("wall_s=","",$2); print $2}')")
done
echo "runs: haul ${haul_times[*]} | tls ${tls_times[*]:-} | cluster ${cluster_times[*]:-} | copy ${copy_times[*]} | duckdb ${duck_times[*]}" >&2
haul_wall=$(printf '%s\n' "${haul_times[@]}" | median)
haul_rss_mib=$(( $(printf '%s\n' "${haul_rss[@]}" | sort -n | tail -1) / 1024 ))
copy_wall=$(printf '%s\n' "${copy_times[@]}" | median)
duck_wall=$(printf '%s\n' "${duck_times[@]}" | median)
tls_wall=0
if [ "${#tls_times[@]}" -gt 0 ]; then tls_wall=$(printf '%s\n' "${tls_times[@]}" | median); fi
cluster_wall=0
if [ "${#cluster_times[@]}" -gt 0 ]; then cluster_wall=$(printf '%s\n' "${cluster_times[@]}" | median); fi
load_wall=0; pipe_wall=0; load_rss_mib=0
if [ "${#load_times[@]}" -gt 0 ]; then
  load_wall=$(printf '%s\n' "${load_times[@]}" | median)
  pipe_wall=$(printf '%s\n' "${pipe_times[@]}" | median)
  load_rss_mib=$(( $(printf '%s\n' "${load_rss[@]}" | sort -n | tail -1) / 1024 ))
fi
python3 - "$ROWS" "$haul_wall" "$haul_rss_mib" "$parquet_bytes" "$copy_wall" "$duck_wall" "$RUNS" "$cluster_wall" "$load_wall" "$pipe_wall" "$load_rss_mib" "$tls_wall" <<'PY'
import sys
rows, hw, rss, pb, cw, dw, runs, clw, lw, pw, lrss, tw = sys.argv[1:]
tw = float(tw)
lw, pw = float(lw), float(pw)
clw = float(clw)
rows, hw, cw, dw = int(rows), float(hw), float(cw), float(dw)
print(f"rows={rows} runs={runs} (median)")
print(f"haul_run          wall_s={hw:.2f} rows_per_s={rows/hw:,.0f} peak_rss_mib={rss} parquet_mib={int(pb)/2**20:.0f}")
print(f"copy_binary_2x    wall_s={cw:.2f}   haul/copy={hw/cw:.2f}")
print(f"duckdb_scanner    wall_s={dw:.2f}   haul/duckdb={hw/dw:.2f}")
if tw:
    print(f"haul_run_tls      wall_s={tw:.2f} rows_per_s={rows/tw:,.0f}   tls/plain={tw/hw:.2f} haul_tls/duckdb={tw/dw:.2f}")
if clw:
    print(f"haul_cluster      wall_s={clw:.2f} rows_per_s={rows/clw:,.0f}   cluster/run={clw/hw:.2f} cluster/duckdb={clw/dw:.2f}")
if lw:
    print(f"haul_run_load     wall_s={lw:.2f} rows_per_s={rows/lw:,.0f} peak_rss_mib={lrss} (Parquet + PG load)")
    print(f"psql_pipe_binary  wall_s={pw:.2f}   haul_load/pipe={lw/pw:.2f}")
PY
