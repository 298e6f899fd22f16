#!/usr/bin/env bash
# Would int8 activations (W8A8, ONNX Runtime's DynamicQuantizeMatMul = the MLAS u8s8 GEMM) make
# prefill faster than the int8 MatMulNBits export, and at what accuracy? A measurement, not a
# product path: SmolLM2-135M-Instruct exported fp32 and int8 (MatMulNBits, block 32), the int8
# graph rewritten by convert.py (all linears; and with down_proj + lm_head kept as
# MatMulNBits), then in one run: the kernel micro-benchmark (gemm.py, SmolLM2's shapes),
# `steper-run bench-decode` of the four exports (1,024- and 128-token prompts, 64 new tokens),
# and next-token agreement with fp32 over 8 HotpotQA prompts (export's quant_agreement example).
#
# Environment: OUT (out/w8a8-prefill), BIN_DIR (prebuilt binaries incl. examples/quant_agreement;
# else a release build), THREADS (2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/experiments/w8a8-prefill"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/w8a8-prefill}"
THREADS="${THREADS:-2}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime >&2
  cargo build --release -q -p steper-export --example quant_agreement >&2
  BIN="$ROOT/target/release"
fi
VENV="$ROOT/.cache/w8a8-venv"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check onnxruntime==1.31.1 onnx numpy >&2
fi
mkdir -p "$OUT"
[[ -f "$OUT/smollm2/config.json" ]] || "$BIN/steper-train" import --gguf "$GGUF" --out "$OUT/smollm2" >/dev/null
[[ -f "$OUT/fp32/steper.json" ]] || "$BIN/steper-export" --checkpoint "$OUT/smollm2" --out "$OUT/fp32" >/dev/null
[[ -f "$OUT/int8/steper.json" ]] || "$BIN/steper-export" --checkpoint "$OUT/smollm2" --out "$OUT/int8" \
  --quantize int8 --block-size 32 >/dev/null
convert() {  # convert NAME SKIP
  [[ -f "$OUT/$1/model.onnx" ]] && return
  rm -rf "$OUT/$1.tmp"
  cp -rL "$OUT/int8" "$OUT/$1.tmp"
  "$VENV/bin/python" "$HERE/convert.py" "$OUT/int8/model.onnx" "$OUT/$1.tmp/model.onnx" "$2" >&2
  mv "$OUT/$1.tmp" "$OUT/$1"
}
convert w8a8-all ""
convert w8a8-nodown "down_proj,embed_tokens"

echo "## kernel (gemm.py, $THREADS threads)"
for s in "1024 576 960" "1024 576 3072" "1024 1536 576" "128 576 3072" "1 576 3072"; do
  echo "### M K N = $s"
  "$VENV/bin/python" "$HERE/gemm.py" $s
done
echo "## bench-decode"
for p in 1024 128; do
  "$BIN/steper-run" bench-decode --backends ort --model "$OUT/fp32" --model "$OUT/int8" \
    --model "$OUT/w8a8-all" --model "$OUT/w8a8-nodown" --prompt-tokens "$p" --new-tokens 64 \
    --runs 3 --threads "$THREADS" > "$OUT/bench.$p.json"
  python3 - "$OUT/bench.$p.json" <<'PY'
import json, os, sys
rows = json.load(open(sys.argv[1]))["bench_decode"]
ref = rows[0]
for r in rows:
    print(f"{r['prompt_tokens']:5d} {os.path.basename(str(r['model'])):12s} prefill {r['prefill_tok_s']:7.1f} "
          f"({r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}× fp32)  decode {r['decode_tok_s']:6.1f} "
          f"({r['decode_tok_s'] / ref['decode_tok_s']:.2f}× fp32)")
PY
done
echo "## next-token agreement with fp32 (8 HotpotQA prompts, 64 tokens)"
for c in int8 w8a8-all w8a8-nodown; do
  "$BIN/examples/quant_agreement" --reference "$OUT/fp32" --candidate "$OUT/$c" \
    --data "$ROOT/data/hotpotqa_dev500.jsonl.gz" --prompts 8 --new-tokens 64 \
    --threads "$THREADS" 2>/dev/null > "$OUT/agree.$c.json"
  python3 - "$OUT/agree.$c.json" "$c" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["agreement"]
print(f"{sys.argv[2]:12s} teacher-forced {a['teacher_forced']:.3f}  free-running {a['free_running']:.3f}  "
      f"common prefix {a['mean_common_prefix']:.2f}")
PY
done
