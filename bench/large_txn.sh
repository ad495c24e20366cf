#!/usr/bin/env bash
# One large transaction: a single INSERT of ROWS rows (about 100 bytes of
# WAL each), committed on the source while a consumer streams; measured
# from the source's COMMIT (psql returning) to the last row being visible
# on the target. pgshift (`pgshift run`, online, streaming; from 14 on it
# applies streamed in-progress transactions as they arrive) vs native
# logical replication (a subscription with streaming = parallel on 16+,
# on before), one after the other with the other consumer stopped, each
# caught up before its INSERT. Also pgshift's peak RSS (VmHWM) over its
# run. Appends JSON lines to bench/results/large_txn.jsonl.
#
#   bench/large_txn.sh                  # ROWS=1000000, 1 rep
#   ROWS=200000 REPS=2 bench/large_txn.sh
set -euo pipefail
ROWS=${ROWS:-1000000}
REPS=${REPS:-1}
DB=bench
source "$(dirname "$0")/lib.sh"
build_pgshift

MAJOR=$("$PGBIN/postgres" --version | awk '{split($3, v, "."); print v[1]}')
STREAMING=on; [ "$MAJOR" -ge 16 ] && STREAMING=parallel

# Native's default memory before streaming (64MB) on both sides; the source
# commits synchronously so the COMMIT returns when it is durable.
start_cluster src
start_cluster tgt
start_cluster nat
SRC=$src_PORT TGT=$tgt_PORT NAT=$nat_PORT
SCHEMA="CREATE TABLE big (id bigint PRIMARY KEY, rep int NOT NULL, v text NOT NULL);
        CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());"
q "$SRC" postgres "CREATE DATABASE $DB"
q "$SRC" "$DB" "$SCHEMA"

# pgshift: copy (empty), reach streaming.
write_pgshift_config "$WORK/large.toml" "$SRC" "$TGT" "$DB" online
LOG="$WORK/pgshift-large.log"
start_pgshift "$WORK/large.toml" "$LOG"
wait_status "$ADMIN_PORT" 's.get("substate")=="WaitingForCutoverTrigger"' 1800 >/dev/null ||
  { tail -30 "$LOG" >&2; exit 1; }

# Native: schema, subscription (streaming), initial sync, disabled while
# pgshift runs.
q "$NAT" postgres "CREATE DATABASE $DB"
q "$NAT" "$DB" "$SCHEMA"
bench_pub "$SRC" "$DB"
q "$NAT" "$DB" "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$SRC dbname=$DB user=postgres password=$PW' PUBLICATION bench_pub WITH (streaming = $STREAMING)" >/dev/null
until [ "$(q "$NAT" "$DB" "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" = 0 ]; do sleep 0.2; done

native_disable() {
  q "$NAT" "$DB" "ALTER SUBSCRIPTION bench_sub DISABLE" >/dev/null
  until [ "$(q "$SRC" "$DB" "SELECT count(*) FROM pg_replication_slots WHERE slot_name='bench_sub' AND active")" = 0 ]; do sleep 0.1; done
}
native_disable

wait_row() { # PORT QUERY: polls until QUERY returns 1
  until [ "$(q "$1" "$DB" "$2")" = 1 ]; do sleep 0.02; done
}

MARK=0
caught_up() { # PORT: a marker committed now is visible there
  MARK=$((MARK + 1))
  q "$SRC" "$DB" "INSERT INTO bench_marker (id) VALUES ($MARK)"
  wait_row "$1" "SELECT count(*) FROM bench_marker WHERE id = $MARK"
}

# large REP PORT → INSERT_S (the INSERT until its COMMIT returned), VISIBLE_S
large() {
  local rep=$1 port=$2 base t0 t1
  base=$(( rep * 100000000 ))
  t0=$(now)
  q "$SRC" "$DB" "INSERT INTO big SELECT g, $rep, md5(g::text) || md5((g + 1)::text) FROM generate_series($((base + 1)), $((base + ROWS))) g"
  t1=$(now)
  wait_row "$port" "SELECT count(*) FROM big WHERE id = $((base + ROWS))"
  INSERT_S=$(elapsed "$t0" "$t1")
  VISIBLE_S=$(elapsed "$t1")
}

RES="$WORK/large.txt"; : > "$RES"
rep=0
for r in $(seq "$REPS"); do
  order="pgshift native"; [ $((r % 2)) = 0 ] && order="native pgshift"
  for who in $order; do
    rep=$((rep + 1))
    if [ "$who" = pgshift ]; then
      kill -0 "$SHIFT_PID" 2>/dev/null || start_pgshift "$WORK/large.toml" "$LOG"
      caught_up "$TGT"
      wal0=$(q "$SRC" "$DB" "SELECT pg_current_wal_lsn()")
      large "$rep" "$TGT"
      rss=$(awk '/VmHWM/{print $2}' "/proc/$SHIFT_PID/status")
      stop_pgshift
    else
      q "$NAT" "$DB" "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
      caught_up "$NAT"
      wal0=$(q "$SRC" "$DB" "SELECT pg_current_wal_lsn()")
      large "$rep" "$NAT"
      rss=""
      native_disable
    fi
    wal=$(q "$SRC" "$DB" "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$wal0')")
    echo "  rep $r $who: $ROWS rows, $((wal / 1048576)) MB of WAL; INSERT ${INSERT_S}s, commit to visible ${VISIBLE_S}s${rss:+, peak RSS $((rss / 1024)) MB}" >&2
    echo "$who $r $INSERT_S $VISIBLE_S ${rss:-0} $wal" >> "$RES"
  done
done

CMD="ROWS=$ROWS REPS=$REPS bench/large_txn.sh"
echo
echo "one INSERT of $ROWS rows, PostgreSQL $MAJOR, native streaming = $STREAMING, $REPS rep(s)"
printf '%-8s %12s %22s %14s\n' who insert_s commit_to_visible_s peak_rss_mb
read -r p_ins p_vis p_rss < <(awk '$1=="pgshift"{i+=$3; v+=$4; if ($5>m) m=$5; n++} END{printf "%.2f %.2f %.0f\n", i/n, v/n, m/1024}' "$RES")
read -r n_ins n_vis < <(awk '$1=="native"{i+=$3; v+=$4; n++} END{printf "%.2f %.2f\n", i/n, v/n}' "$RES")
printf '%-8s %12s %22s %14s\n' pgshift "$p_ins" "$p_vis" "$p_rss"
printf '%-8s %12s %22s %14s\n' native "$n_ins" "$n_vis" "-"
echo "(commit_to_visible: the source's COMMIT returning until the last row is visible on the target; means over reps)"
M=$(machine_json)
record large_txn.jsonl "{\"bench\":\"large_txn\",\"rows\":$ROWS,\"reps\":$REPS,\"native_streaming\":\"$STREAMING\",\"pgshift_insert_seconds\":$p_ins,\"pgshift_commit_to_visible_seconds\":$p_vis,\"pgshift_peak_rss_mb\":$p_rss,\"native_insert_seconds\":$n_ins,\"native_commit_to_visible_seconds\":$n_vis,\"command\":\"$CMD\",\"machine\":$M}"
