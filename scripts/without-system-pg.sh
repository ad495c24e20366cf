#!/usr/bin/env bash
# Runs a command as on a machine without PostgreSQL installed: the system's
# PostgreSQL (Debian's /usr/lib/postgresql, the pg_wrapper scripts behind
# /usr/bin/psql, pg_dump, pgbench …) is hidden in a private mount namespace,
# so only what scripts/fetch-pg.sh fetched can be found. Needs root.
#
#   scripts/without-system-pg.sh ./scripts/test.sh
#   scripts/without-system-pg.sh cargo run --release -- demo
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG ...]" >&2
  exit 2
fi
if [ -z "${PGSHIFT_HIDDEN_PG:-}" ]; then
  export PGSHIFT_HIDDEN_PG=1
  exec unshare --mount --propagation private "$0" "$@"
fi
empty=$(mktemp -d)
for d in /usr/lib/postgresql /usr/share/postgresql-common /usr/share/postgresql; do
  [ -d "$d" ] && mount --bind "$empty" "$d"
done
if command -v postgres >/dev/null 2>&1 || command -v psql >/dev/null 2>&1; then
  echo "without-system-pg: PostgreSQL is still on PATH: $(command -v postgres psql | tr '\n' ' ')" >&2
  exit 1
fi
echo "without-system-pg: the system's PostgreSQL is hidden" >&2
exec "$@"
