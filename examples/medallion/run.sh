#!/usr/bin/env bash
# The whole medallion pipeline, twice, checked:
#   1. creates the source: public.orders with $ROWS rows (default 300000) in a database
#      of its own ($MEDALLION_DB, default haul_medallion; dropped and made again);
#   2. runs the pipeline (pipeline.sh extract, then transform): haul copies the table into
#      bronze, dbt builds silver.orders and gold.daily_revenue and tests them;
#   3. changes the source (changes.sql: updates and new orders), runs it again: haul
#      reads only the changed rows (an increment), dbt merges them into silver;
#   4. after each run, check.py compares silver with the source's rows and gold with the
#      same aggregation computed by Postgres; then `dbt source freshness` checks bronze.
# Its last two lines say where the source and the warehouse are.
#
# Needs: Postgres (scripts/services.sh starts one), the haul binary ($HAUL, else `haul` on
# PATH, else the repository's target/debug/haul, built if missing), and dbt with
# dbt-duckdb ($DBT, else a venv made under target/venvs/dbt).
# Settings: ROWS, NEW_ROWS (default ROWS/50), MEDALLION_DB, MEDALLION_DIR (lake and
# warehouse; default examples/medallion/work), PGADMIN (default
# postgresql://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ROWS="${ROWS:-300000}"
NEW_ROWS="${NEW_ROWS:-$((ROWS / 50))}"
DB="${MEDALLION_DB:-haul_medallion}"
WORK="${MEDALLION_DIR:-$here/work}"
PGADMIN="${PGADMIN:-postgresql://postgres@127.0.0.1:5432/postgres}"
log() { printf 'medallion: %s\n' "$*" >&2; }

if [ -z "${HAUL:-}" ]; then
  if command -v haul >/dev/null; then HAUL=haul
  else
    HAUL="$repo/target/debug/haul"
    [ -x "$HAUL" ] || { log "building haul (cargo build, the dev build scripts/demo.sh makes)"; (cd "$repo" && cargo build --bin haul); }
  fi
fi
if [ -z "${DBT:-}" ]; then
  DBT="$repo/target/venvs/dbt/bin/dbt"
  if [ ! -x "$DBT" ]; then
    log "installing dbt-core and dbt-duckdb into target/venvs/dbt"
    python3 -m venv "$repo/target/venvs/dbt"
    "$repo/target/venvs/dbt/bin/pip" install -q dbt-core==1.11.16 dbt-duckdb==1.11.1
  fi
fi
PY="$(dirname "$DBT")/python"
export HAUL DBT

# the source, in a database of its own
source_dsn="${PGADMIN%/*}/$DB"
psql -X -q "$PGADMIN" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" -c "CREATE DATABASE \"$DB\""
psql -X -q -v ON_ERROR_STOP=1 -v rows="$ROWS" "$source_dsn" -f "$here/source.sql"
log "source: public.orders with $ROWS rows in $source_dsn"

rm -rf "$WORK"
mkdir -p "$WORK"
export HAUL_SOURCE="$source_dsn" HAUL_LAKE="$WORK/lake" WAREHOUSE="$WORK/warehouse.duckdb"

run_pipeline() {
  local summary
  summary=$("$here/pipeline.sh" extract)
  log "bronze: $(printf '%s' "$summary" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print("job %s: %s rows" % (j["job_id"], j["rows"]))')"
  "$here/pipeline.sh" transform >"$WORK/dbt-build.log" \
    || { cat "$WORK/dbt-build.log" >&2; log "dbt build failed"; exit 1; }
  log "dbt: $(grep -E 'Done\. PASS' "$WORK/dbt-build.log" | tail -n1 | sed 's/^[0-9:]* *//')"
  "$PY" "$here/check.py" "$WAREHOUSE" "$source_dsn" >&2
}

log "run 1: everything"
run_pipeline
psql -X -q -v ON_ERROR_STOP=1 -v new_rows="$NEW_ROWS" "$source_dsn" -f "$here/changes.sql"
log "the source changed: orders moved on, $NEW_ROWS new ones"
log "run 2: the increment"
run_pipeline
"$here/pipeline.sh" freshness >"$WORK/dbt-freshness.log" \
  || { cat "$WORK/dbt-freshness.log" >&2; log "bronze is stale"; exit 1; }
log "dbt source freshness: bronze is fresh"
echo "source: $source_dsn"
echo "warehouse: $WAREHOUSE"
