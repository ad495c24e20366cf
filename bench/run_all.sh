#!/usr/bin/env bash
# Runs every benchmark in one go and regenerates BENCHMARKS.md from what
# they printed (each compares pgshift with its peers inside the same
# script), plus bench/lag.svg (bench/lag_run.sh: /status sampled through a
# migration and cutover under load).
#
#   bench/run_all.sh                   # everything, default sizes (about 27 min on 2 cores)
#   ONLY="copy apply" bench/run_all.sh # some of them; the others keep their last output
#   QUICK=1 bench/run_all.sh           # smaller sizes (scale 20 copy, 50k backlog, 10 s proxy runs)
#
# Raw outputs: bench/results/latest/NAME.txt (stdout), NAME.log (progress),
# NAME.cmd (the exact command); JSON lines in bench/results/*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY=${ONLY:-proxy_overhead idle_sessions copy apply large_txn cutover lag_run fuzz}
OUT=bench/results/latest
mkdir -p "$OUT"
cargo build --release --quiet
export NO_BUILD=1

declare -A ENVS=(
  [proxy_overhead]="${PROXY_ENV:-}"
  [idle_sessions]="${IDLE_ENV:-}"
  [copy]="${COPY_ENV:-}"
  [apply]="${APPLY_ENV:-}"
  [large_txn]="${LARGE_TXN_ENV:-}"
  [cutover]="${CUTOVER_ENV:-}"
  [lag_run]="${LAG_ENV:-}"
  [fuzz]="${FUZZ_ENV:-}"
)
if [ -n "${QUICK:-}" ]; then
  ENVS[proxy_overhead]=${PROXY_ENV:-"DURATION=10 REPS=2"}
  ENVS[idle_sessions]=${IDLE_ENV:-"N=2000"}
  ENVS[copy]=${COPY_ENV:-"SCALE=20"}
  ENVS[apply]=${APPLY_ENV:-"N=50000 REPS=2 LIVE_SECONDS=20"}
  ENVS[large_txn]=${LARGE_TXN_ENV:-"ROWS=500000"}
  ENVS[cutover]=${CUTOVER_ENV:-"REPS=5"}
  ENVS[fuzz]=${FUZZ_ENV:-"N=100000"}
fi

for name in $ONLY; do
  cmd="${ENVS[$name]} bench/$name.sh"
  cmd=${cmd# }
  echo "== $cmd" >&2
  echo "$cmd" > "$OUT/$name.cmd"
  date -u +%FT%TZ > "$OUT/$name.date"
  uptime > "$OUT/$name.load"
  git describe --always > "$OUT/$name.commit" 2>/dev/null || true
  # shellcheck disable=SC2086
  if env ${ENVS[$name]} "bench/$name.sh" >"$OUT/$name.txt" 2>"$OUT/$name.log"; then
    cat "$OUT/$name.txt"
  else
    echo "!! $name failed (exit $?); see $OUT/$name.log" | tee -a "$OUT/$name.txt" >&2
    tail -20 "$OUT/$name.log" >&2
  fi
done

python3 bench/report.py "$OUT" > BENCHMARKS.md
echo "BENCHMARKS.md regenerated" >&2
