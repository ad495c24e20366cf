#!/usr/bin/env bash
# Initial copy (schema + data + indexes) of a pgbench database: pgshift vs
# pg_dump -Fd -j 2 | pg_restore -j 2, pgcopydb clone, and native logical
# replication's initial sync, each onto a fresh target cluster (same
# settings) from the same source cluster, in one run. Prints seconds and the
# ratio peer/pgshift (> 1: pgshift faster); appends JSON lines to
# bench/results/copy.jsonl.
#
#   bench/copy.sh                      # scale 50 (5M accounts, ~750 MB)
#   SCALE=20 REPS=2 bench/copy.sh
#   MODE=offline bench/copy.sh         # time pgshift until Succeeded instead
#
# Every method gets 2 jobs; pgshift and pgcopydb split tables larger than
# SPLIT (64MB) into parallel ranges. Methods run interleaved in each rep, the
# table reports the median per method.
#
# pgshift is timed from `pgshift run` starting until /status reaches
# WaitingForCutoverTrigger (online: slot + snapshot, schema, parallel copy,
# indexes, streaming started) or Succeeded (offline); nothing subtracted.
set -euo pipefail
SCALE=${SCALE:-50}
REPS=${REPS:-1}
MODE=${MODE:-online}
METHODS=${METHODS:-pgshift pg_dump pgcopydb native}
SPLIT=${SPLIT:-64MB}
export EXTRA_MIGRATION_CONF="split_tables_larger_than = \"$SPLIT\""
DB=bench
source "$(dirname "$0")/lib.sh"
build_pgshift

start_cluster src
SRC=$src_PORT
q "$SRC" postgres "CREATE DATABASE $DB"
t0=$(now)
"$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -i -q -s "$SCALE" "$DB" >/dev/null 2>&1
add_history_key "$SRC" "$DB"
q "$SRC" "$DB" "VACUUM ANALYZE" >/dev/null
SIZE=$(q "$SRC" "$DB" "SELECT pg_size_pretty(pg_database_size('$DB'))")
ROWS=$(q "$SRC" "$DB" "SELECT count(*) FROM pgbench_accounts")
echo "source: pgbench scale $SCALE, $ROWS accounts, $SIZE (loaded in $(elapsed "$t0")s)"
SRC_URL="postgres://postgres:$PW@127.0.0.1:$SRC/$DB?sslmode=disable"

# The copy is complete when the target has every row; checked outside the timing.
check_target() { # PORT
  local n
  n=$(q "$1" "$DB" "SELECT count(*) FROM pgbench_accounts") || n=0
  [ "$n" = "$ROWS" ] || { echo "  !! target has $n of $ROWS accounts" >&2; return 1; }
  local idx
  idx=$(q "$1" "$DB" "SELECT count(*) FROM pg_indexes WHERE tablename LIKE 'pgbench_%'")
  [ "$idx" -ge 4 ] || { echo "  !! target has only $idx indexes" >&2; return 1; }
}

fresh_target() {
  [ -n "${tgt_PORT:-}" ] && stop_cluster tgt
  start_cluster tgt
  TGT=$tgt_PORT
}

# Whatever a method left on the source (slots, publications) is removed so
# the next one starts equal.
clean_source() {
  q "$SRC" "$DB" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active" >/dev/null || true
  for p in $(q "$SRC" "$DB" "SELECT pubname FROM pg_publication"); do
    q "$SRC" "$DB" "DROP PUBLICATION \"$p\"" >/dev/null
  done
}

run_pgshift() {
  write_pgshift_config "$WORK/copy.toml" "$SRC" "$TGT" "$DB" "$MODE"
  local cond='s.get("substate")=="WaitingForCutoverTrigger"'
  [ "$MODE" = offline ] && cond='s.get("state")=="Succeeded"'
  local t
  t=$(now)
  start_pgshift "$WORK/copy.toml" "$WORK/pgshift-copy.log"
  wait_status "$ADMIN_PORT" "$cond" 3600 >/dev/null || { tail -20 "$WORK/pgshift-copy.log" >&2; return 1; }
  SECS=$(elapsed "$t")
  stop_pgshift
}

