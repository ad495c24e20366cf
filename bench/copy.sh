#!/usr/bin/env bash
# Initial copy (schema + data + indexes) onto an empty target: pgshift's
# whole `run` until streaming vs `pgcopydb clone` and native logical
# replication's initial sync (and optionally pg_dump -Fd -j | pg_restore -j),
# each onto a fresh target cluster (same settings) from the same source
# cluster, in one run, for two shapes:
#   pgbench  pgbench at SCALE (100: 10M accounts, ~1.5 GB)
#   many     MANY small tables of SMALL_ROWS rows (a primary key and one more
#            index each) plus one table of BIG_ROWS rows, larger than all
#            the others together (same columns and indexes)
# Prints seconds, the ratio peer/pgshift (> 1: pgshift faster), pgshift's
# peak RSS (VmHWM) and its per-phase timings from its log; appends JSON
# lines to bench/results/copy.jsonl.
#
#   bench/copy.sh                      # both shapes, scale 100, 200 tables
#   SHAPES=pgbench SCALE=20 REPS=2 bench/copy.sh
#   MODE=offline bench/copy.sh         # time pgshift until Succeeded instead
#
# Every method gets JOBS (2) jobs: pgshift copy_jobs (index_jobs defaults to
# it), pgcopydb --table-jobs and --index-jobs, native
# max_sync_workers_per_subscription; pgshift and pgcopydb split tables
# larger than SPLIT (64MB) into parallel ranges. Methods run interleaved in
# each rep, the table reports the median per method.
#
# pgshift is timed from `pgshift run` starting until /status reaches
# WaitingForCutoverTrigger (online: slot + snapshot, schema, parallel copy,
# indexes, streaming started) or Succeeded (offline); nothing subtracted.
# pgcopydb clone is timed whole (it also runs VACUUM ANALYZE per table, its
# default); native from CREATE SUBSCRIPTION until every table is ready, with
# its schema (and so its indexes, maintained row by row) restored untimed
# before.
set -euo pipefail
SHAPES=${SHAPES:-pgbench many}
SCALE=${SCALE:-100}
MANY=${MANY:-200}
SMALL_ROWS=${SMALL_ROWS:-20000}
BIG_ROWS=${BIG_ROWS:-$((MANY * SMALL_ROWS * 3 / 2))}
REPS=${REPS:-1}
MODE=${MODE:-online}
METHODS=${METHODS:-pgshift pgcopydb native}
SPLIT=${SPLIT:-64MB}
JOBS=${JOBS:-2}
export COPY_JOBS=$JOBS
export EXTRA_MIGRATION_CONF="split_tables_larger_than = \"$SPLIT\""
DB=bench
source "$(dirname "$0")/lib.sh"
build_pgshift

start_cluster src
SRC=$src_PORT
SRC_URL="postgres://postgres:$PW@127.0.0.1:$SRC/$DB?sslmode=disable"

# load_SHAPE: (re)creates $DB on the source; sets SIZE, CHECK_TABLE, ROWS, INDEXES, DESC.
load_pgbench() {
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -i -q -s "$SCALE" "$DB" >/dev/null 2>&1
  add_history_key "$SRC" "$DB"
  CHECK_TABLE=pgbench_accounts
  DESC="pgbench scale $SCALE"
}

load_many() {
  local i
  for i in $(seq "$MANY"); do
    printf "CREATE TABLE s_%03d(id int PRIMARY KEY, a int, b text, c timestamptz);
      INSERT INTO s_%03d SELECT g, g %% 1000, md5(g::text), now() FROM generate_series(1, %d) g;
      CREATE INDEX ON s_%03d (a);\n" "$i" "$i" "$SMALL_ROWS" "$i"
  done | "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$SRC" -d "$DB" -v ON_ERROR_STOP=1 >/dev/null
  q "$SRC" "$DB" "CREATE TABLE big(id int PRIMARY KEY, a int, b text, c timestamptz);
    INSERT INTO big SELECT g, g % 1000, md5(g::text), now() FROM generate_series(1, $BIG_ROWS) g;
    CREATE INDEX ON big (a)" >/dev/null
  CHECK_TABLE=big
  DESC="$MANY tables of $SMALL_ROWS rows + one of $BIG_ROWS rows"
}

