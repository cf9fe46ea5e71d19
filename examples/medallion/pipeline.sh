#!/usr/bin/env bash
# The pipeline's steps, as every orchestrator example runs them (and run.sh directly):
#   pipeline.sh extract     haul: the source's changed rows → bronze (Hive-partitioned
#                           Parquet under $HAUL_LAKE, one increment per run); prints
#                           haul's JSON summary (job, rows, files, ...) on stdout
#   pipeline.sh transform   dbt build: silver.orders and gold.daily_revenue in the DuckDB
#                           file $WAREHOUSE, with their tests
#   pipeline.sh freshness   dbt source freshness: is bronze recent enough?
# Settings: HAUL_SOURCE (the source's connection string), HAUL_LAKE (a folder, or
# s3://bucket/prefix), WAREHOUSE (a DuckDB file), HAUL (the haul binary, default
# `haul`), DBT (the dbt binary, default `dbt`). With HAUL_COORDINATOR set, extract
# submits the job to that cluster (`haul submit --wait`) instead of running it here.
# The exit code is the step's: orchestrators retry on it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${HAUL_SOURCE:?set HAUL_SOURCE to the connection string of the source database}"
: "${HAUL_LAKE:?set HAUL_LAKE to the bronze lake (a folder or s3://bucket/prefix)}"
: "${WAREHOUSE:?set WAREHOUSE to the DuckDB file of silver and gold}"
HAUL="${HAUL:-haul}"
DBT="${DBT:-dbt}"
export HAUL_LAKE WAREHOUSE
# dbt's build files and logs beside the warehouse, not in the project
export DBT_TARGET_PATH="${DBT_TARGET_PATH:-$(dirname "$WAREHOUSE")/dbt-target}"
export DBT_LOG_PATH="${DBT_LOG_PATH:-$(dirname "$WAREHOUSE")/dbt-logs}"
export DBT_USE_COLORS="${DBT_USE_COLORS:-false}" DBT_SEND_ANONYMOUS_USAGE_STATS=false
dbt_() { "$DBT" "$@" --project-dir "$here/dbt" --profiles-dir "$here/dbt"; }

case "${1:-}" in
  extract)
    job=(--source "$HAUL_SOURCE" --table public.orders --dest "$HAUL_LAKE"
         --incremental updated_at --partition-by created_at:month --lineage-columns --json)
    if [ -n "${HAUL_COORDINATOR:-}" ]; then
      "$HAUL" submit "${job[@]}" --wait
    else
      "$HAUL" run "${job[@]}"
    fi
    ;;
  transform) dbt_ build ;;
  freshness) dbt_ source freshness ;;
  *) echo "usage: $0 extract|transform|freshness" >&2; exit 2 ;;
esac
