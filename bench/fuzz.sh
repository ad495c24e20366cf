#!/usr/bin/env bash
# Fuzzes every parser of bytes from the network or a file (tests/fuzz,
# pgshift::fuzzing) in release mode: N inputs per target, each target in a
# process of its own so the peak RSS (VmHWM) printed is that target's.
#
#   bench/fuzz.sh                                   # a million per target, random seed
#   N=100000 SEED=0x1234 TARGETS="config sqltext" bench/fuzz.sh
#
# A failing input is printed with its seed, index and hex (stderr, and the
# log); reproduce it with the seed, or alone with
#   PGSHIFT_FUZZ_TARGET=name PGSHIFT_FUZZ_INPUT=<hex> cargo test --test fuzz one_input -- --ignored
# Exit status: 0 when every target ran clean.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
SEED=${SEED:-0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')}
TARGETS=${TARGETS:-frontend backend copy_data pgoutput sqltext config}
LOG=${LOG:-$(mktemp -t pgshift-fuzz.XXXXXX)}

cargo test --release --test fuzz --no-run --quiet 2>>"$LOG"
echo "fuzz: $N inputs per target, seed $SEED, release build, $(nproc) cores; log: $LOG" >&2
echo "inputs per target: $N; seed: $SEED"
echo
echo "target inputs panics hangs over_alloc slowest_input_us largest_alloc_KiB peak_rss_MiB seconds"
failed=0
for t in $TARGETS; do
  status=0
  out=$(PGSHIFT_FUZZ_TARGET=$t PGSHIFT_FUZZ_INPUTS=$N PGSHIFT_FUZZ_SEED=$SEED \
    cargo test --release --quiet --test fuzz bench -- --ignored --exact --nocapture 2>>"$LOG") || status=$?
  line=$(grep '^RESULT ' <<<"$out" || true)
  if [ -n "$line" ]; then
    # RESULT name inputs panics hangs over_alloc us KiB MiB seconds seed
    awk '{print $2, $3, $4, $5, $6, $7, $8, $9, $10}' <<<"$line"
  else
    # The watchdog ended the process (a hang), or it died.
    echo "$t FAILED(exit=$status) - - - - - - -"
  fi
  if [ "$status" != 0 ]; then
    failed=1
    grep -E "^fuzz $t|^  (panic|an allocation)|input [0-9]+ of seed" "$LOG" | tail -12 >&2 || true
  fi
done
exit $failed
