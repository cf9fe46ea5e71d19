#!/usr/bin/env bash
# Two builds of haul on the benchmark's `orders` table, interleaved in one run (each
# `haul run --workers 2` after a `sync`), with their median wall times side by side and
# the second build's table-commit time (the Delta log's cost) from its own log.
#   bench/compare.sh BEFORE_BIN AFTER_BIN [ROWS]      e.g. bench/compare.sh /tmp/haul-193f859 target/release/haul 10000000
# Regenerates `orders` only when its row count differs from ROWS. Not a test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BEFORE="$1"; AFTER="$2"; ROWS="${3:-10000000}"
PGURL="${PGURL:-postgresql://postgres@127.0.0.1:5432/test}"
RUNS="${RUNS:-3}"
bash scripts/services.sh
PGURL="$PGURL" bash bench/orders.sh "$ROWS"
OUT=$(mktemp -d /tmp/haul-compare.XXXX)
trap 'rm -rf "$OUT"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
before=(); after=(); commit=()
for i in $(seq 1 "$RUNS"); do
  for which in before after; do
    bin="$BEFORE"; [ "$which" = after ] && bin="$AFTER"
    rm -rf "$OUT/lake"; sync
    /usr/bin/time -f "%e" -o "$OUT/time" "$bin" run --source "$PGURL" --table public.orders \
      --dest "file://$OUT/lake" --workers 2 --progress none --log info 2>"$OUT/log" >/dev/null
    if [ "$which" = before ]; then before+=("$(cat "$OUT/time")"); else
      after+=("$(cat "$OUT/time")")
      commit+=("$(grep -o 'commit_ms=[0-9]*' "$OUT/log" | tail -1 | cut -d= -f2)")
    fi
  done
done
echo "runs: before ${before[*]} | after ${after[*]} | after's table commit (ms) ${commit[*]}" >&2
b=$(printf '%s\n' "${before[@]}" | median); a=$(printf '%s\n' "${after[@]}" | median)
c=$(printf '%s\n' "${commit[@]}" | median)
printf '%-28s %10s\n' "rows" "$ROWS" "before (median wall, s)" "$b" "after (median wall, s)" "$a"
printf '%-28s %10s\n' "after / before" "$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", a / b}')"
printf '%-28s %10s\n' "table commit (median, ms)" "$c" "commit / wall" "$(awk -v c="$c" -v a="$a" 'BEGIN {printf "%.2f%%", c / 10 / a}')"
