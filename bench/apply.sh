#!/usr/bin/env bash
# Apply throughput: a backlog of pgbench TPC-B transactions built on the
# source while both consumers are stopped, then drained by `pgshift run`
# (online mode, restarted) and by a native subscription (re-enabled), one
# after the other, from the same backlog (both slots retain it). Done = a
# marker row committed after the backlog is visible on the target. Then,
# if LIVE_SECONDS > 0, a sustained load (pgbench -T) while each streams in
# turn: replication lag max/mean and the drain time after the load.
# Appends JSON lines to bench/results/apply.jsonl.
#
#   bench/apply.sh                     # N=100000 transactions, scale 10, 2 reps
#   N=50000 REPS=1 LIVE_SECONDS=20 bench/apply.sh
set -euo pipefail
N=${N:-100000}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
REPS=${REPS:-2}
LIVE_SECONDS=${LIVE_SECONDS:-20}
LIVE_RATE=${LIVE_RATE:-}          # pgbench -R for the live load; empty: as fast as it goes
DB=bench
source "$(dirname "$0")/lib.sh"
build_pgshift

# The source commits asynchronously so that building the backlog is quick;
# decoding and applying do not depend on it.
start_cluster src "synchronous_commit = off"
start_cluster tgt
start_cluster nat
SRC=$src_PORT TGT=$tgt_PORT NAT=$nat_PORT
q "$SRC" postgres "CREATE DATABASE $DB"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -i -q -s "$SCALE" "$DB" >/dev/null 2>&1
add_history_key "$SRC" "$DB"
q "$SRC" "$DB" "CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"

# pgshift: copy, reach streaming, stop.
write_pgshift_config "$WORK/apply.toml" "$SRC" "$TGT" "$DB" online
LOG="$WORK/pgshift-apply.log"
start_pgshift "$WORK/apply.toml" "$LOG"
wait_status "$ADMIN_PORT" 's.get("substate")=="WaitingForCutoverTrigger"' 1800 >/dev/null ||
  { tail -30 "$LOG" >&2; exit 1; }
stop_pgshift

