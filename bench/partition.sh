#!/usr/bin/env bash
# Partitioning by a column not in key order (issue 25): ROWS rows over 365 random days,
# exported unpartitioned and with --partition-by, interleaved RUNS times; prints the
# median wall times, their ratio and the partitioned export's file count beside the
# anchors (≤ 1.3× the unpartitioned time, ≤ chunks × 365 files). Not a test.
#   bench/partition.sh [ROWS]        (HAUL_BIN=<path> to use another build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${1:-5000000}"
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
RUNS="${RUNS:-3}"
HAUL="${HAUL_BIN:-./target/release/haul}"
if [ -z "${HAUL_BIN:-}" ]; then cargo build --release --bin haul >&2; fi
bash scripts/services.sh
have=-1
if [ "$(psql "$PGURL" -XtAc "SELECT to_regclass('public.events_by_day') IS NOT NULL")" = t ]; then
  have=$(psql "$PGURL" -XtAc "SELECT count(*) FROM events_by_day")
fi
if [ "$have" != "$ROWS" ]; then
  echo "bench: generating events_by_day with $ROWS rows" >&2
  psql "$PGURL" -X -q -v ON_ERROR_STOP=1 <<SQL
DROP TABLE IF EXISTS events_by_day;
CREATE TABLE events_by_day (id bigint PRIMARY KEY, created_at timestamptz NOT NULL,
  customer int NOT NULL, amount numeric(12,2) NOT NULL, note text);
INSERT INTO events_by_day SELECT g,
  timestamptz '2023-01-01 00:00+00' + (random() * 364)::int * interval '1 day' + random() * interval '1 day',
  (random() * 100000)::int, (random() * 10000)::numeric(12,2), md5(g::text)
FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE events_by_day;
SQL
fi
OUT=$(mktemp -d /tmp/haul-partition.XXXX)
trap 'rm -rf "$OUT"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=(); parted=(); files=0; chunks=0
for i in $(seq 1 "$RUNS"); do
  for which in plain parted; do
    extra=(); [ "$which" = parted ] && extra=(--partition-by created_at)
    # a lake of its own per run, all removed at the end: ext4 makes new files slowly
    # where thousands were just deleted (recently_deleted() in inode allocation), which
    # would bill one run for the last one's clean-up
    lake="$OUT/lake-$i-$which"; sync
    /usr/bin/time -f "%e" -o "$OUT/time" "$HAUL" run --source "$PGURL" --table public.events_by_day \
      --dest "file://$lake" --workers 2 --progress none --json "${extra[@]}" >"$OUT/summary" 2>/dev/null
    if [ "$which" = plain ]; then plain+=("$(cat "$OUT/time")"); else
      parted+=("$(cat "$OUT/time")")
      files=$(find "$lake/events_by_day" -name 'part-*.parquet' | wc -l)
      chunks=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["chunks"])' "$OUT/summary")
    fi
  done
done
echo "runs: unpartitioned ${plain[*]} | partitioned ${parted[*]}" >&2
p=$(printf '%s\n' "${plain[@]}" | median); q=$(printf '%s\n' "${parted[@]}" | median)
printf '%-34s %12s\n' "rows" "$ROWS" "unpartitioned (median wall, s)" "$p" "partitioned by day (median, s)" "$q"
printf '%-34s %12s %s\n' "partitioned / unpartitioned" "$(awk -v a="$q" -v b="$p" 'BEGIN {printf "%.2f", a / b}')" "(anchor: <= 1.30)"
printf '%-34s %12s %s\n' "part files (partitioned)" "$files" "(anchor: <= chunks x 365 = $((chunks * 365)))"
