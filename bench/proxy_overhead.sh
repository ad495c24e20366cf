#!/usr/bin/env bash
# Proxy overhead: pgbench direct vs through pgshift vs through PgBouncer
# (session mode), select-only and TPC-B, -M simple and -M prepared, each
# repeated REPS times; prints TPS, mean latency and the ratios
# pgshift/direct and pgshift/PgBouncer.
#
#   bench/proxy_overhead.sh            # defaults: scale 10, 8 clients, 20 s, 3 reps
#   DURATION=30 REPS=5 bench/proxy_overhead.sh
#
# Needs PostgreSQL server programs (initdb, pg_ctl), pgbench and pgbouncer
# (Debian: apt-get install -y postgresql pgbouncer). Runs as root too (the
# servers then run as the `postgres` user).
set -euo pipefail

SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
DURATION=${DURATION:-20}
REPS=${REPS:-3}
WORKLOADS=${WORKLOADS:-select-only tpcb}
MODES=${MODES:-simple prepared}
TARGETS=${TARGETS:-direct pgshift pgbouncer}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGSHIFT=${PGSHIFT:-$ROOT/target/release/pgshift}
PW=bench_pw

command -v pgbouncer >/dev/null || { echo "pgbouncer not found (apt-get install -y pgbouncer)"; exit 2; }
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL server programs not found (set PGBIN)"; exit 2; }
if [ ! -x "$PGSHIFT" ] || [ -z "${NO_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); SHIFT_PORT=$(free_port); ADMIN_PORT=$(free_port); BOUNCER_PORT=$(free_port)

WORK=$(mktemp -d /tmp/pgshift-bench-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # runuser does not pass the signal on: stop PgBouncer by its own pid.
  [ -s "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A fresh cluster; SCRAM for TCP clients.
echo "$PW" > "$WORK/pw"; [ "$(id -u)" = 0 ] && chown postgres: "$WORK/pw"
as_pg "$PGBIN/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pw" --auth-local=trust \
  --auth-host=scram-sha-256 --no-sync >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 100
shared_buffers = 256MB
synchronous_commit = off
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
export PGPASSWORD=$PW PGSSLMODE=disable PGUSER=postgres
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -i -q -s "$SCALE" postgres >/dev/null 2>&1

# pgshift, release build.
cat > "$WORK/pgshift.toml" <<CONF
[proxy]
listen = "127.0.0.1:$SHIFT_PORT"
auth = "scram-sha-256"
[[proxy.users]]
name = "postgres"
password = "$PW"
[source]
url = "postgres://postgres:$PW@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
[target]
url = "postgres://postgres:$PW@127.0.0.1:$PG_PORT/postgres?sslmode=disable"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
CONF
RUST_LOG=warn "$PGSHIFT" run --config "$WORK/pgshift.toml" 2>"$WORK/pgshift.log" &
PIDS+=($!)

# PgBouncer, session mode, SCRAM toward clients.
cat > "$WORK/userlist.txt" <<CONF
"postgres" "$PW"
CONF
cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
CONF
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"
as_pg pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
PIDS+=($!)

for port in $SHIFT_PORT $BOUNCER_PORT; do
  for _ in $(seq 100); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 0.1
  done
done

# One pgbench run: prints "tps latency_ms".
run() { # port mode select_only
  local extra=(); [ "$3" = 1 ] && extra=(-S)
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$1" -M "$2" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -n \
    "${extra[@]}" postgres 2>&1 |
    awk '/^tps = /{tps=$3} /^latency average = /{lat=$4} /failed transactions: [1-9]/{print "FAILED"; exit 1} END{print tps, lat}'
}

echo "pgbench: scale $SCALE, $CLIENTS clients, $THREADS threads, ${DURATION}s per run, $REPS reps"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $(pgbouncer --version | head -1)"
RESULTS="$WORK/results.txt"
: > "$RESULTS"
for rep in $(seq "$REPS"); do
  for workload in $WORKLOADS; do
    sel=0; [ "$workload" = select-only ] && sel=1
    for mode in $MODES; do
      for target in $TARGETS; do
        case $target in direct) port=$PG_PORT ;; pgshift) port=$SHIFT_PORT ;; pgbouncer) port=$BOUNCER_PORT ;; esac
        read -r tps lat < <(run "$port" "$mode" "$sel")
        echo "$workload $mode $target $rep $tps $lat" | tee -a "$RESULTS" >&2
      done
    done
  done
done

echo
printf '%-12s %-9s %12s %12s %12s %9s %9s %9s %9s\n' workload mode direct_tps pgshift_tps bouncer_tps \
  shift/dir shift/pgb lat_shift lat_pgb
for workload in $WORKLOADS; do
  for mode in $MODES; do
    awk -v w="$workload" -v m="$mode" '
      $1==w && $2==m { tps[$3]+=$5; lat[$3]+=$6; n[$3]++ }
      END {
        if (!n["direct"] || !n["pgshift"] || !n["pgbouncer"]) { print w, m, "(not all targets ran)"; exit }
        d=tps["direct"]/n["direct"]; s=tps["pgshift"]/n["pgshift"]; b=tps["pgbouncer"]/n["pgbouncer"];
        printf "%-12s %-9s %12.0f %12.0f %12.0f %9.2f %9.2f %8.3fms %8.3fms\n", w, m, d, s, b, s/d, s/b,
          lat["pgshift"]/n["pgshift"], lat["pgbouncer"]/n["pgbouncer"]
      }' "$RESULTS"
  done
done
