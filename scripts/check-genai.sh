#!/usr/bin/env bash
# Real-model check and decode benchmark of steper-export on SmolLM2-135M-Instruct:
#  1. import the GGUF (steper-train import), export fp32 and fp16, `steper-export --verify`
#     (ort + tract against candle, greedy 32 tokens);
#  2. load the fp32 export with onnxruntime-genai (pip, in a venv under .cache) through its
#     genai_config.json and check it generates the same greedy tokens as our ort backend;
#  3. time decode with onnxruntime-genai and with `steper-run bench-decode` (ort CPU, tract; fp32,
#     fp16; 128-token prompt, 128 new tokens, warm-up, median of 3) and print the ratio;
#  4. a tiny random Qwen2 checkpoint (q/k/v biases; `--example tiny_family`), exported fp32 with
#     `--verify`, loaded by onnxruntime-genai through our genai_config.json (`"type": "qwen2"`):
#     its greedy tokens must be ours. `QWEN2_ONLY=1` runs this step alone (no SmolLM2 download).
# Output: JSON lines on stdout; exit 1 on any mismatch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${STEPER_CACHE:-$ROOT/.cache}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
CKPT="$CACHE/smollm2"
OUT32="$CACHE/smollm2-onnx-fp32"
OUT16="$CACHE/smollm2-onnx-fp16"
RUNS="${BENCH_RUNS:-3}"

VENV="$CACHE/genai-venv"
genai_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check onnxruntime-genai >&2
  fi
}

# Step 4: the Qwen2 family through onnxruntime-genai's own `qwen2` model type.
check_qwen2() {
  local ck="$CACHE/tiny-qwen2" out="$CACHE/tiny-qwen2-onnx"
  rm -rf "$ck" "$out"
  cargo run --release -q -p steper-export --example tiny_family -- --model-type qwen2 --out "$ck" >&2
  # Words of the example's word-level tokenizer (`t0`…`t95`), so the prompt ids vary.
  target/release/steper-export --checkpoint "$ck" --out "$out" --dtype fp32 --verify --json \
    --verify-prompt "t5 t17 t42 t8 t91 t3 t60 t33 t12 t70 t1 t88" > "$CACHE/verify-qwen2.json" || {
    cat "$CACHE/verify-qwen2.json"; echo "qwen2 verify failed" >&2; return 1; }
  genai_venv
  "$VENV/bin/python" - "$out" "$CACHE/verify-qwen2.json" <<'PY'
import json, sys
import onnxruntime_genai as og
out, verify = sys.argv[1], sys.argv[2]
cfg = json.load(open(out + "/genai_config.json"))
assert cfg["model"]["type"] == "qwen2", cfg["model"]["type"]
v = json.load(open(verify))["verify"]
prompt = v["prompt_tokens"]
ours = next(b for b in v["backends"] if b["backend"] == "ort")["greedy_tokens"]
model = og.Model(out)
p = og.GeneratorParams(model)
p.set_search_options(do_sample=False, max_length=len(prompt) + len(ours), min_length=len(prompt) + len(ours))
g = og.Generator(model, p)
g.append_tokens(prompt)
toks = []
while len(toks) < len(ours) and not g.is_done():
    g.generate_next_token()
    toks.append(int(g.get_next_tokens()[0]))
same = toks == ours
print(json.dumps({"qwen2_genai_greedy_identical": same, "verify_pass": v["pass"],
                  "genai": toks, "steper_ort": ours}))
sys.exit(0 if same and v["pass"] else 1)
PY
}

cargo build --release -q -p steper-export -p steper-runtime -p steper-train >&2
if [[ "${QWEN2_ONLY:-0}" == 1 ]]; then
  check_qwen2
  exit $?
fi
if [[ ! -s "$CKPT/config.json" ]]; then
  target/release/steper-train import --gguf "$(bash scripts/fetch-smollm2.sh)" --out "$CKPT" >&2
fi
target/release/steper-export --checkpoint "$CKPT" --out "$OUT32" --dtype fp32 --verify --json > "$CACHE/verify-fp32.json" || {
  cat "$CACHE/verify-fp32.json"; echo "fp32 verify failed" >&2; exit 1; }
target/release/steper-export --checkpoint "$CKPT" --out "$OUT16" --dtype fp16 --verify --json > "$CACHE/verify-fp16.json" || {
  cat "$CACHE/verify-fp16.json"; echo "fp16 verify failed" >&2; exit 1; }
python3 - "$CACHE/verify-fp32.json" "$CACHE/verify-fp16.json" <<'PY'
import json, sys
for p in sys.argv[1:]:
    v = json.load(open(p))["verify"]
    print(json.dumps({"verify": p, "pass": v["pass"], "tolerance": v["tolerance"]["name"],
        "backends": [{k: b[k] for k in ("backend", "max_abs", "max_rel", "greedy_identical", "pass")} for b in v["backends"]]}))
PY

genai_venv

"$VENV/bin/python" - "$OUT32" "$CACHE/verify-fp32.json" "$RUNS" <<'PY'
import json, statistics, sys, time
import onnxruntime_genai as og
out, verify, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
v = json.load(open(verify))["verify"]
prompt = v["prompt_tokens"]
ours = next(b for b in v["backends"] if b["backend"] == "ort")["greedy_tokens"]
model = og.Model(out)

def run(ids, n):
    p = og.GeneratorParams(model)
    p.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
    g = og.Generator(model, p)
    t0 = time.perf_counter()
    g.append_tokens(ids)
    tp = time.perf_counter() - t0
    toks = []
    t1 = time.perf_counter()
    for _ in range(n):
        if g.is_done():
            break
        g.generate_next_token()
        toks.append(int(g.get_next_tokens()[0]))
    td = time.perf_counter() - t1
    return toks, tp, td

toks, _, _ = run(prompt, len(ours))
same = toks == ours
print(json.dumps({"genai_greedy_identical": same, "genai": toks, "steper_ort": ours}))
vocab = json.load(open(out + "/genai_config.json"))["model"]["vocab_size"]
bench = [(i * 7919 + 17) % vocab for i in range(128)]
pre, dec = [], []
for r in range(runs + 1):
    _, tp, td = run(bench, 128)
    if r > 0:
        pre.append(128 / tp); dec.append(128 / td)
print(json.dumps({"genai_bench": {"model": out, "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec)}}))
sys.exit(0 if same else 1)
PY

target/release/steper-run bench-decode --model "$OUT32" --model "$OUT16" --runs "$RUNS" | tee "$CACHE/bench-decode.json"

check_qwen2
