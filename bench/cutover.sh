#!/usr/bin/env bash
# Cutover write pause under load: pgbench TPC-B through the pgshift proxy at
# a steady rate (-R, -M prepared, persistent connections), `pgshift cutover`
# triggered mid-run, REPS times with a fresh migration each; versus
# PgBouncer's manual procedure (transaction mode; PAUSE → marker row applied
# by a native subscription → sequences → repoint → RELOAD → RESUME) on a
# fresh pair of clusters each time. Reports the write pause (median, max),
# the client-side latency spike (max per-transaction latency, from
# pgbench -l) and failed transactions. The first pgshift run's
# /status is recorded every 200 ms to bench/results/lag-cutover-rep1.csv (the
# plot comes from bench/lag_run.sh). Appends JSON lines to bench/results/cutover.jsonl.
#
# What clients felt per phase (bench/phase_stall.py): the longest
# transaction in progress during pre-warming, the catch-up before the gate,
# the pause, and the second after the gate opened — for PgBouncer, its pause
# and the second after RESUME.
#
#   bench/cutover.sh                   # 5 reps, scale 5, 4 clients at 100 tx/s, 20 s runs
#   REPS=7 RATE=400 bench/cutover.sh
#   DBS="bench bench2" bench/cutover.sh                      # a load on each of two databases
#   CLIENTS=500 RATE=100 SYSTEMS=pgshift MAX_CONNECTIONS=1200 bench/cutover.sh   # 500 sessions
#
# PgBouncer 1.18 cannot keep prepared statements in transaction mode, so its
# clients run -M simple (BOUNCER_MODE), and pgshift is also measured with
# -M simple (pgshift_simple) for a like-for-like row; in session mode its PAUSE waits for
# the clients to disconnect, which pgbench's persistent clients never do.
set -euo pipefail
REPS=${REPS:-5}
SCALE=${SCALE:-5}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-100}
DURATION=${DURATION:-20}
BOUNCER_MODE=${BOUNCER_MODE:-simple}
SYSTEMS=${SYSTEMS:-pgshift pgshift_simple pgbouncer}
# One pgbench load (CLIENTS clients at RATE tx/s) per database.
DBS=${DBS:-bench}
DB=${DBS%% *}
source "$(dirname "$0")/lib.sh"
# Every session holds a client socket, a backend and a pre-warmed backend.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
build_pgshift
command -v pgbouncer >/dev/null || { echo "pgbouncer not found (apt-get install -y pgbouncer): compared with nothing" >&2; SYSTEMS=pgshift; }

# A fresh source (pgbench data) and an empty target.
fresh_pair() {
  [ -n "${src_PORT:-}" ] && { stop_cluster src; stop_cluster tgt; rm -rf "$WORK/src" "$WORK/tgt"; }
  start_cluster src
  start_cluster tgt
  SRC=$src_PORT TGT=$tgt_PORT
  local db
  for db in $DBS; do
    q "$SRC" postgres "CREATE DATABASE $db"
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -i -q -s "$SCALE" "$db" >/dev/null 2>&1
    add_history_key "$SRC" "$db"
  done
}

# load PORT MODE PREFIX: a pgbench per database in the background →
# LOAD_PIDS; per-transaction logs under PREFIX-DB.
load() {
  local db
  LOAD_PIDS=()
  for db in $DBS; do
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$1" -n -M "$2" -c "$CLIENTS" -j 2 -R "$RATE" -T "$DURATION" \
      -l --log-prefix="$3-$db" "$db" >"$3-$db.out" 2>&1 &
    LOAD_PIDS+=("$!")
    BG_PIDS+=("$!")
  done
}

wait_load() { local p; for p in "${LOAD_PIDS[@]}"; do wait "$p" || true; done; }

# phase_stalls WINDOWS_JSON PREFIX → "prewarm=ms,catchup=ms,pause=ms,after=ms,base=ms"
phase_stalls() {
  python3 "$BENCH_DIR/phase_stall.py" "$1" "$2-*.[0-9]*" | tr ' ' ','
}