run_pg_dump() {
  q "$TGT" postgres "CREATE DATABASE $DB"
  rm -rf "$WORK/dump"
  local t
  t=$(now)
  "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -Fd -j 2 -f "$WORK/dump" "$DB"
  "$PGBIN/pg_restore" -h 127.0.0.1 -p "$TGT" -j 2 -d "$DB" "$WORK/dump"
  SECS=$(elapsed "$t")
  rm -rf "$WORK/dump"
}

run_pgcopydb() {
  q "$TGT" postgres "CREATE DATABASE $DB"
  rm -rf "$WORK/pgcopydb"
  local t
  t=$(now)
  pgcopydb clone --source "$SRC_URL" \
    --target "postgres://postgres:$PW@127.0.0.1:$TGT/$DB?sslmode=disable" \
    --table-jobs 2 --index-jobs 2 --split-tables-larger-than "$SPLIT" --dir "$WORK/pgcopydb" >"$WORK/pgcopydb.log" 2>&1 ||
    { tail -20 "$WORK/pgcopydb.log" >&2; return 1; }
  SECS=$(elapsed "$t")
  rm -rf "$WORK/pgcopydb"
}

run_native() {
  q "$TGT" postgres "CREATE DATABASE $DB"
  "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -s "$DB" | "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$TGT" -d "$DB" >/dev/null
  q "$SRC" "$DB" "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
  local t
  t=$(now)
  q "$TGT" "$DB" "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$SRC dbname=$DB user=postgres password=$PW' PUBLICATION bench_pub" >/dev/null
  while :; do
    local pending
    pending=$(q "$TGT" "$DB" "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")
    local total
    total=$(q "$TGT" "$DB" "SELECT count(*) FROM pg_subscription_rel")
    [ "$pending" = 0 ] && [ "$total" -gt 0 ] && break
    sleep 0.1
  done
  SECS=$(elapsed "$t")
  q "$TGT" "$DB" "DROP SUBSCRIPTION bench_sub" >/dev/null
}

if ! command -v pgcopydb >/dev/null; then
  echo "pgcopydb not found (Debian: apt-get install -y pgcopydb): skipped"
  METHODS=${METHODS/pgcopydb/}
fi

RES="$WORK/copy.txt"; : > "$RES"
for rep in $(seq "$REPS"); do
  for m in $METHODS; do
    fresh_target
    SECS=
    if "run_$m"; then
      ok=ok; check_target "$TGT" || ok=incomplete
    else
      ok=failed; SECS=0
    fi
    clean_source
    echo "  rep $rep  $m: ${SECS}s ($ok)" >&2
    echo "$m $rep $SECS $ok" >> "$RES"
  done
done

CMD="SCALE=$SCALE REPS=$REPS MODE=$MODE SPLIT=$SPLIT bench/copy.sh"
echo
echo "copy of pgbench scale $SCALE ($SIZE), $REPS rep(s), median seconds; ratio = peer/pgshift (> 1: pgshift faster)"
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.2f}" if v else 0)' $(awk -v m="$1" '$1==m && $4=="ok"{print $3}' "$RES"); }
printf '%-10s %10s %8s %s\n' method seconds ratio status
PGS=$(median pgshift)
for m in $METHODS; do
  mean=$(median "$m")
  st=$(awk -v m="$m" '$1==m{st=$4} END{print st}' "$RES")
  r=n/a; [ "$PGS" != 0 ] && [ "$mean" != 0 ] && r=$(ratio "$mean" "$PGS")
  printf '%-10s %10s %8s %s\n' "$m" "$mean" "$r" "$st"
  record copy.jsonl "{\"bench\":\"copy\",\"method\":\"$m\",\"scale\":$SCALE,\"size\":\"$SIZE\",\"reps\":$REPS,\"mode\":\"$MODE\",\"seconds\":$mean,\"ratio_vs_pgshift\":\"$r\",\"status\":\"$st\",\"command\":\"$CMD\",\"machine\":$(machine_json)}"
done
