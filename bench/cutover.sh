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
# Rollback (ROLLBACK=1, the default for the pgshift rows): after the
# cutover, once the verification after the switch (verify_after =
# checksums, clients running) has finished, `pgshift rollback` at 3/4 of
# the run, under the same load; its pause is reported next to the
# cutover's (rollback/cutover ratio, goal <= 1.5), with the verification's
# time and outcome and the snapshot phase inside the cutover's pause.
#   SCALE=100 REPS=1 SYSTEMS=pgshift DURATION=120 bench/cutover.sh   # verification at scale 100
#
# PgBouncer 1.18 cannot keep prepared statements in transaction mode, so its
# clients run -M simple (BOUNCER_MODE), and pgshift is also measured with
# -M simple (pgshift_simple) for a like-for-like row; in session mode its PAUSE waits for
# the clients to disconnect, which pgbench's persistent clients never do.
#
# Fleet mode (MEMBERS set, SYSTEMS=fleet or FLEET=1): one cutover moving a
# fleet of N pgshift members (README, "A fleet of sidecars"), for each N in
# MEMBERS (default "1 4 8") and each rep (reps outer, member counts inner, so
# that the machine's drift hits every N alike), on a fresh pair each time:
# members m0..mN-1 share [migration] name and target, each with its own proxy
# and admin port; m0 starts first and leads (streaming), the others start
# once it streams, and the load starts when m0 sees N live members. Each
# member's proxy carries its own pgbench -M prepared load (CLIENTS clients,
# RATE/N tx/s: RATE is the fleet's total here). Mid-run one POST /cutover
# goes to member CUTOVER_VIA (default: the last one, a follower when N > 1,
# which relays it to the leader). Per member its pause (gate closed →
# opened): the leader's from last_cutover.pause_seconds, a follower's from
# its own fleet.last_cutover.pause_seconds; the fleet's pause per rep is the
# largest member's. Reports per N the p50 and max of that over reps, the p50
# of every member's pause, failed transactions and aborted clients, and the
# ratio p50(largest N) / p50(1 member). A rep counts as succeeded when
# every member reports the switch, none was late or left out, all are on
# the target and the target got rows after the switch. Flagged on
# stderr: a follower whose own pause differs from the leader's record of
# it, and a member that closed its gate more than once in the cutover
# (column "reclosed"). Defaults there: REPS=3, SCALE=1, CLIENTS=2 per
# member, RATE=100 in all, DURATION=15 (about 5 minutes).
# JSON lines ("bench":"cutover_fleet") go to bench/results/cutover.jsonl.
#
#   MEMBERS="1 4 8" bench/cutover.sh
#   MEMBERS="1 8" REPS=5 RATE=200 bench/cutover.sh
set -euo pipefail
FLEET=${FLEET:-}
{ [ -n "${MEMBERS:-}" ] || [ "${SYSTEMS:-}" = fleet ]; } && FLEET=1
if [ -n "$FLEET" ]; then
  MEMBERS=${MEMBERS:-1 4 8}
  SYSTEMS=fleet
  REPS=${REPS:-3} SCALE=${SCALE:-1} CLIENTS=${CLIENTS:-2} DURATION=${DURATION:-15}
  CUTOVER_VIA=${CUTOVER_VIA:-last}
fi
REPS=${REPS:-5}
SCALE=${SCALE:-5}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-100}
DURATION=${DURATION:-20}
BOUNCER_MODE=${BOUNCER_MODE:-simple}
ROLLBACK=${ROLLBACK:-1}
SYSTEMS=${SYSTEMS:-pgshift pgshift_simple pgbouncer}
# One pgbench load (CLIENTS clients at RATE tx/s) per database.
DBS=${DBS:-bench}
DB=${DBS%% *}
source "$(dirname "$0")/lib.sh"
# Every session holds a client socket, a backend and a pre-warmed backend.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
build_pgshift
[ -n "$FLEET" ] || command -v pgbouncer >/dev/null || { echo "pgbouncer not found (apt-get install -y pgbouncer): compared with nothing" >&2; SYSTEMS=pgshift; }

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
# label rep outcome pause_s verify_state verify_s snapshot_ms cutover_pause_s
ROLLBACK_RES="$WORK/rollback.txt"; : > "$ROLLBACK_RES"

