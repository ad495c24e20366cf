#!/usr/bin/env bash
# Lag over time through a whole online migration and cutover, for the plot:
# a write load through the pgshift proxy starts together with `pgshift run`
# (so changes pile up during the copy), /status is recorded every 200 ms
# (bench/lag_record.py), the cutover is triggered once streaming has caught
# up (or after STREAM_SECONDS), the load runs on a few seconds on the target.
# Writes bench/results/lag-cutover.csv and draws bench/lag.svg.
#
#   bench/lag_run.sh                   # scale 20, 4 clients unthrottled, 25 s load
#   SCALE=50 RATE=1000 bench/lag_run.sh
set -euo pipefail
SCALE=${SCALE:-20}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-}
DURATION=${DURATION:-25}
STREAM_SECONDS=${STREAM_SECONDS:-10}
DB=bench
source "$(dirname "$0")/lib.sh"
build_pgshift

start_cluster src
start_cluster tgt
SRC=$src_PORT TGT=$tgt_PORT
q "$SRC" postgres "CREATE DATABASE $DB"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -i -q -s "$SCALE" "$DB" >/dev/null 2>&1
add_history_key "$SRC" "$DB"

write_pgshift_config "$WORK/lag.toml" "$SRC" "$TGT" "$DB" online
start_pgshift "$WORK/lag.toml" "$WORK/pgshift.log"
python3 "$BENCH_DIR/lag_record.py" "http://127.0.0.1:$ADMIN_PORT/status" "$WORK/lag.csv" &
REC=$!
BG_PIDS+=("$REC")
for _ in $(seq 100); do "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$SHIFT_PORT" && break; sleep 0.1; done
rate=(); [ -n "$RATE" ] && rate=(-R "$RATE")
"$PGBIN/pgbench" -h 127.0.0.1 -p "$SHIFT_PORT" -n -M simple -c "$CLIENTS" -j 2 -T "$DURATION" "${rate[@]}" \
  "$DB" >"$WORK/pgbench.out" 2>&1 &
LOAD=$!
BG_PIDS+=("$LOAD")
wait_status "$ADMIN_PORT" 's.get("substate")=="WaitingForCutoverTrigger"' 600 >/dev/null ||
  { tail -20 "$WORK/pgshift.log" >&2; exit 1; }
# Caught up (below 1 MB) or streamed long enough: cut over under the load.
wait_status "$ADMIN_PORT" 'db["stream"]["lag_bytes"] < 1048576' "$STREAM_SECONDS" >/dev/null 2>&1 || true
sleep 2
# pgshift's own CPU time during the cutover (utime + stime, clock ticks).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SHIFT_PID/stat"; }
c0=$(cpu_ticks); t0=$(now)
"$PGSHIFT" cutover --config "$WORK/lag.toml" >/dev/null
wait_status "$ADMIN_PORT" 's.get("state")=="Succeeded" or (s.get("last_cutover") or {}).get("outcome") in ("aborted","failed")' 120 >/dev/null
echo "pgshift CPU during the cutover: $(python3 -c "print(f'{($(cpu_ticks) - $c0) / $(getconf CLK_TCK):.2f}')")s in $(elapsed "$t0")s"
sleep 3
kill "$REC"; wait "$REC" 2>/dev/null || true
status_json "$ADMIN_PORT" | python3 -c '
import json, sys
c = json.load(sys.stdin).get("last_cutover") or {}
phases = ", ".join(str(p.get("phase", p.get("name"))) + " " + str(p.get("seconds")) for p in c.get("phases", []))
print("cutover:", c.get("outcome"), "pause", c.get("pause_seconds"), "s; phases:", phases)' || true
wait "$LOAD" || true
cp "$WORK/lag.csv" "$RESULTS_DIR/lag-cutover.csv"
echo "load: $(grep -E '^tps|failed transactions|actually processed' "$WORK/pgbench.out" | tr '\n' ';')"
python3 "$BENCH_DIR/lag_plot.py" "$RESULTS_DIR/lag-cutover.csv" "$BENCH_DIR/lag.svg" \
  "pgshift: lag through copy, streaming and cutover (pgbench scale $SCALE, $CLIENTS clients through the proxy)"
