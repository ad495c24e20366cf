#!/usr/bin/env bash
# Idle sessions: N client connections open and idle (startup, SCRAM and
# one SELECT 1 done, nothing sent after) through pgshift, then through PgBouncer in
# session mode, in the same script against the same server; each proxied
# session holds a server connection (PgBouncer's from the client's first
# query on: hence the SELECT 1), so the server allows N + 50. Reports
# each proxy's RSS before, its peak (VmHWM) with all N open, and the memory
# per session (peak − before) / N, and the ratio pgshift/PgBouncer.
#
#   bench/idle_sessions.sh                    # N=10000 over TCP
#   N=2000 TRANSPORT=unix bench/idle_sessions.sh
#
# The clients are one Python asyncio process on raw sockets
# (bench/idle_clients.py), a few KB each on its side.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

N=${N:-10000}
TRANSPORT=${TRANSPORT:-tcp}
CONCURRENCY=${CONCURRENCY:-32}

# Every session is a client socket and a server socket in the proxy (and a
# socket in the client process). Where the hard limit on open files is
# lower than that (a container), N is lowered to fit, and the output says so.
HARD=$(ulimit -Hn)
NOTE=""
if [ "$HARD" != unlimited ] && [ "$HARD" -lt $((2 * N + 200)) ]; then
  NOTE=" (lowered from $N: the hard limit on open files is $HARD, 2 per session in a proxy)"
  N=$(( (HARD - 200) / 2 ))
  ulimit -n "$HARD"
else
  ulimit -n $((2 * N + 200))
fi
build_pgshift

start_cluster pg "max_connections = $((N + 50))" "shared_buffers = 16MB" "max_wal_senders = 0" \
  "wal_level = minimal" "max_replication_slots = 0"
HOST=127.0.0.1; [ "$TRANSPORT" = unix ] && HOST=$WORK

SHIFT_PORT=$(free_port); ADMIN_PORT=$(free_port); BOUNCER_PORT=$(free_port)
cat > "$WORK/pgshift.toml" <<CONF
[proxy]
listen = "127.0.0.1:$SHIFT_PORT"
unix_socket_dir = "$WORK"
auth = "scram-sha-256"
max_client_connections = $((N + 100))
[[proxy.users]]
name = "postgres"
password = "$PW"
[source]
url = "postgres://postgres:$PW@127.0.0.1:$pg_PORT/postgres?sslmode=disable"
[target]
url = "postgres://postgres:$PW@127.0.0.1:$pg_PORT/postgres?sslmode=disable"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
CONF
cat > "$WORK/userlist.txt" <<CONF
"postgres" "$PW"
CONF
cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$pg_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir = $WORK
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = $((N + 100))
default_pool_size = $((N + 10))
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
CONF
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"

kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }

server_sessions() { q "$pg_PORT" postgres "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"; }

# measure NAME PID PORT: opens N idle clients through PORT; prints one row.
measure() {
  local name=$1 pid=$2 port=$3 before hwm rss open secs failed=0
  before=$(kb "$pid" VmRSS)
  rm -f "$WORK/hold" "$WORK/clients.out"; mkfifo "$WORK/hold"
  python3 "$BENCH_DIR/idle_clients.py" "$HOST" "$port" postgres "$PW" postgres "$N" "$CONCURRENCY" \
    < "$WORK/hold" > "$WORK/clients.out" 2>"$WORK/clients.err" &
  local cpid=$!
  BG_PIDS+=("$cpid")
  exec 3>"$WORK/hold"
  until grep -q '^open' "$WORK/clients.out" 2>/dev/null; do
    kill -0 "$cpid" 2>/dev/null || { echo "$name: client exited: $(cat "$WORK/clients.err")" >&2; exit 1; }
    sleep 0.2
  done
  read -r _ open secs < <(grep '^open' "$WORK/clients.out")
  grep '^failed' "$WORK/clients.out" >&2 && failed=$(awk '/^failed/{print $2+0}' "$WORK/clients.out")
  hwm=$(kb "$pid" VmHWM); rss=$(kb "$pid" VmRSS)
  echo "$name: $open open in ${secs}s, server sessions $(server_sessions), RSS ${before} -> ${rss} kB (peak ${hwm} kB)" >&2
  exec 3>&-
  wait "$cpid" || true
  printf '%-10s %-9s %8s %8s %12s %12s %12s %14.1f\n' "$name" "$TRANSPORT" "$N" "$open" "$before" "$hwm" "$rss" \
    "$(python3 -c "import sys; print((int(sys.argv[2]) - int(sys.argv[1])) / max(int(sys.argv[3]), 1))" "$before" "$hwm" "$open")"
  [ "$failed" = 0 ] && [ "$open" = "$N" ]
}

RESULTS="$WORK/results.txt"
echo "idle sessions: N=$N$NOTE over $TRANSPORT, clients opened $CONCURRENCY at a time, each ran SELECT 1"
echo "machine: $(nproc) cores, PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $(pgbouncer --version | head -1)"
echo

RUST_LOG=warn "$PGSHIFT" run --config "$WORK/pgshift.toml" >"$WORK/pgshift.log" 2>&1 &
SHIFT_PID=$!; BG_PIDS+=("$SHIFT_PID")
until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$SHIFT_PORT"; do sleep 0.1; done
measure pgshift "$SHIFT_PID" "$SHIFT_PORT" >> "$RESULTS"
kill -TERM "$SHIFT_PID"; wait "$SHIFT_PID" || true
# PgBouncer starts on a server without pgshift's sessions (it keeps its own
# server connections pooled after its clients leave: no wait after it).
for _ in $(seq 600); do [ "$(server_sessions)" -le 1 ] && break; sleep 0.2; done

# Not through runuser: PAM would reset the open-files limit raised above.
if [ "$(id -u)" = 0 ]; then
  setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
else
  pgbouncer -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
fi
until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$BOUNCER_PORT"; do sleep 0.1; done
measure pgbouncer "$(cat "$WORK/pgbouncer.pid")" "$BOUNCER_PORT" >> "$RESULTS"

printf '%-10s %-9s %8s %8s %12s %12s %12s %14s\n' proxy transport clients open rss_before_kb peak_rss_kb \
  rss_open_kb kb_per_session
cat "$RESULTS"
awk '{per[$1]=$8} END { if (per["pgbouncer"] > 0) printf "pgshift/PgBouncer memory per session: %.2f\n", per["pgshift"]/per["pgbouncer"] }' "$RESULTS"