load_shape() { # SHAPE
  q "$SRC" postgres "DROP DATABASE IF EXISTS $DB" >/dev/null
  q "$SRC" postgres "CREATE DATABASE $DB" >/dev/null
  local t0
  t0=$(now)
  "load_$1"
  q "$SRC" "$DB" "VACUUM ANALYZE" >/dev/null
  SIZE=$(q "$SRC" "$DB" "SELECT pg_size_pretty(pg_database_size('$DB'))")
  ROWS=$(q "$SRC" "$DB" "SELECT count(*) FROM $CHECK_TABLE")
  INDEXES=$(q "$SRC" "$DB" "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  BIG_SIZE=$(q "$SRC" "$DB" "SELECT pg_size_pretty(pg_table_size('$CHECK_TABLE'))")
  echo "source ($1): $DESC, $SIZE, $CHECK_TABLE $BIG_SIZE, $INDEXES indexes (loaded in $(elapsed "$t0")s)"
}

# The copy is complete when the target has every row and index; checked outside the timing.
check_target() { # PORT
  local n idx
  n=$(q "$1" "$DB" "SELECT count(*) FROM $CHECK_TABLE") || n=0
  [ "$n" = "$ROWS" ] || { echo "  !! target has $n of $ROWS rows in $CHECK_TABLE" >&2; return 1; }
  idx=$(q "$1" "$DB" "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
  [ "$idx" = "$INDEXES" ] || { echo "  !! target has $idx of $INDEXES indexes" >&2; return 1; }
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
  q "$SRC" "$DB" "DROP SCHEMA IF EXISTS pgshift CASCADE" >/dev/null 2>&1 || true
}

# Seconds from pgshift's first log line to the first line matching each
# phase's marker (its log timestamps), as "phase=seconds ...".
phases() { # LOG
  python3 - "$1" <<'PY'
import re, sys
from datetime import datetime
marks = [("slot", "slot created"), ("pre_data", "section=\"?pre-data"),
         ("post_dump", "post-data dumped"), ("copied", "database copied"),
         ("indexes", "post-data restored"), ("streaming", "WaitingForCutoverTrigger|streaming")]
ts = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)")
first, seen = None, {}
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    m = ts.search(line[:40])
    if not m:
        continue
    t = datetime.fromisoformat(m.group(1)[:26])
    first = first or t
    for name, pat in marks:
        if name not in seen and re.search(pat, line):
            seen[name] = (t - first).total_seconds()
print(" ".join(f"{n}={seen[n]:.2f}" for n, _ in marks if n in seen))
PY
}

run_pgshift() {
  write_pgshift_config "$WORK/copy.toml" "$SRC" "$TGT" "$DB" "$MODE"
  local cond='s.get("substate")=="WaitingForCutoverTrigger"'
  [ "$MODE" = offline ] && cond='s.get("state")=="Succeeded"'
  local t
  : > "$WORK/pgshift-copy.log"
  t=$(now)
  start_pgshift "$WORK/copy.toml" "$WORK/pgshift-copy.log"
  wait_status "$ADMIN_PORT" "$cond" 3600 >/dev/null || { tail -20 "$WORK/pgshift-copy.log" >&2; return 1; }
  SECS=$(elapsed "$t")
  # VmHWM: the process's peak resident set since it started.
  RSS_MB=$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$SHIFT_PID/status")
  # pgshift's own CPU time (user + system) over the run, to tell its share
  # from the servers'.
  CPU_S=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$SHIFT_PID/stat")
  PHASES=$(phases "$WORK/pgshift-copy.log")
  stop_pgshift
}

run_pg_dump() {
  q "$TGT" postgres "CREATE DATABASE $DB"
  rm -rf "$WORK/dump"
  local t
  t=$(now)
  "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -Fd -j "$JOBS" -f "$WORK/dump" "$DB"
  "$PGBIN/pg_restore" -h 127.0.0.1 -p "$TGT" -j "$JOBS" -d "$DB" "$WORK/dump"
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
    --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT" --dir "$WORK/pgcopydb" >"$WORK/pgcopydb.log" 2>&1 ||
    { tail -20 "$WORK/pgcopydb.log" >&2; return 1; }
  SECS=$(elapsed "$t")
  rm -rf "$WORK/pgcopydb"
}

run_native() {
  q "$TGT" postgres "CREATE DATABASE $DB"
  "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -s "$DB" | "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$TGT" -d "$DB" >/dev/null
  bench_pub "$SRC" "$DB"
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
  echo "pgcopydb not found (Debian: apt-get install -y pgcopydb): skipped" >&2
  METHODS=${METHODS/pgcopydb/}
fi

CMD="SHAPES=\"$SHAPES\" SCALE=$SCALE MANY=$MANY SMALL_ROWS=$SMALL_ROWS BIG_ROWS=$BIG_ROWS REPS=$REPS MODE=$MODE JOBS=$JOBS SPLIT=$SPLIT bench/copy.sh"
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.2f}" if v else 0)' "$@"; }
SUMMARY="$WORK/summary.txt"; : > "$SUMMARY"
for shape in $SHAPES; do
  load_shape "$shape"
  RES="$WORK/copy-$shape.txt"; : > "$RES"
  for rep in $(seq "$REPS"); do
    for m in $METHODS; do
      fresh_target
      SECS= RSS_MB= PHASES= CPU_S=
      if "run_$m"; then
        ok=ok; check_target "$TGT" || ok=incomplete
      else
        ok=failed; SECS=0
      fi
      clean_source
      extra=""
      [ "$m" = pgshift ] && extra=" peak RSS ${RSS_MB} MB, CPU ${CPU_S}s; $PHASES"
      echo "  $shape rep $rep  $m: ${SECS}s ($ok)$extra" >&2
      echo "$m $rep $SECS $ok ${RSS_MB:-0}" >> "$RES"
      [ "$m" = pgshift ] && echo "$shape $rep $PHASES $CPU_S" >> "$WORK/phases.txt"
    done
  done
  {
    echo
    echo "$shape: $DESC ($SIZE), $REPS rep(s), median seconds; ratio = peer/pgshift (> 1: pgshift faster)"
    printf '%-10s %10s %8s %8s %s\n' method seconds ratio rss_MB status
    PGS=$(median $(awk '$1=="pgshift" && $4=="ok"{print $3}' "$RES"))
    for m in $METHODS; do
      med=$(median $(awk -v m="$m" '$1==m && $4=="ok"{print $3}' "$RES"))
      st=$(awk -v m="$m" '$1==m{st=$4} END{print st}' "$RES")
      rss=-; [ "$m" = pgshift ] && rss=$(awk '$1=="pgshift"{if ($5>x) x=$5} END{print x+0}' "$RES")
      r=n/a; [ "$PGS" != 0 ] && [ "$med" != 0 ] && r=$(ratio "$med" "$PGS")
      printf '%-10s %10s %8s %8s %s\n' "$m" "$med" "$r" "$rss" "$st"
      record copy.jsonl "{\"bench\":\"copy\",\"shape\":\"$shape\",\"method\":\"$m\",\"scale\":$SCALE,\"size\":\"$SIZE\",\"reps\":$REPS,\"mode\":\"$MODE\",\"jobs\":$JOBS,\"seconds\":$med,\"ratio_vs_pgshift\":\"$r\",\"peak_rss_mb\":\"$rss\",\"status\":\"$st\",\"command\":\"$CMD\",\"machine\":$(machine_json)}"
    done
  } >> "$SUMMARY"
done

# stdout: the sources (printed as loaded), a blank line, then the tables
# (report.py splits there) and pgshift's phases.
cat "$SUMMARY"
echo
echo "pgshift phases: seconds since its start when its log shows the slot created, pre-data restored, post-data dumped, every table copied, every index and constraint done, streaming; its own CPU seconds"
printf '%-8s %4s %6s %9s %10s %7s %8s %10s %8s\n' shape rep slot pre_data post_dump copied indexes streaming cpu_s
awk '{v["slot"]=v["pre_data"]=v["post_dump"]=v["copied"]=v["indexes"]=v["streaming"]="-";
      for (i = 3; i < NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "%-8s %4s %6s %9s %10s %7s %8s %10s %8s\n", $1, $2, v["slot"], v["pre_data"], v["post_dump"], v["copied"], v["indexes"], v["streaming"], $NF}' "$WORK/phases.txt"
