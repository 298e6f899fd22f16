#!/usr/bin/env bash
# Continuous batching against the worker pool, one run, same inputs: `steper-run bench-serve`
# with an in-process server in each configuration, on /v1/completions and /v1/reason, at
# 1, 4, 8 and 16 closed-loop clients; then a table of requests/s and p50 / p99 per level and
# the ratio batched / pool. Configurations (both use every core):
#   pool:  --workers 2 --threads 1            (today's best on 2 cores: one request per worker)
#   batch: --workers 1 --batch B --threads 2  (continuous batching, B rows)
# Knobs (env): MODEL (a standard-attention export), INDEX, QUESTIONS, OUT
# (out/serve-batching), BIN_DIR (prebuilt binaries, else a release build), B (8), LEVELS
# (1,4,8,16), SECONDS (30 per level), ENDPOINTS ("completions reason"), MAX_TOKENS (32).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:?MODEL: a standard-attention export directory}"
INDEX="${INDEX:?INDEX: an index directory from steper-run index}"
QUESTIONS="${QUESTIONS:-$ROOT/data/hotpotqa_dev500.jsonl.gz}"
OUT="${OUT:-$ROOT/out/serve-batching}"
B="${B:-8}"
LEVELS="${LEVELS:-1,4,8,16}"
SECONDS_PER_LEVEL="${SECONDS:-30}"
ENDPOINTS="${ENDPOINTS:-completions reason}"
MAX_TOKENS="${MAX_TOKENS:-32}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-runtime
  BIN="$ROOT/target/release"
fi
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
for ep in $ENDPOINTS; do
  for cfg in pool batch; do
    case "$cfg" in
      pool) args=(--workers 2 --threads 1) ;;
      batch) args=(--workers 1 --batch "$B" --threads 2) ;;
    esac
    log "$ep / $cfg: ${args[*]}"
    "$BIN/steper-run" bench-serve --model "$MODEL" --index "$INDEX" --questions "$QUESTIONS" \
      --endpoint "$ep" --concurrency "$LEVELS" --seconds "$SECONDS_PER_LEVEL" \
      --max-tokens "$MAX_TOKENS" --max-queue 64 "${args[@]}" --json >"$OUT/$ep-$cfg.json"
  done
done
python3 - "$OUT" "$B" $ENDPOINTS <<'PY'
import json, sys
out, b, endpoints = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = ["| endpoint | clients | pool req/s | batch req/s | × | pool p50 ms | batch p50 ms | pool p99 ms | batch p99 ms | non-200 (pool / batch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
summary = {}
for ep in endpoints:
    pool = json.load(open(f"{out}/{ep}-pool.json"))["levels"]
    bat = json.load(open(f"{out}/{ep}-batch.json"))["levels"]
    for p, q in zip(pool, bat):
        c = p["concurrency"]
        bad = lambda r: r["requests"] - r["ok"]
        ratio = q["requests_per_sec"] / p["requests_per_sec"] if p["requests_per_sec"] else float("nan")
        rows.append(f"| {ep} | {c} | {p['requests_per_sec']:.2f} | {q['requests_per_sec']:.2f} | {ratio:.2f} | "
                    f"{p['p50_ms']:.0f} | {q['p50_ms']:.0f} | {p['p99_ms']:.0f} | {q['p99_ms']:.0f} | {bad(p)} / {bad(q)} |")
        summary[f"{ep}/{c}"] = {"pool_rps": p["requests_per_sec"], "batch_rps": q["requests_per_sec"], "ratio": ratio,
                                "pool_p99_ms": p["p99_ms"], "batch_p99_ms": q["p99_ms"]}
text = f"Pool: --workers 2 --threads 1. Batch: --workers 1 --batch {b} --threads 2.\n\n" + "\n".join(rows) + "\n"
open(f"{out}/results.md", "w").write(text)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(text)
PY
