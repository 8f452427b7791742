#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every parser that takes outside input.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 30 s, every target)
#
# For each target: the inputs that once broke it (fuzz/regressions/<target>) are run first,
# then the fuzzer runs from the corpus in the repository (fuzz/corpus/<target>, grown with what
# it finds) for the given time. A crash, a panic, a hang over 10 s or an allocation over 2 GB
# fails the script; the input is left in fuzz/artifacts/<target>/. The stable toolchain builds
# the instrumented targets (RUSTC_BOOTSTRAP: cargo-fuzz passes an unstable flag); without
# AddressSanitizer (safe Rust), in the dev profile (a shorter build, which CI pays for).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz run --dev --sanitizer none)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build --dev --sanitizer none
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  if compgen -G "fuzz/regressions/$t/*" >/dev/null; then
    echo "== $t: regression inputs"
    "${fuzz[@]}" "$t" fuzz/regressions/"$t"/* -- -runs=1 2>&1 | tail -n 3
  fi
  echo "== $t: ${secs} s"
  log="fuzz/target/$t.log"
  mkdir -p fuzz/target
  status=0
  "${fuzz[@]}" "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -timeout=10 \
    -rss_limit_mb=2048 -seed=1 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::new_units_added)' "$log" || true
  if [ "$status" -ne 0 ]; then
    grep -E -A 20 'panicked|==[0-9]+== ERROR|SUMMARY' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
    echo "fuzz target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
