#!/usr/bin/env bash
# Accuracy of the quantized SmolLM2 paths, one command, resumable (each output is skipped when
# it exists):
#   1. W8A8 (steper-calibrate, QDQ for TensorRT): next-token top-1 agreement with fp32 on 16
#      held-out step-wise prompts, for: no smoothing, SmoothQuant-style smoothing at α 0.5 /
#      0.8 / 0.9 / 1.0, the two outlier down_proj layers (11, 28) kept in float, and both. One range
#      collection (with per-channel maxima); the other rows reuse it (--ranges).
#   2. weight-only int4 / int8 (steper-export --quantize, MatMulNBits): HotpotQA dev EM / F1 /
#      Acc of a trained student, fp32 vs int4 (lm_head int4 or float) vs int8 on the same N
#      questions (own pool index), questions/s with --batch (and without: UNBATCHED=1).
# Needs: an fp32 SmolLM2 export (FP32, e.g. from scripts/bench-vs-anchors.sh), step-wise records
# (RECORDS, e.g. out/real-student/records/stepwise.jsonl), a trained checkpoint (CKPT) and the
# hotpotqa_dev500 index (INDEX) — experiments/real-student/run.sh makes the last three.
# Knobs (env): OUT (out/quant-accuracy), BIN_DIR (prebuilt binaries, else a release build),
# N (100), BATCH (4), THREADS (2), UNBATCHED (0), FHEAD (0: 1 also evaluates int4 with a float
# lm_head).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/quant-accuracy}"
FP32="${FP32:-$ROOT/out/bench-vs-anchors/onnx-fp32}"
RECORDS="${RECORDS:-$ROOT/out/real-student/records/stepwise.jsonl}"
CKPT="${CKPT:-$ROOT/out/real-student/runs/steper-seed0/ckpt}"
INDEX="${INDEX:-$ROOT/out/real-student/index/hotpotqa_dev500}"
N="${N:-100}"
BATCH="${BATCH:-4}"
THREADS="${THREADS:-2}"
DATA="$ROOT/data"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-calibration -p steper-export -p steper-runtime
  BIN="$ROOT/target/release"
fi
for f in "$FP32/steper.json" "$RECORDS" "$CKPT/config.json" "$INDEX"; do
  [[ -e "$f" ]] || { echo "missing $f (see the header of $0)" >&2; exit 1; }
done
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# 1. W8A8 rows
OUTLIERS="layers.11.mlp.down_proj,layers.28.mlp.down_proj"
calib() {  # calib NAME [flags...]
  local name="$1"; shift
  [[ -f "$OUT/w8a8/$name/report.json" ]] && return 0
  local ranges=()
  [[ "$name" != smooth-0.5 ]] && ranges=(--ranges "$OUT/w8a8/smooth-0.5/calibration.json")
  log "w8a8 $name"
  "$BIN/steper-calibrate" --model "$FP32" --data "$RECORDS" --samples 64 --holdout 16 \
    --method minmax --max-tokens 384 --threads "$THREADS" --greedy-tokens 0 --bench-tokens 0 \
    "${ranges[@]}" "$@" --json --out "$OUT/w8a8/$name" > /dev/null
}
calib smooth-0.5 --smooth-alpha 0.5
calib none
calib smooth-0.8 --smooth-alpha 0.8
calib smooth-0.9 --smooth-alpha 0.9
calib smooth-1.0 --smooth-alpha 1.0
calib float-outliers --keep-float "$OUTLIERS"
calib smooth-0.5-float-outliers --smooth-alpha 0.5 --keep-float "$OUTLIERS"
calib smooth-0.8-float-outliers --smooth-alpha 0.8 --keep-float "$OUTLIERS"
calib smooth-0.9-float-outliers --smooth-alpha 0.9 --keep-float "$OUTLIERS"
# which kind of layer loses the accuracy: each kept in float in turn (α 0.8)
calib sens-0.8-float-o_proj --smooth-alpha 0.8 --keep-float o_proj
calib sens-0.8-float-down_proj --smooth-alpha 0.8 --keep-float down_proj
calib sens-0.8-float-qkv --smooth-alpha 0.8 --keep-float q_proj,k_proj,v_proj
calib sens-0.8-float-gate_up --smooth-alpha 0.8 --keep-float gate_proj,up_proj
DOWN8="layers.11.mlp.down_proj,layers.28.mlp.down_proj,layers.2.mlp.down_proj,layers.9.mlp.down_proj"
DOWN8="$DOWN8,layers.29.mlp.down_proj,layers.1.mlp.down_proj,layers.10.mlp.down_proj,layers.27.mlp.down_proj"
calib sens-0.8-float-down8 --smooth-alpha 0.8 --keep-float "$DOWN8"
calib sens-none-float-down_proj --keep-float down_proj

# 2. int4 vs fp32 on HotpotQA
for q in fp32 int4 int4-fhead int8; do
  if [[ ! -f "$OUT/student-$q/steper.json" ]]; then
    args=()
    case "$q" in
      int4) args=(--quantize int4) ;;
      int4-fhead) args=(--quantize int4 --quantize-lm-head false) ;;
      int8) args=(--quantize int8) ;;
    esac
    "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/student-$q" "${args[@]}" > /dev/null
  fi
done
evaluate() {  # evaluate NAME MODEL BATCH
  local res="$OUT/eval/$1.jsonl"
  [[ -f "$res.summary.json" ]] && return 0
  mkdir -p "$OUT/eval"
  log "eval $1"
  "$BIN/steper-run" eval --model "$2" --index "$INDEX" --data "$DATA/hotpotqa_dev500.jsonl.gz" \
    --limit "$N" --batch "$3" --threads "$THREADS" --out "$res" > /dev/null
}
evaluate "fp32-batch$BATCH" "$OUT/student-fp32" "$BATCH"
evaluate "int4-batch$BATCH" "$OUT/student-int4" "$BATCH"
evaluate "int8-batch$BATCH" "$OUT/student-int8" "$BATCH"
[[ "${FHEAD:-0}" == 1 ]] && evaluate "int4-fhead-batch$BATCH" "$OUT/student-int4-fhead" "$BATCH"
[[ "${UNBATCHED:-0}" == 1 ]] && evaluate "int8-batch1" "$OUT/student-int8" 1

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = ["| W8A8 configuration | top-1 agreement | mean KL | quantized / float linears |", "|---|---|---|---|"]
for d in sorted(glob.glob(f"{out}/w8a8/*/report.json")):
    r = json.load(open(d))
    a = r["agreement"]
    rows.append(f"| {os.path.basename(os.path.dirname(d))} | {100*a['top1']:.1f} % ({a['positions']} positions) | {a['mean_kl']:.3f} | {r['qdq']['quantized_linears']} / {r['qdq']['float_linears']} |")
rows += ["", "| HotpotQA eval | EM | F1 | Acc | questions/s | wall s |", "|---|---|---|---|---|---|"]
for f in sorted(glob.glob(f"{out}/eval/*.summary.json")):
    s = json.load(open(f))
    rows.append(f"| {os.path.basename(f).removesuffix('.jsonl.summary.json')} ({s['questions']} q) | {100*s['em']:.1f} | {100*s['f1']:.1f} | {100*s['acc']:.1f} | {s['questions_per_sec']:.3f} | {s['seconds']:.0f} |")
text = "\n".join(rows) + "\n"
open(f"{out}/results.md.tmp", "w").write(text)
os.replace(f"{out}/results.md.tmp", f"{out}/results.md")
print(text)
PY
