#!/usr/bin/env bash
# A venv with DuckDB, pyarrow and delta-rs (independent Parquet and Delta Lake readers)
# under target/pyenv, made once: the README reads the demo's lake with it, and the test
# suite's reader tests use it.
# Usage: scripts/pyenv.sh   (prints nothing when the venv is already there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${HAUL_TEST_VENV:-$PWD/target/pyenv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import duckdb, pyarrow, pyarrow.flight, deltalake" 2>/dev/null; then
  echo "pyenv: making $VENV (DuckDB, pyarrow, delta-rs)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q duckdb==1.5.5 pyarrow==26.0.1 deltalake==1.6.6
fi