# Native: schema, subscription, initial sync, disable.
q "$NAT" postgres "CREATE DATABASE $DB"
"$PGBIN/pg_dump" -h 127.0.0.1 -p "$SRC" -s "$DB" | "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$NAT" -d "$DB" >/dev/null
bench_pub "$SRC" "$DB"
q "$NAT" "$DB" "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$SRC dbname=$DB user=postgres password=$PW' PUBLICATION bench_pub" >/dev/null
until [ "$(q "$NAT" "$DB" "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" = 0 ]; do sleep 0.2; done

native_disable() {
  q "$NAT" "$DB" "ALTER SUBSCRIPTION bench_sub DISABLE" >/dev/null
  until [ "$(q "$SRC" "$DB" "SELECT count(*) FROM pg_replication_slots WHERE slot_name='bench_sub' AND active")" = 0 ]; do sleep 0.1; done
}
native_disable

wait_marker() { # PORT ID
  until [ "$(q "$1" "$DB" "SELECT count(*) FROM bench_marker WHERE id=$2")" = 1 ]; do sleep 0.05; done
}

drain_pgshift() { # ID → SECS
  local t; t=$(now)
  start_pgshift "$WORK/apply.toml" "$LOG"
  wait_marker "$TGT" "$1"
  SECS=$(elapsed "$t")
  stop_pgshift
}

drain_native() { # ID → SECS
  local t; t=$(now)
  q "$NAT" "$DB" "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
  wait_marker "$NAT" "$1"
  SECS=$(elapsed "$t")
  native_disable
}

RES="$WORK/apply.txt"; : > "$RES"
per_client=$(( N / CLIENTS ))
for rep in $(seq "$REPS"); do
  lsn0=$(q "$SRC" "$DB" "SELECT pg_current_wal_lsn()")
  out=$("$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -n -c "$CLIENTS" -j 2 -t "$per_client" "$DB" 2>&1)
  tx=$(awk '/number of transactions actually processed/{split($NF,a,"/"); print a[1]}' <<<"$out")
  q "$SRC" "$DB" "INSERT INTO bench_marker (id) VALUES ($rep)"
  wal=$(q "$SRC" "$DB" "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')")
  wal_mb=$(python3 -c "print(f'{$wal/1048576:.0f}')")
  echo "  rep $rep: backlog of $tx TPC-B transactions, $wal_mb MB of WAL" >&2
  # Alternate who drains first.
  order="pgshift native"; [ $((rep % 2)) = 0 ] && order="native pgshift"
  for who in $order; do
    "drain_$who" "$rep"
    echo "  rep $rep  $who: ${SECS}s, $(python3 -c "print(round($tx/$SECS))") tx/s" >&2
    echo "$who $rep $tx $SECS $wal" >> "$RES"
  done
done

CMD="N=$N SCALE=$SCALE CLIENTS=$CLIENTS REPS=$REPS LIVE_SECONDS=$LIVE_SECONDS bench/apply.sh"
echo
echo "backlog drain, pgbench TPC-B scale $SCALE, $N transactions per rep, $REPS rep(s)"
printf '%-8s %10s %10s %12s\n' who seconds tx/s ratio
read -r p_secs p_tps < <(awk '$1=="pgshift"{s+=$4; t+=$3; n++} END{printf "%.2f %.0f\n", s/n, t/s}' "$RES")
read -r n_secs n_tps < <(awk '$1=="native"{s+=$4; t+=$3; n++} END{printf "%.2f %.0f\n", s/n, t/s}' "$RES")
printf '%-8s %10s %10s %12s\n' pgshift "$p_secs" "$p_tps" "$(ratio "$p_tps" "$n_tps")"
printf '%-8s %10s %10s %12s\n' native "$n_secs" "$n_tps" 1.00
echo "(ratio = pgshift tx/s / native tx/s; > 1: pgshift faster)"
M=$(machine_json)
record apply.jsonl "{\"bench\":\"apply_backlog\",\"n\":$N,\"scale\":$SCALE,\"reps\":$REPS,\"pgshift_seconds\":$p_secs,\"pgshift_tps\":$p_tps,\"native_seconds\":$n_secs,\"native_tps\":$n_tps,\"ratio\":$(ratio "$p_tps" "$n_tps"),\"command\":\"$CMD\",\"machine\":$M}"

[ "$LIVE_SECONDS" -gt 0 ] || exit 0

# Sustained load: each consumer streams while pgbench runs LIVE_SECONDS;
# lag = source pg_current_wal_lsn() minus what the target has committed
# (pgshift: /status lag_bytes; native: its origin's remote_lsn), every 200 ms.
live() { # who → LAG_MAX_MB LAG_MEAN_MB LIVE_TPS DRAIN_S
  local who=$1 csv="$WORK/live-$1.csv" sampler tps id=$((1000 + RANDOM))
  if [ "$who" = pgshift ]; then
    start_pgshift "$WORK/apply.toml" "$LOG"
    wait_status "$ADMIN_PORT" 's.get("substate")=="WaitingForCutoverTrigger" and db["stream"]["lag_bytes"] < 1048576' 600 >/dev/null
    python3 "$BENCH_DIR/lag_record.py" "http://127.0.0.1:$ADMIN_PORT/status" "$csv" &
    sampler=$!
  else
    q "$SRC" "$DB" "INSERT INTO bench_marker (id) VALUES ($((id + 5000)))"
    q "$NAT" "$DB" "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
    wait_marker "$NAT" $((id + 5000))
    ( echo "t,lag_bytes"; s0=$(now)
      while :; do
        cur=$(q "$SRC" "$DB" "SELECT pg_current_wal_lsn()")
        rem=$(q "$NAT" "$DB" "SELECT remote_lsn FROM pg_replication_origin_status LIMIT 1")
        echo "$(elapsed "$s0"),$(q "$SRC" "$DB" "SELECT greatest(0, pg_wal_lsn_diff('$cur', '$rem'))")"
        sleep 0.2
      done ) > "$csv" &
    sampler=$!
  fi
  BG_PIDS+=("$sampler")
  local rate=(); [ -n "$LIVE_RATE" ] && rate=(-R "$LIVE_RATE")
  tps=$("$PGBIN/pgbench" -h 127.0.0.1 -p "$SRC" -n -c "$CLIENTS" -j 2 -T "$LIVE_SECONDS" "${rate[@]}" "$DB" 2>&1 |
        awk '/^tps = /{printf "%.0f", $3}')
  q "$SRC" "$DB" "INSERT INTO bench_marker (id) VALUES ($id)"
  local t; t=$(now)
  wait_marker "$([ "$who" = pgshift ] && echo "$TGT" || echo "$NAT")" "$id"
  DRAIN_S=$(elapsed "$t")
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  if [ "$who" = pgshift ]; then stop_pgshift; else native_disable; fi
  LIVE_TPS=$tps
  read -r LAG_MAX_MB LAG_MEAN_MB < <(python3 - "$csv" "$LIVE_SECONDS" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("lag_bytes") not in ("", None)]
rows = [r for r in rows if float(r["t"]) <= float(sys.argv[2])]
v = [int(float(r["lag_bytes"])) / 1048576 for r in rows] or [0]
print(f"{max(v):.1f} {sum(v)/len(v):.1f}")
PY
)
}

echo
echo "sustained: pgbench TPC-B $CLIENTS clients for ${LIVE_SECONDS}s${LIVE_RATE:+ at $LIVE_RATE tx/s} while streaming"
printf '%-8s %10s %12s %12s %14s\n' who load_tps lag_max_MB lag_mean_MB drain_after_s
for who in pgshift native; do
  live "$who"
  printf '%-8s %10s %12s %12s %14s\n' "$who" "$LIVE_TPS" "$LAG_MAX_MB" "$LAG_MEAN_MB" "$DRAIN_S"
  record apply.jsonl "{\"bench\":\"apply_live\",\"who\":\"$who\",\"seconds\":$LIVE_SECONDS,\"load_tps\":$LIVE_TPS,\"lag_max_mb\":$LAG_MAX_MB,\"lag_mean_mb\":$LAG_MEAN_MB,\"drain_after_s\":$DRAIN_S,\"command\":\"$CMD\",\"machine\":$M}"
done
