#!/usr/bin/env bash
# Runs haul's whole test suite against real services (started here if needed).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/services.sh
export HAUL_TEST_PG="${HAUL_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}"
cargo build --bin haul
cargo test --workspace "$@"
