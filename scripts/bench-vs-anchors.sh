#!/usr/bin/env bash
# Decode and prefill speed of our SmolLM2-135M-Instruct exports against llama.cpp on the same
# machine, in the same run, on the same model: llama.cpp's own `llama-bench` on the Q4_1 GGUF
# (the file the checkpoint is imported from) and `steper-run bench-decode` on the fp32 and
# int4 (MatMulNBits, block 32, accuracy_level 4) ONNX exports of that checkpoint, ort backend.
# The two tools alternate ROUNDS times (one measured run each per round, after a warm-up) so
# that drift on a shared machine hits both; the medians and their ratios are printed as JSON
# and written to $OUT/bench-vs-anchors.json.
#
# llama.cpp is built from the sources vendored in PyPI's llama-cpp-python sdist (the only way to
# get it here: no binary wheel exists and GitHub is unreachable), `llama-bench` target only,
# with CMake/Ninja from PyPI when the system has none. Built once into .cache/llama.cpp-bench.
#
# Environment: PROMPT (128), NEW (128), THREADS (2), ROUNDS (3), OUT (out/bench-vs-anchors),
# LLAMA_CPP_PYTHON (sdist requirement, llama-cpp-python==0.3.36), BIN_DIR (prebuilt steper
# binaries; else a release build), BUILD_ONLY (1: build llama-bench and stop).
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
GGUF="$(bash scripts/fetch-smollm2.sh)"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

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
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
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
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime >&2
  BIN="$ROOT/target/release"
fi
mkdir -p "$OUT"
CKPT="$OUT/smollm2"
if [[ ! -f "$CKPT/config.json" ]]; then
  rm -rf "$CKPT"
  "$BIN/steper-train" import --gguf "$GGUF" --out "$CKPT" >/dev/null
fi
for q in fp32 int4; do
  if [[ ! -f "$OUT/onnx-$q/steper.json" ]]; then
    rm -rf "$OUT/onnx-$q"
    args=()
    [[ "$q" == int4 ]] && args=(--quantize int4 --block-size 32)
    "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/onnx-$q" "${args[@]}" >/dev/null
  fi
done

# 3. alternate the two tools.
RAW="$OUT/raw"
rm -rf "$RAW"
mkdir -p "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS: llama-bench"
  "$LLAMA/bin/llama-bench" -m "$GGUF" -p "$PROMPT" -n "$NEW" -t "$THREADS" -r 1 -o json \
    > "$RAW/llama.$r.json" 2>"$RAW/llama.$r.log"
  log "round $r/$ROUNDS: steper-run bench-decode (fp32, int4)"
  "$BIN/steper-run" bench-decode --model "$OUT/onnx-fp32" --model "$OUT/onnx-int4" \
    --backends ort --prompt-tokens "$PROMPT" --new-tokens "$NEW" --threads "$THREADS" --runs 1 \
    > "$RAW/steper.$r.json"
done

python3 - "$RAW" "$ROUNDS" "$OUT/bench-vs-anchors.json" "$PROMPT" "$NEW" "$THREADS" <<'EOF'
import json, os, statistics, sys
raw, rounds, out, prompt, new, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
llama = {"prefill": [], "decode": []}
ours = {}
for r in range(1, rounds + 1):
    for row in json.load(open(f"{raw}/llama.{r}.json")):
        # llama-bench: n_prompt > 0 is the prompt-processing test, n_gen > 0 the generation one.
        kind = "prefill" if row["n_prompt"] > 0 and row["n_gen"] == 0 else "decode"
        llama[kind].append(row["avg_ts"])
    for row in json.load(open(f"{raw}/steper.{r}.json"))["bench_decode"]:
        name = os.path.basename(str(row["model"])).removeprefix("onnx-")
        d = ours.setdefault(name, {"prefill": [], "decode": []})
        d["prefill"].append(row["prefill_tok_s"])
        d["decode"].append(row["decode_tok_s"])
med = lambda xs: statistics.median(xs) if xs else None
report = {
    "prompt_tokens": prompt, "new_tokens": new, "threads": threads, "rounds": rounds,
    "llama_cpp_q4_1": {k: med(v) for k, v in llama.items()},
    "steper_ort": {n: {k: med(v) for k, v in d.items()} for n, d in ours.items()},
    "samples": {"llama_cpp_q4_1": llama, "steper_ort": ours},
}
ratios = {}
for n, d in report["steper_ort"].items():
    for k in ("prefill", "decode"):
        ref = report["llama_cpp_q4_1"][k]
        if ref and d[k]:
            ratios[f"{n}_{k}_vs_llama_cpp"] = round(d[k] / ref, 3)
report["ratios"] = ratios
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
os.replace(tmp, out)
print(json.dumps({k: report[k] for k in ("llama_cpp_q4_1", "steper_ort", "ratios")}, indent=2))
EOF
