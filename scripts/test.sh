#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start
# their own throwaway PostgreSQL clusters (server binaries must be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --all-targets --no-fail-fast -- --test-threads "${PGSHIFT_TEST_THREADS:-4}" "$@"
