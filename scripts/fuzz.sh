#!/usr/bin/env bash
# Fuzzing campaign over every parser (fuzz/: one target per kind of input), on stable Rust with
# libFuzzer (the `libfuzzer-sys` crate) and rustc's SanitizerCoverage instrumentation.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds fuzz/libfuzzer (its own workspace and target folder: every crate in it is instrumented,
# the workspace's normal build is untouched), then runs each target (all by default) for
# SECONDS_PER_TARGET (default 60) seconds, one process at a time, starting from the saved corpus
# fuzz/corpus/<target>/ (read only; new inputs go to fuzz/libfuzzer/target/campaign/<target>/).
# A crash, panic, time-out (> TIMEOUT_S, default 10 s, per input) or allocation over RSS_MB
# (default 2048) stops the target and is saved under fuzz/artifacts/<target>/. Prints one JSON
# object per target: {"target", "executions", "seconds", "crashes", "artifact"}; exit status 1
# when any target crashed.
#
# To keep what a campaign found as regression inputs (small: libFuzzer's merge keeps only inputs
# that add coverage): SAVE=1 bash scripts/fuzz.sh ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_PER_TARGET="${1:-60}"
shift || true
TIMEOUT_S="${TIMEOUT_S:-10}"
RSS_MB="${RSS_MB:-2048}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN="$ROOT/fuzz/libfuzzer/target/$TRIPLE/release/steper-fuzz"

# Coverage instrumentation on stable: the sancov LLVM pass with libFuzzer's counters, PC table
# and comparison tracing (what cargo-fuzz passes, minus the nightly-only -Zsanitizer).
# `--target` keeps the flags off build scripts and proc macros, which link without libFuzzer.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
(cd fuzz/libfuzzer && cargo build --release --target "$TRIPLE" --bin steper-fuzz >&2)

if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(ls fuzz/corpus)
fi
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/steper-fuzz.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
failed=0
for t in "${TARGETS[@]}"; do
    work="$ROOT/fuzz/libfuzzer/target/campaign/$t"
    art="$ROOT/fuzz/artifacts/$t"
    mkdir -p "$work" "$art"
    log="$SCRATCH/$t.log"
    start=$(date +%s.%N)
    rc=0
    STEPER_FUZZ_TARGET="$t" STEPER_FUZZ_DIR="$SCRATCH/$t" "$BIN" \
        -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT_S" -rss_limit_mb="$RSS_MB" \
        -print_final_stats=1 -artifact_prefix="$art/" "$work" "$ROOT/fuzz/corpus/$t" \
        >"$log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # a crash ends the run before the final stats: the last progress line's count
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    fi
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    crashes=0
    if [ "$rc" -ne 0 ]; then
        crashes=1
        failed=1
        cp "$log" "$art/last-run.log"
    fi
    printf '{"target": "%s", "executions": %s, "seconds": %.1f, "crashes": %d, "artifact": "%s"}\n' \
        "$t" "${execs:-0}" "$(echo "$end - $start" | bc)" "$crashes" "$artifact"
    if [ "${SAVE:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
        STEPER_FUZZ_TARGET="$t" STEPER_FUZZ_DIR="$SCRATCH/$t" "$BIN" -merge=1 \
            -timeout="$TIMEOUT_S" -rss_limit_mb="$RSS_MB" "$ROOT/fuzz/corpus/$t" "$work" \
            >"$SCRATCH/$t.merge.log" 2>&1
    fi
done
exit "$failed"