# client_stats PREFIX → "processed failed aborted_clients spike_ms p50_ms": the longest and
# the median transaction latency (without -R schedule lag, which on a busy
# machine is noise; a transaction held by a pause counts its wait).
client_stats() {
  local processed failed aborted
  processed=$(cat "$1"-*.out | awk '/number of transactions actually processed/{split($NF,a,"/"); n += a[1]} END {print n + 0}')
  failed=$(cat "$1"-*.out | awk '/number of failed transactions/{n += $5} END {print n + 0}')
  aborted=$(cat "$1"-*.out | grep -c 'client [0-9]* .*aborted' || true)
  # -l lines: client tx_no time_us script epoch_s epoch_us [schedule_lag_us]
  cat "$1"-*.[0-9]* 2>/dev/null | python3 -c '
import sys
v = sorted(int(f[2]) / 1000 for f in (l.split() for l in sys.stdin) if len(f) >= 6 and f[2].isdigit())
print(f"{max(v):.1f} {v[len(v)//2]:.1f}" if v else "0 0")' | { read -r spike p50; echo "${processed:-0} ${failed:-0} $aborted $spike $p50"; }
}

RES="$WORK/cutover.txt"; : > "$RES"

run_pgshift() { # rep [label mode]
  local label=${2:-pgshift} mode=${3:-prepared}
  fresh_pair
  write_pgshift_config "$WORK/cut.toml" "$SRC" "$TGT" "$DBS" online
  local log="$WORK/pgshift-cut-$1.log" rec=""
  start_pgshift "$WORK/cut.toml" "$log"
  if [ "$1" = 1 ] && [ "$label" = pgshift ]; then
    python3 "$BENCH_DIR/lag_record.py" "http://127.0.0.1:$ADMIN_PORT/status" "$WORK/lag.csv" & rec=$!
    BG_PIDS+=("$rec")
  fi
  wait_status "$ADMIN_PORT" 's.get("substate")=="WaitingForCutoverTrigger"' 600 >/dev/null ||
    { tail -30 "$log" >&2; return 1; }
  local prefix="$WORK/pgb-$label-$1"
  load "$SHIFT_PORT" "$mode" "$prefix"
  sleep $((DURATION / 2))
  "$PGSHIFT" cutover --config "$WORK/cut.toml" >/dev/null 2>&1 || true
  wait_status "$ADMIN_PORT" 's.get("state")=="Succeeded" or (s.get("last_cutover") or {}).get("outcome") in ("aborted","failed")' 120 >/dev/null || true
  local outcome pause phases
  read -r outcome pause phases < <(status_json "$ADMIN_PORT" | python3 -c '
import json,sys; c=json.load(sys.stdin).get("last_cutover") or {}
ph=",".join("%s=%.1f" % (p["phase"], p["seconds"] * 1000) for p in c.get("phases", []))
print(c.get("outcome","none"), c.get("pause_seconds") or 0, ph or "-")')
  echo "  $label $1 phases (ms): $phases" >&2
  status_json "$ADMIN_PORT" | python3 -c '
import json,sys; c=json.load(sys.stdin).get("last_cutover") or {}
print("  switch:", next((p.get("detail","") for p in c.get("phases",[]) if p["phase"]=="switch"), "-"))' >&2
  echo "$label $1 $phases" >> "$RESULTS_DIR/cutover-phases.txt"
  status_json "$ADMIN_PORT" > "$WORK/status-$label-$1.json"
  wait_load
  sleep 1
  if [ -n "$rec" ]; then kill "$rec"; wait "$rec" 2>/dev/null || true; cp "$WORK/lag.csv" "$RESULTS_DIR/lag-cutover-rep1.csv"; fi
  stop_pgshift
  [ "$outcome" = succeeded ] || echo "  !! pgshift cutover $outcome; see log tail:" >&2
  [ "$outcome" = succeeded ] || tail -5 "$log" >&2
  echo "$label $1 $outcome $pause $(client_stats "$prefix") $(phase_stalls "$WORK/status-$label-$1.json" "$prefix")" | tee -a "$RES" >&2
}

# The same with -M simple: like for like with PgBouncer in transaction mode.
run_pgshift_simple() { run_pgshift "$1" pgshift_simple simple; }

run_pgbouncer() { # rep
  fresh_pair
  # A native subscription per database; the marker table exists on both sides.
  local db lines=""
  for db in $DBS; do
    q "$SRC" "$db" "CREATE TABLE bench_switch_marker (id int PRIMARY KEY)"
    q "$TGT" postgres "CREATE DATABASE $db"
    "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -s "$db" | "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$TGT" -d "$db" >/dev/null
    q "$SRC" "$db" "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    q "$TGT" "$db" "CREATE SUBSCRIPTION bench_sub_$db CONNECTION 'host=127.0.0.1 port=$SRC dbname=$db user=postgres password=$PW' PUBLICATION bench_pub" >/dev/null
    lines="$lines$db = host=127.0.0.1 port=$SRC dbname=$db"$'\n'
  done
  for db in $DBS; do
    until [ "$(q "$TGT" "$db" "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" = 0 ]; do sleep 0.2; done
  done
  local bport; bport=$(free_port)
  printf '"postgres" "%s"\n' "$PW" > "$WORK/userlist.txt"
  cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
$lines[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
admin_users = postgres
pool_mode = transaction
max_client_conn = $((CLIENTS * $(echo $DBS | wc -w) + 50))
default_pool_size = 20
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
CONF
  [ "$(id -u)" = 0 ] && chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
  as_pg pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
  local bpid=$!
  BG_PIDS+=("$bpid")
  for _ in $(seq 100); do "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$bport" && break; sleep 0.1; done
  local prefix="$WORK/pgb-bouncer-$1"
  load "$bport" "$BOUNCER_MODE" "$prefix"
  sleep $((DURATION / 2))
  local pause catchup e0 e1 outcome=succeeded
  read -r pause catchup e0 e1 < <(python3 "$BENCH_DIR/bouncer_switch.py" "$bport" "$SRC" "$TGT" "${DBS// /,}" "$WORK/pgbouncer.ini" "$PW") ||
    { outcome=failed; pause=0; e0=0; e1=0; }
  echo "{\"pause\": [$e0, $e1]}" > "$WORK/bouncer-$1.json"
  wait_load
  # The load really moved: the target got rows the source did not.
  local after_src after_tgt
  after_src=$(q "$SRC" "$DB" "SELECT max(id) FROM pgbench_history")
  after_tgt=$(q "$TGT" "$DB" "SELECT max(id) FROM pgbench_history")
  [ "${after_tgt:-0}" -gt "${after_src:-0}" ] || { outcome=not-moved; echo "  !! load did not move to the target" >&2; }
  # runuser does not pass the signal on: stop pgbouncer itself.
  [ -s "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  kill "$bpid" 2>/dev/null || true; wait "$bpid" 2>/dev/null || true
  echo "pgbouncer $1 $outcome $pause $(client_stats "$prefix") $(phase_stalls "$WORK/bouncer-$1.json" "$prefix")" | tee -a "$RES" >&2
}

echo "cutover under load: pgbench TPC-B scale $SCALE on $DBS, $CLIENTS clients at $RATE tx/s each for ${DURATION}s, cutover at $((DURATION / 2))s, $REPS reps" >&2
echo "  columns: system rep outcome pause_s processed failed aborted_clients spike_ms p50_ms stall_per_phase_ms" >&2
for rep in $(seq "$REPS"); do
  for sys in $SYSTEMS; do "run_$sys" "$rep" || echo "$sys $rep error 0 0 0 0 0 0" >> "$RES"; done
done

CMD="REPS=$REPS SCALE=$SCALE CLIENTS=$CLIENTS RATE=$RATE DURATION=$DURATION DBS='$DBS' bench/cutover.sh"
M=$(machine_json)
echo
echo "cutover write pause, $REPS reps; ratio = PgBouncer / pgshift (> 1: pgshift pauses less)"
echo "stall_*: the longest transaction in progress during that phase, max over reps (ms); - where the system has no such phase; stall_before: a second well before the switch (the machine's own noise)"
printf '%-14s %-9s %10s %10s %12s %8s %8s %8s %s\n' system mode pause_p50 pause_max spike_max_ms p50_ms failed aborted "ok/reps stall_before stall_prewarm stall_catchup stall_pause stall_after"
summ() { # system → med max spike p50lat failed aborted ok n before prewarm catchup pause after
  python3 - "$1" "$RES" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[2]) if l.split()[0] == sys.argv[1]]
ok = sorted(float(r[3]) for r in rows if r[2] == "succeeded")
spike = max((float(r[7]) for r in rows), default=0)
lat = statistics.mean(float(r[8]) for r in rows) if rows else 0
stall = {}
for r in rows:
    if len(r) > 9:
        for kv in r[9].split(","):
            k, _, v = kv.partition("=")
            stall[k] = max(stall.get(k, 0.0), float(v or 0))
phases = " ".join(f"{stall[k]:.1f}" if k in stall else "-" for k in ("before", "prewarm", "catchup", "pause", "after"))
print(f"{statistics.median(ok) if ok else 0:.3f} {max(ok) if ok else 0:.3f} {spike:.1f} {lat:.1f}",
      sum(int(r[5]) for r in rows), sum(int(r[6]) for r in rows), len(ok), len(rows), phases)
PY
}
declare -A MED WORST
for sys in $SYSTEMS; do
  read -r med max spike lat failed aborted ok n sb sp sc spa saf < <(summ "$sys")
  MED[$sys]=$med
  WORST[$sys]=$(printf '%s\n' "$sp" "$sc" "$spa" "$saf" | grep -v '^-$' | sort -g | tail -1)
  mode=prepared; [ "$sys" = pgbouncer ] && mode=$BOUNCER_MODE; [ "$sys" = pgshift_simple ] && mode=simple
  printf '%-14s %-9s %9ss %9ss %12s %8s %8s %8s %s\n' "$sys" "$mode" "$med" "$max" "$spike" "$lat" "$failed" "$aborted" "$ok/$n $sb $sp $sc $spa $saf"
  js() { [ "$1" = - ] && echo null || echo "$1"; }
  record cutover.jsonl "{\"bench\":\"cutover\",\"system\":\"$sys\",\"mode\":\"$mode\",\"reps\":$n,\"succeeded\":$ok,\"pause_median_s\":$med,\"pause_max_s\":$max,\"spike_max_ms\":$spike,\"latency_p50_ms\":$lat,\"failed_tx\":$failed,\"aborted_clients\":$aborted,\"stall_ms\":{\"before\":$(js "$sb"),\"prewarm\":$(js "$sp"),\"catchup\":$(js "$sc"),\"pause\":$(js "$spa"),\"after\":$(js "$saf")},\"databases\":$(echo $DBS | wc -w),\"clients_per_db\":$CLIENTS,\"command\":\"$CMD\",\"machine\":$M}"
done
line=""
for s in pgshift pgshift_simple; do
  [ -n "${MED[pgbouncer]:-}" ] && [ -n "${MED[$s]:-}" ] && [ "${MED[$s]}" != 0.000 ] &&
    line="$line${line:+, }PgBouncer/$s $(ratio "${MED[pgbouncer]}" "${MED[$s]}")"
done
[ -n "$line" ] && echo "pause median ratios: $line"
line=""
for s in $SYSTEMS; do line="$line${line:+, }$s ${WORST[$s]:-?} ms"; done
echo "worst per-phase stall: $line"
exit 0
