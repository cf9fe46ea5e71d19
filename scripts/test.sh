#!/usr/bin/env bash
# Runs haul's whole test suite against real services (started here if needed).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/services.sh
export HAUL_TEST_PG="${HAUL_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
# independent readers (DuckDB, pyarrow, pyarrow.flight) for the reader tests, in a venv of our own
bash scripts/pyenv.sh
export HAUL_TEST_PYTHON="${HAUL_TEST_VENV:-$PWD/target/pyenv}/bin/python"
# dbt, Prefect, Dagster and Airflow for the medallion example's test, a venv each
export HAUL_TEST_VENVS="${HAUL_TEST_VENVS:-$PWD/target/venvs}"
bash scripts/pipeline-tools.sh
# the TLS test makes its certificates with the openssl CLI
if ! command -v openssl >/dev/null; then
  SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
# TLS where the TLS tests look for it: a TLS-only Postgres (own CA, SCRAM passwords,
# client certificates), RabbitMQ's amqps:// listener, a rediss:// Redis
bash scripts/test-services.sh
export HAUL_TLS_DIR="${HAUL_TLS_DIR:-/var/tmp/haul-tls}" HAUL_PGTLS_PORT="${HAUL_PGTLS_PORT:-5442}"
# the Kubernetes manifests: rendered and validated offline (schemas, promtool, yamllint)
bash scripts/check-k8s.sh
# the container image every role runs: built with buildah, then run (non-root, --version,
# an extract read back); the release build in it is cached between runs
bash scripts/build-image.sh
# the binary the tests spawn, with its test-only hooks (fault injection)
cargo build --bin haul --features testsuite
cargo test --workspace "$@"
# README.md's blocks, run as pasted (last: they rebuild target/debug/haul without the
# test-only hooks and run a cluster on the default ports)
if [ $# -eq 0 ]; then bash scripts/readme-check.sh; fi
