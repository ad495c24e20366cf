#!/usr/bin/env bash
# Initial-copy benchmark: one source and one target cluster, `pgbench -i -s $SCALE`
# on the source, then the same database copied (schema + data + indexes) by
#   1. pgshift's initial copy (examples/initial_copy.rs: the migration's copy path)
#   2. pg_dump -Fd -j $JOBS, then pg_restore -j $JOBS
#   3. pgcopydb clone --table-jobs $JOBS --index-jobs $JOBS (if installed)
#   4. native logical replication: CREATE SUBSCRIPTION until every table is ready
#      (schema restored beforehand, not timed)
# in ROUNDS interleaved rounds, and prints each method's median time and its
# ratio to pgshift's (above 1: pgshift is faster).
#
# usage: SCALE=50 JOBS=2 ROUNDS=3 bench/copy.sh   (as root or a user that can run initdb)
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=${SCALE:-50}
JOBS=${JOBS:-2}
SPLIT=${SPLIT:-64MB}  # migration.split_tables_larger_than (and pgcopydb's --split-tables-larger-than)
SRC_PORT=${SRC_PORT:-55432}
TGT_PORT=${TGT_PORT:-55433}
BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /tmp/pgshift-bench.XXXXXX)
SRC="postgres://postgres@127.0.0.1:$SRC_PORT/postgres"
TGT="postgres://postgres@127.0.0.1:$TGT_PORT/postgres"

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_src() { "$BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SRC_PORT" -U postgres "$@"; }
psql_tgt() { "$BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$TGT_PORT" -U postgres "$@"; }