# After a cutover at DURATION/2: waits for the verification after the
# switch, rolls back at 3/4 of the run (load still running) and records the
# rollback's pause.
rollback_after() { # label rep started_at cutover_pause
  local label=$1 rep=$2 started=$3 cpause=$4
  wait_status "$ADMIN_PORT" '(s.get("verify_after_switch") or {}).get("state") not in (None, "none", "running")' 600 >/dev/null || true
  local wait_s=$(( started + DURATION * 3 / 4 - $(date +%s) ))
  [ "$wait_s" -gt 0 ] && sleep "$wait_s"
  "$PGSHIFT" rollback --config "$WORK/cut.toml" >/dev/null 2>&1 || true
  wait_status "$ADMIN_PORT" '(s.get("last_rollback") or {}).get("outcome") in ("succeeded","aborted","failed","interrupted")' 120 >/dev/null || true
  status_json "$ADMIN_PORT" | python3 -c '
import json,sys
s=json.load(sys.stdin); r=s.get("last_rollback") or {}; v=s.get("verify_after_switch") or {}
c=s.get("last_cutover") or {}
snap=next((p["seconds"] * 1000 for p in c.get("phases", []) if p["phase"]=="snapshot"), 0)
print(sys.argv[1], sys.argv[2], r.get("outcome","none"), r.get("pause_seconds") or 0, v.get("state","none"), v.get("seconds") or 0, f"{snap:.2f}", sys.argv[3])
' "$label" "$rep" "$cpause" | tee -a "$ROLLBACK_RES" >&2
}

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
  local prefix="$WORK/pgb-$label-$1" started
  started=$(date +%s)
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
  [ "$ROLLBACK" = 1 ] && [ "$outcome" = succeeded ] && rollback_after "$label" "$1" "$started" "$pause"
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
    bench_pub "$SRC" "$db"
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

# ---- Fleet mode: one cutover moving N members' sessions -------------------

# stop_members: SIGTERM to every member at once, then wait for each.
stop_members() {
  local p
  for p in "${M_PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${M_PID[@]}"; do SHIFT_PID=$p; stop_pgshift; done
}

member_logs() { # why: the tail of every member's log
  local i
  echo "  !! fleet of $N_MEMBERS: $1; log tails:" >&2
  for i in "${!M_LOG[@]}"; do echo "  -- m$i" >&2; tail -8 "${M_LOG[$i]}" | sed 's/^/     /' >&2; done
}

