#!/usr/bin/env bash
# Proxy overhead: pgbench direct vs through pgshift vs through PgBouncer
# (session mode), select-only and TPC-B, -M simple and -M prepared, each
# repeated REPS times; clients on TCP, and on each proxy's Unix-domain
# socket (pgshift's proxy.unix_socket_dir, PgBouncer's unix_socket_dir;
# both proxies reach the server over TCP either way). Prints TPS, mean
# latency and the ratios pgshift/direct and pgshift/PgBouncer (per
# transport, averaged and per repetition).
#
#   bench/proxy_overhead.sh            # defaults: scale 10, 8 clients, 20 s, 3 reps
#   DURATION=30 REPS=5 bench/proxy_overhead.sh
#   RELAY_THREADS=1 TARGETS="pgshift-unix pgbouncer-unix" bench/proxy_overhead.sh
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
TARGETS=${TARGETS:-direct pgshift pgbouncer pgshift-unix pgbouncer-unix}
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
unix_socket_dir = "$WORK"
auth = "scram-sha-256"
${RELAY_THREADS:+relay_threads = $RELAY_THREADS}
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
unix_socket_dir = $WORK
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
run() { # host port mode select_only
  local extra=(); [ "$4" = 1 ] && extra=(-S)
  "$PGBIN/pgbench" -h "$1" -p "$2" -M "$3" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -n \
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
        host=127.0.0.1; case $target in *-unix) host=$WORK ;; esac
        case $target in
          direct) port=$PG_PORT ;; pgshift*) port=$SHIFT_PORT ;; pgbouncer*) port=$BOUNCER_PORT ;;
        esac
        read -r tps lat < <(run "$host" "$port" "$mode" "$sel")
        echo "$workload $mode $target $rep $tps $lat" | tee -a "$RESULTS" >&2
      done
    done
  done
done

echo
# direct_tps is direct over TCP for both transports (the server's own
# socket trusts local clients: no SCRAM, not the same work).
printf '%-12s %-9s %-9s %12s %12s %12s %9s %9s %9s %9s %s\n' workload mode transport direct_tps pgshift_tps \
  bouncer_tps shift/dir shift/pgb lat_shift lat_pgb shift/pgb_per_rep
for workload in $WORKLOADS; do
  for mode in $MODES; do
    for transport in tcp unix; do
      awk -v w="$workload" -v m="$mode" -v t="$transport" '
        function key(target) { return t == "unix" ? target "-unix" : target }
        $1==w && $2==m { tps[$3]+=$5; lat[$3]+=$6; n[$3]++; rep[$3, $4]=$5; if ($4 > reps) reps=$4 }
        END {
          s_=key("pgshift"); b_=key("pgbouncer")
          if (!n["direct"] || !n[s_] || !n[b_]) { exit }
          d=tps["direct"]/n["direct"]; s=tps[s_]/n[s_]; b=tps[b_]/n[b_];
          per=""
          for (r=1; r<=reps; r++) if (rep[b_, r] > 0) per=per (per=="" ? "" : "/") sprintf("%.2f", rep[s_, r]/rep[b_, r])
          printf "%-12s %-9s %-9s %12.0f %12.0f %12.0f %9.2f %9.2f %8.3fms %8.3fms %s\n", w, m, t, d, s, b, s/d, s/b,
            lat[s_]/n[s_], lat[b_]/n[b_], per
        }' "$RESULTS"
    done
  done
done