cleanup() {
  for c in src tgt; do
    [ -f "$WORK/$c/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$WORK/$c" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] && chown postgres "$WORK"
for c in src tgt; do
  as_pg "$BIN/initdb" -D "$WORK/$c" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 --no-sync --no-instructions >/dev/null
  cat >>"$WORK/$c/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_worker_processes = 16
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
EOF
done
as_pg "$BIN/pg_ctl" -D "$WORK/src" -l "$WORK/src.log" -o "-p $SRC_PORT" -w start >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/tgt" -l "$WORK/tgt.log" -o "-p $TGT_PORT" -w start >/dev/null

echo "loading pgbench -i -s $SCALE on the source ..."
psql_src -d postgres -c "CREATE DATABASE bench"
"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$SRC_PORT" -U postgres bench >/dev/null 2>&1
psql_src -d bench -c "VACUUM ANALYZE" -c "CHECKPOINT"
SIZE=$(psql_src -d bench -c "SELECT pg_size_pretty(pg_database_size('bench'))")
ROWS=$((SCALE * 100000))
echo "source: $SIZE, $ROWS rows in pgbench_accounts; jobs=$JOBS"

cargo build --release --quiet --example initial_copy
PGSHIFT=target/release/examples/initial_copy

reset_target() {
  psql_tgt -d postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CHECKPOINT"
  psql_src -d postgres -c "CHECKPOINT"
}
check_target() {
  local n
  n=$(psql_tgt -d bench -c "SELECT count(*) FROM pgbench_accounts")
  local idx
  idx=$(psql_tgt -d bench -c "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relname LIKE 'pgbench_%' AND i.indisprimary")
  if [ "$n" != "$ROWS" ] || [ "$idx" != "3" ]; then
    echo "  WRONG RESULT: $n rows, $idx primary keys" >&2
    exit 1
  fi
}
now() { date +%s.%N; }
declare -A T

# PGSHIFT_ONLY=1: measure pgshift alone (when tuning), with each split setting in $SPLITS.
if [ -n "${PGSHIFT_ONLY:-}" ]; then
  for sp in ${SPLITS:-$SPLIT}; do
    reset_target
    echo "pgshift with split at $sp:"
    TIMEFORMAT="  (pgshift process: %U s user, %S s system CPU)"; time "$PGSHIFT" "${SRC%/postgres}/bench" "$TGT" bench "$JOBS" "$sp"
  done
  exit 0
fi

run_pgshift() {
  reset_target
  local s; s=$(now)
  "$PGSHIFT" "${SRC%/postgres}/bench" "$TGT" bench "$JOBS" "$SPLIT" >&2
  echo "$(now) - $s" | bc
  check_target
}

run_pg_dump_restore() {
  reset_target
  rm -rf "$WORK/dump"
  local s; s=$(now)
  "$BIN/pg_dump" -Fd -j "$JOBS" -h 127.0.0.1 -p "$SRC_PORT" -U postgres -f "$WORK/dump" bench
  psql_tgt -d postgres -c "CREATE DATABASE bench"
  "$BIN/pg_restore" -j "$JOBS" -h 127.0.0.1 -p "$TGT_PORT" -U postgres -d bench "$WORK/dump"
  echo "$(now) - $s" | bc
  check_target
}

run_pgcopydb() {
  reset_target
  rm -rf "$WORK/pgcopydb"
  psql_tgt -d postgres -c "CREATE DATABASE bench"
  local s; s=$(now)
  PGCOPYDB_SOURCE_PGURI="postgres://postgres@127.0.0.1:$SRC_PORT/bench" \
  PGCOPYDB_TARGET_PGURI="postgres://postgres@127.0.0.1:$TGT_PORT/bench" \
    pgcopydb clone --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT_BYTES" \
      --dir "$WORK/pgcopydb" >"$WORK/pgcopydb.log" 2>&1 \
    || { tail -20 "$WORK/pgcopydb.log" >&2; exit 1; }
  echo "$(now) - $s" | bc
  check_target
}

run_native_logical() {
  reset_target
  psql_tgt -d postgres -c "CREATE DATABASE bench"
  "$BIN/pg_dump" -s -h 127.0.0.1 -p "$SRC_PORT" -U postgres bench | psql_tgt -d bench >/dev/null
  psql_src -d bench -c "DROP PUBLICATION IF EXISTS bench_pub" -c "CREATE PUBLICATION bench_pub FOR ALL TABLES"
  local s; s=$(now)
  psql_tgt -d bench -c "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$SRC_PORT dbname=bench user=postgres' PUBLICATION bench_pub" 2>/dev/null
  until [ "$(psql_tgt -d bench -c "SELECT count(*) FILTER (WHERE srsubstate = 'r') = 4 FROM pg_subscription_rel")" = "t" ]; do
    sleep 0.05
  done
  echo "$(now) - $s" | bc
  psql_tgt -d bench -c "DROP SUBSCRIPTION bench_sub" 2>/dev/null
  check_target
}

# pgcopydb takes the split threshold in bytes.
SPLIT_BYTES=$(echo "$SPLIT" | sed -E 's/[kK][bB]$/*1024/; s/MB$/*1048576/; s/GB$/*1073741824/' | bc)
METHODS="pgshift pg_dump_restore native_logical"
if command -v pgcopydb >/dev/null 2>&1; then
  METHODS="pgshift pg_dump_restore pgcopydb native_logical"
else
  echo "pgcopydb not installed (apt-get install -y pgcopydb): skipped"
fi
ROUNDS=${ROUNDS:-3}
declare -A T
# Rounds interleave the methods so that load from elsewhere on the machine
# hits all of them alike; the median of each is reported.
for r in $(seq 1 "$ROUNDS"); do
  for m in $METHODS; do
    t=$("run_$m")
    printf "round %d  %-18s %8.2f s\n" "$r" "$m" "$t"
    T[$m]="${T[$m]:-} $t"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo
echo "scale $SCALE ($SIZE), jobs $JOBS, split tables larger than $SPLIT, $ROUNDS rounds (median)"
printf "%-20s %10s %16s\n" "method" "seconds" "time / pgshift"
P=$(echo "${T[pgshift]}" | median)
for m in $METHODS; do
  v=$(echo "${T[$m]}" | median)
  printf "%-20s %10.2f %15.2fx\n" "$m" "$v" "$(echo "$v / $P" | bc -l)"
done
