#!/usr/bin/env bash
# The tools of the medallion example (examples/medallion), each in a venv of its own
# under $HAUL_TEST_VENVS (default target/venvs), for the test that runs it:
#   dbt      dbt-core + dbt-duckdb (silver and gold in DuckDB; its python has duckdb)
#   prefect  Prefect 3
#   dagster  Dagster
#   airflow  Apache Airflow 3
# Pinned, installed from PyPI if missing or incomplete; about 3 minutes in all the first
# time. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENVS="${HAUL_TEST_VENVS:-$PWD/target/venvs}"
log() { printf 'pipeline-tools: %s\n' "$*" >&2; }

ensure() { # name check-command packages...
  local name="$1" check="$2"; shift 2
  local v="$VENVS/$name"
  if [ -x "$v/bin/python" ] && "$v/bin/python" -c "$check" 2>/dev/null; then return; fi
  log "installing $* into $v"
  python3 -m venv "$v"
  "$v/bin/pip" install -q "$@"
}
ensure dbt "import dbt.adapters.duckdb, duckdb" dbt-core==1.11.16 dbt-duckdb==1.11.1
ensure prefect "import prefect" prefect==3.9.1
ensure dagster "import dagster" dagster==1.12.22
ensure airflow "import airflow.providers.standard" apache-airflow==3.1.8
