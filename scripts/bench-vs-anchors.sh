#!/usr/bin/env bash
# Decode and prefill speed of our SmolLM2-135M-Instruct exports against llama.cpp on the same
# machine, in the same run, on the same model: llama.cpp's own `llama-bench` on the Q4_1 GGUF
# (the file the checkpoint is imported from); `steper-run bench-decode` on the fp32, int8 and
# int4 (MatMulNBits, block 32, accuracy_level 4) ONNX exports of that checkpoint on the ort
# backend, each with standard-operator attention and with GroupQueryAttention (`*-gqa`,
# --attention gqa), and on the fp32 export on tract (tract refuses the quantized and GQA
# exports); and onnxruntime-genai (PyPI, in .cache/genai-venv) on our int4 and int4-gqa exports. The tools alternate ROUNDS
# times (one measured run each per round, after a warm-up) so that drift on a shared machine
# hits all of them; the medians and their ratios are printed as JSON + a markdown table and
# written to $OUT/bench-vs-anchors.json and $OUT/bench-vs-anchors.md.
#
# llama.cpp is built from the sources vendored in PyPI's llama-cpp-python sdist (the only way to
# get it here: no binary wheel exists and GitHub is unreachable), `llama-bench` target only,
# with CMake/Ninja from PyPI when the system has none. Built once into .cache/llama.cpp-bench.
#
# Environment: PROMPT (128), NEW (128), THREADS (2), ROUNDS (3), OUT (out/bench-vs-anchors),
# LLAMA_CPP_PYTHON (sdist requirement, llama-cpp-python==0.3.36), BIN_DIR (prebuilt steper
# binaries; else a release build), BUILD_ONLY (1: build llama-bench and stop), GENAI (1: also
# onnxruntime-genai; 0 skips it), TRACT (1: also tract on fp32; 0 skips it), ORT_ALSO (another
# ONNX Runtime version from PyPI, e.g. 1.32.0: the int4 / int4-gqa rows once more on that
# library, in the same rounds; empty: none).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROMPT="${PROMPT:-128}"
NEW="${NEW:-128}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-$ROOT/out/bench-vs-anchors}"
REQ="${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}"
CACHE="$ROOT/.cache"
LLAMA="$CACHE/llama.cpp-bench"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
ORT_ALSO="${ORT_ALSO:-}"
ORT_ALSO_LIB=""
[[ -n "$ORT_ALSO" ]] && ORT_ALSO_LIB="$(ORT_VERSION="$ORT_ALSO" bash scripts/install-ort.sh)"
GGUF="$(bash scripts/fetch-smollm2.sh)"
source scripts/bench-common.sh