run_fleet() { # N rep
  local n=$1 rep=$2 i label="fleet$1"
  N_MEMBERS=$n
  fresh_pair
  M_SHIFT=() M_ADMIN=() M_PID=() M_CFG=() M_LOG=()
  for i in $(seq 0 $((n - 1))); do
    write_pgshift_config "$WORK/fleet-m$i.toml" "$SRC" "$TGT" "$DBS" online
    cat >> "$WORK/fleet-m$i.toml" <<CONF
[fleet]
member_id = "m$i"
role = "auto"
heartbeat_interval = "${HEARTBEAT_INTERVAL:-500ms}"
member_timeout = "${MEMBER_TIMEOUT:-5s}"
CONF
    M_SHIFT+=("$SHIFT_PORT") M_ADMIN+=("$ADMIN_PORT") M_CFG+=("$WORK/fleet-m$i.toml")
    M_LOG+=("$WORK/pgshift-$label-$rep-m$i.log")
  done
  # m0 leads: it copies and streams before the others join.
  start_pgshift "${M_CFG[0]}" "${M_LOG[0]}"; M_PID+=("$SHIFT_PID")
  wait_status "${M_ADMIN[0]}" 's.get("substate")=="WaitingForCutoverTrigger" and s["fleet"]["leader"]' 600 >/dev/null ||
    { member_logs "m0 did not reach streaming as the leader"; stop_members; return 1; }
  for i in $(seq 1 $((n - 1))); do
    start_pgshift "${M_CFG[$i]}" "${M_LOG[$i]}"; M_PID+=("$SHIFT_PID")
  done
  wait_status "${M_ADMIN[0]}" "sum(1 for m in s['fleet']['members'] if m['alive']) == $n" 120 >/dev/null ||
    { member_logs "m0 does not see $n live members"; stop_members; return 1; }
  for i in $(seq 1 $((n - 1))); do
    wait_status "${M_ADMIN[$i]}" "s['fleet']['member'] == 'm$i' and not s['fleet']['leader'] and any(m['leader'] and m['alive'] for m in s['fleet']['members'])" 60 >/dev/null ||
      { member_logs "m$i does not follow a live leader"; stop_members; return 1; }
  done
  # One load per member through its own proxy: RATE/N tx/s each.
  local prefix="$WORK/pgb-$label-$rep" per_rate all=()
  per_rate=$(python3 -c 'import sys; print(f"{float(sys.argv[1]) / int(sys.argv[2]):g}")' "$RATE" "$n")
  for i in $(seq 0 $((n - 1))); do
    RATE=$per_rate load "${M_SHIFT[$i]}" prepared "$prefix-m$i"
    all+=("${LOAD_PIDS[@]}")
  done
  LOAD_PIDS=("${all[@]}")
  sleep $((DURATION / 2))
  local via=$CUTOVER_VIA
  { [ "$via" = last ] || [ "$via" -ge "$n" ]; } && via=$((n - 1))
  curl -s -X POST "http://127.0.0.1:${M_ADMIN[$via]}/cutover" > "$WORK/cutover-answer.json" 2>&1 || true
  grep -q '"error"' "$WORK/cutover-answer.json" && echo "  !! POST /cutover to m$via: $(cat "$WORK/cutover-answer.json")" >&2
  # Done on the leader: switched and every follower's answer in (or the
  # attempt ended without the switch).
  wait_status "${M_ADMIN[0]}" "(s.get('state') == 'Succeeded' and ($n == 1 or ((s['fleet'].get('last_cutover') or {}).get('outcome') is not None))) or (s.get('last_cutover') or {}).get('outcome') in ('aborted', 'failed')" 120 >/dev/null || true
  for i in $(seq 1 $((n - 1))); do
    wait_status "${M_ADMIN[$i]}" "(s['fleet'].get('last_cutover') or {}).get('outcome') is not None" 20 >/dev/null 2>&1 || true
  done
  # Routes in /status's member list are as of each member's last heartbeat.
  wait_status "${M_ADMIN[0]}" "sum(1 for m in s['fleet']['members'] if m['alive'] and m['route'] == 'target') == $n" 10 >/dev/null 2>&1 || true
  for i in $(seq 0 $((n - 1))); do status_json "${M_ADMIN[$i]}" > "$WORK/status-$label-$rep-m$i.json" || echo '{}' > "$WORK/status-$label-$rep-m$i.json"; done
  cp "$WORK/status-$label-$rep-m0.json" "$WORK/status-$label-$rep.json"
  local phases
  phases=$(python3 -c '
import json,sys; c=json.load(open(sys.argv[1])).get("last_cutover") or {}
print(",".join("%s=%.1f" % (p["phase"], p["seconds"] * 1000) for p in c.get("phases", [])) or "-")' "$WORK/status-$label-$rep.json")
  echo "  $label $rep phases (ms): $phases" >&2
  echo "$label $rep $phases" >> "$RESULTS_DIR/cutover-phases.txt"
  # The load really moved: the target gets rows after the switch (the
  # source gets them too, by reverse replication, so it is no reference).
  local at_switch after_tgt moved=yes
  at_switch=$(q "$TGT" "$DB" "SELECT coalesce(max(id), 0) FROM pgbench_history")
  wait_load
  sleep 1
  stop_members
  after_tgt=$(q "$TGT" "$DB" "SELECT coalesce(max(id), 0) FROM pgbench_history")
  [ "${after_tgt:-0}" -gt "${at_switch:-0}" ] || moved=no
  # One cutover closes each member's gate once; a member that closed it
  # again held its clients twice (flagged, and counted as "reclosed").
  local reclosed=0 c
  for i in $(seq 0 $((n - 1))); do
    c=$(grep -c 'proxy pause gate closed' "${M_LOG[$i]}" || true)
    [ "${c:-0}" -le 1 ] || { reclosed=$((reclosed + 1)); echo "  !! m$i closed its gate $c times in one cutover: ${M_LOG[$i]}" >&2; }
  done
  # outcome fleet_pause leader_pause m0=s,m1=s,... on_target/n
  local outcome fpause lpause pauses routes
  read -r outcome fpause lpause pauses routes < <(python3 - "$n" "$WORK/status-$label-$rep" <<'PY'
import json, sys
n, base = int(sys.argv[1]), sys.argv[2]
docs = [json.load(open(f"{base}-m{i}.json")) for i in range(n)]
lead = docs[0]
lc = lead.get("last_cutover") or {}
lf = (lead.get("fleet") or {}).get("last_cutover") or {}
pauses, ok = {}, lc.get("outcome") == "succeeded" and lead.get("state") == "Succeeded"
if lc.get("pause_seconds") is not None:
    pauses["m0"] = float(lc["pause_seconds"])
for i, d in enumerate(docs[1:], 1):
    own = (d.get("fleet") or {}).get("last_cutover") or {}
    if own.get("outcome") != "succeeded":
        ok = False
    p = own.get("pause_seconds")
    if p is None:  # the leader's record of it
        p = (lf.get("pauses_seconds") or {}).get(f"m{i}")
    if p is None:
        ok = False
    else:
        pauses[f"m{i}"] = float(p)
        q = (lf.get("pauses_seconds") or {}).get(f"m{i}")
        if q is not None and abs(q - float(p)) > 1e-6:
            print(f"  !! m{i}: own pause {p} != leader's record {q}", file=sys.stderr)
if n > 1 and (lf.get("late") or lf.get("excluded")):
    ok = False
    print(f"  !! late {lf.get('late')} excluded {lf.get('excluded')}", file=sys.stderr)
members = (lead.get("fleet") or {}).get("members") or []
on_target = sum(1 for m in members if m.get("route") == "target")
if on_target != n:
    ok = False
outcome = "succeeded" if ok else (lc.get("outcome") or "none")
if not ok and outcome == "succeeded":
    outcome = "partial"
fleet = max(pauses.values()) if pauses else 0
print(outcome, f"{fleet:.6f}", f"{pauses.get('m0', 0):.6f}",
      ",".join(f"{k}={v:.6f}" for k, v in pauses.items()) or "-", f"{on_target}/{n}")
PY
)
  [ "$moved" = yes ] || { echo "  !! load did not move to the target" >&2; [ "$outcome" = succeeded ] && outcome=not-moved; }
  [ "$outcome" = succeeded ] || member_logs "cutover $outcome (members on the target: $routes)"
  echo "$label $rep $outcome $fpause $lpause $pauses $routes $(client_stats "$prefix") $(phase_stalls "$WORK/status-$label-$rep.json" "$prefix") reclosed=$reclosed" | tee -a "$RES" >&2
}

fleet_main() {
  echo "fleet cutover under load: members $MEMBERS, pgbench TPC-B scale $SCALE on $DBS, $CLIENTS clients per member, $RATE tx/s in all (split evenly), ${DURATION}s, cutover at $((DURATION / 2))s via member $CUTOVER_VIA, $REPS reps" >&2
  echo "  columns: fleetN rep outcome fleet_pause_s leader_pause_s member_pauses_s on_target processed failed aborted_clients spike_ms p50_ms stall_per_phase_ms reclosed" >&2
  local rep n
  for rep in $(seq "$REPS"); do
    for n in $MEMBERS; do
      run_fleet "$n" "$rep" || echo "fleet$n $rep error 0 0 - 0/$n 0 0 0 0 0" | tee -a "$RES" >&2
    done
  done
  local cmd="MEMBERS='$MEMBERS' REPS=$REPS SCALE=$SCALE CLIENTS=$CLIENTS RATE=$RATE DURATION=$DURATION DBS='$DBS' bench/cutover.sh"
  echo
  echo "fleet cutover pause (gate closed → opened), $REPS reps per member count; fleet = the largest member's pause in a rep; member = every member's pause"
  python3 - "$RES" "$MEMBERS" "$cmd" "$(machine_json)" "$CLIENTS" "$RATE" "$RESULTS_DIR/cutover.jsonl" <<'PY'
import json, statistics, sys
res, members, cmd, machine, clients, rate, out = sys.argv[1:]
rows = [l.split() for l in open(res) if l.strip()]
ms = lambda v: f"{v * 1000:.1f}"
print(f"{'members':>7} {'ok/reps':>7} {'fleet_p50_ms':>12} {'fleet_max_ms':>12} {'member_p50_ms':>13} "
      f"{'leader_p50_ms':>13} {'follower_p50_ms':>15} {'failed':>6} {'aborted':>7} {'spike_max_ms':>12} {'stall_pause_ms':>14} {'reclosed':>8}")
p50 = {}
summary = []
for n in members.split():
    r = [x for x in rows if x[0] == f"fleet{n}"]
    ok = [x for x in r if x[2] == "succeeded"]
    fleet = sorted(float(x[3]) for x in ok)
    allp, lead, fol = [], [], []
    for x in ok:
        for kv in x[5].split(","):
            k, _, v = kv.partition("=")
            if v:
                allp.append(float(v))
                (lead if k == "m0" else fol).append(float(v))
    failed = sum(int(x[8]) for x in r if len(x) > 9)
    aborted = sum(int(x[9]) for x in r if len(x) > 9)
    spike = max((float(x[10]) for x in r if len(x) > 10), default=0)
    stall = 0.0
    for x in r:
        if len(x) > 12:
            for kv in x[12].split(","):
                k, _, v = kv.partition("=")
                if k == "pause" and v:
                    stall = max(stall, float(v))
    reclosed = sum(int(x[13].partition("=")[2] or 0) for x in r if len(x) > 13 and x[13].startswith("reclosed="))
    med = statistics.median(fleet) if fleet else None
    p50[n] = med
    md = lambda v: statistics.median(v) if v else None
    f = lambda v: ms(v) if v is not None else "-"
    print(f"{n:>7} {len(ok)}/{len(r):<5} {f(med):>12} {f(max(fleet) if fleet else None):>12} {f(md(allp)):>13} "
          f"{f(md(lead)):>13} {f(md(fol)):>15} {failed:>6} {aborted:>7} {spike:>12.1f} {stall:>14.1f} {reclosed:>8}")
    summary.append({"bench": "cutover_fleet", "members": int(n), "reps": len(r), "succeeded": len(ok),
                    "fleet_pause_p50_s": med, "fleet_pause_max_s": max(fleet) if fleet else None,
                    "fleet_pauses_s": fleet, "member_pause_p50_s": md(allp), "leader_pause_p50_s": md(lead),
                    "follower_pause_p50_s": md(fol), "failed_tx": failed, "aborted_clients": aborted,
                    "spike_max_ms": spike, "stall_pause_max_ms": stall, "members_reclosed": reclosed, "clients_per_member": int(clients),
                    "rate_total": float(rate), "command": cmd, "machine": json.loads(machine)})
ns = members.split()
one, big = ns[0], ns[-1]
if p50.get(one) and p50.get(big) is not None and one != big:
    ratio = p50[big] / p50[one]
    print(f"ratio fleet p50 {big} members / {one}: {ratio:.2f} (goal <= 2.00: {'met' if ratio <= 2 else 'NOT met'}); "
          f"{big}-member p50 {p50[big] * 1000:.1f} ms (goal <= 50 ms: {'met' if p50[big] <= 0.05 else 'NOT met'})")
    for s in summary:
        s["ratio_to_" + one] = round(s["fleet_pause_p50_s"] / p50[one], 3) if s["fleet_pause_p50_s"] is not None else None
failed = sum(s["failed_tx"] for s in summary)
print(f"failed transactions in all: {failed} (goal 0: {'met' if failed == 0 else 'NOT met'}); "
      f"aborted clients: {sum(s['aborted_clients'] for s in summary)}")
with open(out, "a") as fh:
    for s in summary:
        fh.write(json.dumps(s) + "\n")
PY
}

if [ -n "$FLEET" ]; then fleet_main; exit 0; fi

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
if [ -s "$ROLLBACK_RES" ]; then
  echo
  echo "rollback under the same load, after the verification after the switch"
  python3 - "$ROLLBACK_RES" "$CMD" "$M" "$RESULTS_DIR/cutover.jsonl" <<'PY'
import json, statistics, sys
res, cmd, machine, out = sys.argv[1:]
rows = [l.split() for l in open(res) if l.strip()]
print(f"{'system':<14} {'ok/reps':>7} {'rollback_p50_ms':>15} {'rollback_max_ms':>15} {'cutover_p50_ms':>14} {'ratio':>6} {'verify':>10} {'verify_s_p50':>12} {'snapshot_ms_max':>15}")
with open(out, "a") as fh:
    for sys_ in sorted({r[0] for r in rows}):
        r = [x for x in rows if x[0] == sys_]
        ok = [x for x in r if x[2] == "succeeded"]
        rb = sorted(float(x[3]) for x in ok)
        cut = sorted(float(x[7]) for x in r)
        ver = [x[4] for x in r]
        vs = [float(x[5]) for x in r if x[4] == "match"]
        snap = max((float(x[6]) for x in r), default=0)
        med = statistics.median(rb) if rb else None
        cmed = statistics.median(cut) if cut else None
        ratio = med / cmed if med and cmed else None
        vstate = "match" if ver and all(v == "match" for v in ver) else ",".join(sorted(set(ver)))
        f = lambda v: f"{v * 1000:.1f}" if v is not None else "-"
        print(f"{sys_:<14} {len(ok)}/{len(r):<5} {f(med):>15} {f(max(rb) if rb else None):>15} {f(cmed):>14} "
              f"{(f'{ratio:.2f}' if ratio else '-'):>6} {vstate:>10} {(f'{statistics.median(vs):.1f}' if vs else '-'):>12} {snap:>15.2f}")
        if ratio:
            print(f"  {sys_}: rollback/cutover pause p50 {ratio:.2f} (goal <= 1.50: {'met' if ratio <= 1.5 else 'NOT met'})")
        fh.write(json.dumps({"bench": "rollback", "system": sys_, "reps": len(r), "succeeded": len(ok),
                             "rollback_pause_median_s": med, "rollback_pause_max_s": max(rb) if rb else None,
                             "cutover_pause_median_s": cmed, "ratio_rollback_to_cutover": ratio,
                             "verify_after": vstate, "verify_seconds_median": statistics.median(vs) if vs else None,
                             "snapshot_phase_max_ms": snap, "command": cmd, "machine": json.loads(machine)}) + "\n")
PY
fi
exit 0
