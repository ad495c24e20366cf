# Shared helpers for the bench/*.sh scripts (sourced, not run): throwaway
# clusters, pgshift configs, /status polling, result files. Every script
# that sources this gets one work directory and a trap that stops whatever
# it started (servers, pgshift, pgbouncer, pgbench) and removes it.

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
PGSHIFT=${PGSHIFT:-$ROOT/target/release/pgshift}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
PW=bench_pw
export PGPASSWORD=$PW PGSSLMODE=disable PGUSER=postgres PGCONNECT_TIMEOUT=10

[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL server programs not found (set PGBIN)" >&2; exit 2; }
export PATH="$PGBIN:$PATH"

build_pgshift() {
  if [ -z "${NO_BUILD:-}" ] || [ ! -x "$PGSHIFT" ]; then
    (cd "$ROOT" && cargo build --release --quiet) || { echo "cargo build --release failed" >&2; exit 2; }
  fi
}

WORK=$(mktemp -d /tmp/pgshift-bench-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"
echo "$PW" > "$WORK/pw"; [ "$(id -u)" = 0 ] && chown postgres: "$WORK/pw"
mkdir -p "$RESULTS_DIR"

BG_PIDS=()
CLUSTERS=()
cleanup() {
  local p
  for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${BG_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # Daemons started through runuser outlive a signal to runuser.
  [ -s "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  for p in "${CLUSTERS[@]}"; do
    as_pg "$PGBIN/pg_ctl" -D "$p" -m immediate stop >/dev/null 2>&1 || true
  done
  [ -n "${KEEP_WORK:-}" ] && { echo "work directory kept: $WORK" >&2; return; }
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_cluster NAME [extra conf lines...]: initdb + start; sets NAME_PORT.
# Logical replication is on everywhere so any cluster can be a source.
start_cluster() {
  local name=$1; shift
  local dir="$WORK/$name" port
  port=$(free_port)
  rm -rf "$dir"
  as_pg "$PGBIN/initdb" -D "$dir" -U postgres --pwfile="$WORK/pw" --auth-local=trust \
    --auth-host=scram-sha-256 --no-sync -E UTF8 --locale=C >/dev/null
  cat >> "$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK'
max_connections = ${MAX_CONNECTIONS:-200}
shared_buffers = ${SHARED_BUFFERS:-256MB}
maintenance_work_mem = 256MB
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_logical_replication_workers = 8
max_sync_workers_per_subscription = 2
# Native apply workers restart at most this often (default 5s): an
# ENABLE right after a DISABLE would otherwise wait seconds.
wal_retrieve_retry_interval = 200ms
max_wal_size = 8GB
checkpoint_timeout = 30min
log_min_messages = warning
CONF
  local line
  for line in "$@"; do echo "$line" >> "$dir/postgresql.conf"; done
  as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w start >/dev/null
  CLUSTERS+=("$dir")
  printf -v "${name}_PORT" '%s' "$port"
}

stop_cluster() { # NAME
  as_pg "$PGBIN/pg_ctl" -D "$WORK/$1" -m fast stop >/dev/null 2>&1 || true
}

# psql against a port: q PORT DB SQL → unaligned, tuples only.
q() { PGOPTIONS="-c client_min_messages=warning" "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -d "$2" -At -c "$3"; }

# bench_pub PORT DB: the peer's publication of the database's own tables.
# Not FOR ALL TABLES: that would publish pgshift's tables on the source
# too (schema pgshift), which a subscriber does not have (16+ refuses at
# CREATE SUBSCRIPTION, earlier ones never finish the initial sync).
bench_pub() {
  local tables
  tables=$(q "$1" "$2" "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
    FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgshift')")
  q "$1" "$2" "CREATE PUBLICATION bench_pub FOR TABLE $tables" >/dev/null
}

# pgbench's history table has no key; give it one so that every method can
# replicate it (UPDATE/DELETE need a replica identity, pgshift refuses
# tables without one in online mode).
add_history_key() { # PORT DB
  q "$1" "$2" "ALTER TABLE pgbench_history ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY" >/dev/null
}

# write_pgshift_config FILE SOURCE_PORT TARGET_PORT "DB [DB...]" MODE → sets SHIFT_PORT, ADMIN_PORT.
write_pgshift_config() {
  SHIFT_PORT=$(free_port); ADMIN_PORT=$(free_port)
  cat > "$1" <<CONF
[proxy]
listen = "127.0.0.1:$SHIFT_PORT"
auth = "scram-sha-256"
[[proxy.users]]
name = "postgres"
password = "$PW"
[source]
url = "postgres://postgres:$PW@127.0.0.1:$2/postgres?sslmode=disable"
[target]
url = "postgres://postgres:$PW@127.0.0.1:$3/postgres?sslmode=disable"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[migration]
name = "bench"
databases = [$(printf '"%s", ' $4 | sed 's/, $//')]
mode = "$5"
copy_jobs = ${COPY_JOBS:-2}
${EXTRA_MIGRATION_CONF:-}
[cutover]
trigger = "manual"
drain_timeout = "5s"
catchup_timeout = "10s"
${EXTRA_CUTOVER_CONF:-}
CONF
}

# start_pgshift CONFIG LOG → sets SHIFT_PID.
start_pgshift() {
  RUST_LOG=${RUST_LOG:-info} "$PGSHIFT" run --config "$1" >>"$2" 2>&1 &
  SHIFT_PID=$!
  BG_PIDS+=("$SHIFT_PID")
}

stop_pgshift() { # SIGTERM, wait
  kill -TERM "$SHIFT_PID" 2>/dev/null || true
  local i
  for i in $(seq 300); do kill -0 "$SHIFT_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SHIFT_PID" 2>/dev/null || true
  wait "$SHIFT_PID" 2>/dev/null || true
}

# wait_status ADMIN_PORT CONDITION [TIMEOUT_S]: polls /status every 50 ms
# until the Python expression CONDITION (over `s`, the /status document, and
# `db`, its first database) holds; prints the seconds it took. Exits 1 on
# Failed/ValidationFailed/Canceled or timeout, printing the document.
wait_status() {
  python3 "$BENCH_DIR/status_wait.py" "http://127.0.0.1:$1/status" "$2" "${3:-3600}"
}

status_json() { curl -sf "http://127.0.0.1:$1/status"; }

# record RESULT_FILE JSON: one machine-readable line per result.
record() {
  echo "$2" >> "$RESULTS_DIR/$1"
}

machine_json() {
  printf '{"nproc":%s,"mem_gb":%s,"cpu":"%s","postgres":"%s","date":"%s"}' \
    "$(nproc)" "$(awk '/MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
    "$("$PGBIN/postgres" --version | awk '{print $3}')" "$(date -u +%FT%TZ)"
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "${2:-$(now)}"; }
ratio() { python3 -c "import sys; a,b=map(float,sys.argv[1:]); print(f'{a/b:.2f}' if b>0 else 'n/a')" "$1" "$2"; }