# 1. llama-bench from the llama-cpp-python sdist.
if [[ ! -x "$LLAMA/bin/llama-bench" ]]; then
  tools="$CACHE/bench-tools-venv"
  if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    [[ -x "$tools/bin/cmake" && -x "$tools/bin/ninja" ]] || {
      python3 -m venv "$tools"
      "$tools/bin/pip" install --quiet cmake ninja >&2
    }
    export PATH="$tools/bin:$PATH"
  fi
  src="$CACHE/llama.cpp-src"
  if [[ ! -f "$src/CMakeLists.txt" ]]; then
    dl="$(mktemp -d)"
    log "downloading the $REQ sdist"
    python3 -m pip download --quiet --no-deps --no-binary "${REQ%%=*}" -d "$dl" "$REQ" >&2
    rm -rf "$src.tmp"
    mkdir -p "$src.tmp"
    tar xzf "$dl"/*.tar.gz -C "$src.tmp" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
    rm -rf "$dl" "$src"
    mv "$src.tmp" "$src"
  fi
  log "building llama-bench (llama.cpp from $REQ)"
  t=$(date +%s)
  # Native ISA, but no AMX: this VM's CPU reports AMX tiles and ggml's AMX Q4_1 kernel
  # segfaults in it (the tile state is not usable here); the AVX-512 VNNI kernels remain.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$src/build" --target llama-bench -j "$(nproc)" >&2
  mkdir -p "$LLAMA/bin"
  cp "$src/build/bin/llama-bench" "$LLAMA/bin/llama-bench.tmp"
  mv "$LLAMA/bin/llama-bench.tmp" "$LLAMA/bin/llama-bench"
  log "llama-bench built in $(( $(date +%s) - t )) s"
fi

[[ "${BUILD_ONLY:-0}" == 1 ]] && exit 0

# 2. our exports of the same model.
steper_bin
mkdir -p "$OUT"
CKPT="$OUT/smollm2"
smollm2_checkpoint "$CKPT"
# *-gqa: the same export with ONNX Runtime's GroupQueryAttention (--attention gqa)
for q in fp32 int8 int4 fp32-gqa int8-gqa int4-gqa; do
  args=()
  bits="${q%-gqa}"
  [[ "$bits" != fp32 ]] && args=(--quantize "$bits" --block-size 32)
  [[ "$q" == *-gqa ]] && args+=(--attention gqa)
  smollm2_export "$CKPT" "$OUT/onnx-$q" "${args[@]}"
done

GENAI="${GENAI:-1}"
TRACT="${TRACT:-1}"
if [[ "$GENAI" == 1 ]]; then
  genai_venv
  # genai reads the intra-op thread count from genai_config.json's session options.
  for e in int4 int4-gqa; do
    genai_threads "$OUT/onnx-$e" "$THREADS"
  done
fi

# 3. alternate the tools.
RAW="$OUT/raw"
rm -rf "$RAW"
mkdir -p "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS: llama-bench"
  "$LLAMA/bin/llama-bench" -m "$GGUF" -p "$PROMPT" -n "$NEW" -t "$THREADS" -r 1 -o json \
    > "$RAW/llama.$r.json" 2>"$RAW/llama.$r.log"
  log "round $r/$ROUNDS: steper-run bench-decode ort (fp32, int8, int4; standard and GQA attention)"
  "$BIN/steper-run" bench-decode --model "$OUT/onnx-fp32" --model "$OUT/onnx-int8" \
    --model "$OUT/onnx-int4" --model "$OUT/onnx-fp32-gqa" --model "$OUT/onnx-int8-gqa" \
    --model "$OUT/onnx-int4-gqa" --backends ort --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
    --threads "$THREADS" --runs 1 > "$RAW/steper.$r.json"
  if [[ -n "$ORT_ALSO_LIB" ]]; then
    log "round $r/$ROUNDS: steper-run bench-decode ort $ORT_ALSO (int4, int4-gqa)"
    ORT_DYLIB_PATH="$ORT_ALSO_LIB" "$BIN/steper-run" bench-decode --model "$OUT/onnx-int4" \
      --model "$OUT/onnx-int4-gqa" --backends ort --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
      --threads "$THREADS" --runs 1 > "$RAW/ort-also.$r.json"
  fi
  if [[ "$TRACT" == 1 ]]; then
    log "round $r/$ROUNDS: steper-run bench-decode tract (fp32)"
    "$BIN/steper-run" bench-decode --model "$OUT/onnx-fp32" --backends tract \
      --prompt-tokens "$PROMPT" --new-tokens "$NEW" --threads "$THREADS" --runs 1 \
      > "$RAW/tract.$r.json"
  fi
  if [[ "$GENAI" == 1 ]]; then
    log "round $r/$ROUNDS: onnxruntime-genai (int4)"
    genai_decode "$OUT/onnx-int4" "$PROMPT" "$NEW" > "$RAW/genai.$r.json"
    genai_decode "$OUT/onnx-int4-gqa" "$PROMPT" "$NEW" > "$RAW/genai-gqa.$r.json"
  fi
done

ORT_MAIN="$(basename "$ORT_DYLIB_PATH" | sed 's/^libonnxruntime\.so\.//')"
python3 - "$RAW" "$ROUNDS" "$OUT/bench-vs-anchors.json" "$PROMPT" "$NEW" "$THREADS" "$ORT_MAIN" "$ORT_ALSO" <<'EOF'
import json, os, statistics, sys
raw, rounds, out, prompt, new, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
ort_main, ort_also = sys.argv[7], sys.argv[8]
samples = {}  # system name -> {"prefill": [...], "decode": [...]}
def add(name, pre, dec):
    d = samples.setdefault(name, {"prefill": [], "decode": []})
    d["prefill"].append(pre)
    d["decode"].append(dec)
for r in range(1, rounds + 1):
    for row in json.load(open(f"{raw}/llama.{r}.json")):
        # llama-bench: n_prompt > 0 is the prompt-processing test, n_gen > 0 the generation one.
        kind = "prefill" if row["n_prompt"] > 0 and row["n_gen"] == 0 else "decode"
        samples.setdefault("llama.cpp Q4_1", {"prefill": [], "decode": []})[kind].append(row["avg_ts"])
    for f, backend in ((f"steper.{r}.json", "ort"), (f"ort-also.{r}.json", f"ort {ort_also}"),
                       (f"tract.{r}.json", "tract")):
        if not os.path.exists(f"{raw}/{f}"):
            continue
        for row in json.load(open(f"{raw}/{f}"))["bench_decode"]:
            name = os.path.basename(str(row["model"])).removeprefix("onnx-")
            add(f"steper-run {backend} {name}", row["prefill_tok_s"], row["decode_tok_s"])
    for f, name in (("genai", "onnxruntime-genai int4 (our export)"),
                    ("genai-gqa", "onnxruntime-genai int4-gqa (our export)")):
        if os.path.exists(f"{raw}/{f}.{r}.json"):
            g = json.load(open(f"{raw}/{f}.{r}.json"))
            add(name, g["prefill_tok_s"], g["decode_tok_s"])
med = lambda xs: statistics.median(xs) if xs else None
medians = {n: {k: med(v) for k, v in d.items()} for n, d in samples.items()}
ref = medians["llama.cpp Q4_1"]
fp32 = medians.get("steper-run ort fp32", {})
ratios = {}
for n, d in medians.items():
    ratios[n] = {f"{k}_vs_llama_cpp": round(d[k] / ref[k], 3) for k in ("prefill", "decode") if d[k] and ref[k]}
    ratios[n].update({f"{k}_vs_ort_fp32": round(d[k] / fp32[k], 3) for k in ("prefill", "decode") if d[k] and fp32.get(k)})
report = {
    "prompt_tokens": prompt, "new_tokens": new, "threads": threads, "rounds": rounds,
    "onnxruntime": ort_main, "onnxruntime_also": ort_also or None,
    "medians_tok_s": medians, "ratios": ratios, "samples": samples,
}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
os.replace(tmp, out)
md = [f"SmolLM2-135M-Instruct, {prompt}-token prompt + {new} greedy tokens, {threads} threads, median of {rounds}; "
      f"steper-run on ONNX Runtime {ort_main}" + (f" (rows marked {ort_also}: that version)" if ort_also else ""), "",
      "| system | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | decode vs ort fp32 |",
      "|---|---|---|---|---|---|"]
for n, d in medians.items():
    r = ratios[n]
    md.append(f"| {n} | {d['prefill']:.1f} | {d['decode']:.1f} | {r.get('prefill_vs_llama_cpp', '–')}× | "
              f"{r.get('decode_vs_llama_cpp', '–')}× | {r.get('decode_vs_ort_fp32', '–')}× |")
mdp = out.removesuffix(".json") + ".md"
open(mdp + ".tmp", "w").write("\n".join(md) + "\n")
os.replace(mdp + ".tmp", mdp)
print(json.dumps({k: report[k] for k in ("medians_tok_s", "ratios")}, indent=2))
print("\n".join(md))
EOF
