#!/usr/bin/env bash
# Which int4 keeps a trained student's HotpotQA accuracy: symmetric round-to-nearest, per-block
# zero points (`--zero-points`), or GPTQ (`--calibration`, with and without zero points; with
# zero points and the vocabulary projection left float: `int4-gptq-zp-fphead`), or float zero
# points (`--zero-points float`, llama.cpp's Q4_1 form: `int4-fzp`, `int4-fzp-fphead`,
# `int4-gptq-fzp-fphead`), which bring back exactly the layers training left on the GGUF's
# grid? One
# command, one run: the student exported fp32, int4, int4-zp, int8, int4-gptq and int4-gptq-zp;
# `steper-run eval` of each on the first N questions of hotpotqa_dev500 (its own paragraph pool
# as the index), on the same questions; `steper-run compare` of each against fp32 (paired
# intervals, sign tests). GPTQ's Hessians come from `steper-calibrate --hessians` on the fp32
# export over CALIB_SAMPLES step prompts of the student's own training records (CALIB_DATA), not
# the dev questions. Resumable: an export, calibration or evaluation whose output exists is
# skipped. Needs a trained checkpoint: CKPT (default out/demo/student, made by scripts/demo.sh).
# Knobs (env): OUT (out/quant-zero-points), BIN_DIR (prebuilt binaries, else a release build),
# N (100), WORKERS (2), BLOCK (32), FORMS (all six), CALIB_DATA
# (out/demo/distill/stepwise.jsonl), CALIB_SAMPLES (128).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/quant-zero-points}"
CKPT="${CKPT:-$ROOT/out/demo/student}"
N="${N:-100}"
WORKERS="${WORKERS:-2}"
BLOCK="${BLOCK:-32}"
FORMS="${FORMS:-fp32 int4 int4-zp int8 int4-gptq int4-gptq-zp}"
CALIB_DATA="${CALIB_DATA:-$ROOT/out/demo/distill/stepwise.jsonl}"
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
DATA="$ROOT/data"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime -p steper-calibration
  BIN="$ROOT/target/release"
fi
[[ -f "$CKPT/config.json" ]] || { echo "missing $CKPT/config.json (see the header of $0)" >&2; exit 1; }
mkdir -p "$OUT/eval"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

INDEX="$OUT/index-hotpotqa_dev500"
[[ -d "$INDEX" ]] || "$BIN/steper-run" index --from-qa "$DATA/hotpotqa_dev500.jsonl.gz" --out "$INDEX" >/dev/null

# GPTQ needs the fp32 export's Hessians first.
CALIB="$OUT/calib"
calibrate() {
  [[ -f "$CALIB/hessians.safetensors" ]] && return
  [[ -f "$OUT/student-fp32/steper.json" ]] || {
    log "export fp32 (for the Hessians)"
    "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/student-fp32" >/dev/null
  }
  [[ -f "$CALIB_DATA" ]] || { echo "missing $CALIB_DATA (CALIB_DATA: step-wise records)" >&2; exit 1; }
  log "calibrate: Hessians over $CALIB_SAMPLES prompts of $CALIB_DATA"
  "$BIN/steper-calibrate" --model "$OUT/student-fp32" --data "$CALIB_DATA" --hessians \
    --samples "$CALIB_SAMPLES" --holdout 0 --bench-tokens 0 --out "$CALIB" >"$OUT/calibrate.log" 2>&1
}
for q in $FORMS; do
  [[ -f "$OUT/student-$q/steper.json" ]] && continue
  case "$q" in
    fp32) args=() ;;
    int4) args=(--quantize int4 --block-size "$BLOCK") ;;
    int4-zp) args=(--quantize int4 --block-size "$BLOCK" --zero-points) ;;
    int8) args=(--quantize int8 --block-size "$BLOCK") ;;
    int4-gptq) calibrate; args=(--quantize int4 --block-size "$BLOCK" --calibration "$CALIB") ;;
    int4-gptq-zp) calibrate; args=(--quantize int4 --block-size "$BLOCK" --zero-points --calibration "$CALIB") ;;
    # The same with the vocabulary projection left float (the tied embedding's projection is
    # the one layer whose rounding every logit sees).
    int4-gptq-zp-fphead) calibrate; args=(--quantize int4 --block-size "$BLOCK" --zero-points --calibration "$CALIB" --quantize-lm-head false) ;;
    int4-zp-fphead) args=(--quantize int4 --block-size "$BLOCK" --zero-points --quantize-lm-head false) ;;
    # Float zero points: a float minimum per block (Q4_1's form, a block-sum correction beside
    # MatMulNBits), exact for the frozen layers imported from the Q4_1 GGUF.
    int4-fzp) args=(--quantize int4 --block-size "$BLOCK" --zero-points float) ;;
    int4-fzp-fphead) args=(--quantize int4 --block-size "$BLOCK" --zero-points float --quantize-lm-head false) ;;
    int4-gptq-fzp-fphead) calibrate; args=(--quantize int4 --block-size "$BLOCK" --zero-points float --calibration "$CALIB" --quantize-lm-head false) ;;
    # The same with the layers training moved off the grid (and the Q8_0 vocabulary projection)
    # in int8: int4 cannot hold an update smaller than its step.
    int4-fzp-og) args=(--quantize int4 --block-size "$BLOCK" --zero-points float --off-grid-int8) ;;
    int4-fzp-og-fphead) args=(--quantize int4 --block-size "$BLOCK" --zero-points float --off-grid-int8 --quantize-lm-head false) ;;
    *) echo "unknown form $q in FORMS" >&2; exit 2 ;;
  esac
  log "export $q"
  "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/student-$q" "${args[@]}" >/dev/null
done
for q in $FORMS; do
  res="$OUT/eval/$q.jsonl"
  [[ -f "$res.summary.json" ]] && continue
  log "eval $q"
  "$BIN/steper-run" eval --model "$OUT/student-$q" --index "$INDEX" \
    --data "$DATA/hotpotqa_dev500.jsonl.gz" --limit "$N" --workers "$WORKERS" --out "$res" >/dev/null
done
runs=()
for q in $FORMS; do runs+=("$q=$OUT/eval/$q.jsonl"); done
"$BIN/steper-run" compare --datasets hotpotqa "${runs[@]}" > "$OUT/compare.md"

python3 - "$OUT" "$FORMS" <<'PY'
import json, sys
out, forms = sys.argv[1], sys.argv[2].split()
rows = ["| export | questions | EM | F1 | Acc | forced | mean steps | new tokens / question | questions/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
for q in forms:
    s = json.load(open(f"{out}/eval/{q}.jsonl.summary.json"))
    n = s["questions"]
    rows.append(f"| {q} | {n} | {100 * s['em']:.1f} | {100 * s['f1']:.1f} | {100 * s['acc']:.1f} "
                f"| {100 * s['forced_share']:.0f} % | {s['mean_steps']:.2f} | {s['new_tokens'] / n:.1f} "
                f"| {s['questions_per_sec']:.3f} | {s['seconds']:.0f} |")
text = "\n".join(rows) + "\n\nPaired comparison against fp32:\n\n" + open(f"{out}/compare.md").read()
open(f"{out}/results.md", "w").write(text)
print(text)
PY
