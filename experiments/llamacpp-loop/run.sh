#!/usr/bin/env bash
# Our multi-step loop (`steper-run eval`) against the same loop as a plain Python script on
# llama.cpp (llama-cpp-python, its prompt cache reused across steps), on the same SmolLM2 GGUF,
# the same questions, the same BM25 settings and template, in one run; prints JSON with each
# side's questions/s, EM, F1, forced share and tokens, and the ratios.
#
# usage: experiments/llamacpp-loop/run.sh [LIMIT (100)] [QA (data/hotpotqa_dev500.jsonl.gz)]
# A trained student instead of the base model: STUDENT=<checkpoint directory> (one imported from
# the SmolLM2 GGUF by `steper-train import` and trained); llama.cpp then runs
# `steper-export --format gguf` of it on that GGUF (its frozen tensors the GGUF's own Q4_1 blocks,
# the trained ones GGUF_TYPE, q8_0 by default) and our exports are made from it.
# env: BIN_DIR (prebuilt binaries, else a release build), OUT (out/llamacpp-loop), EXPORTS (our
# export forms, "int4-gqa int8-gqa int4"; int4/int8 = --quantize, fp32 = none, -gqa = --attention gqa),
# WORKERS (2) and THREADS (1: ONNX Runtime threads per worker) of `steper-run eval`, LLAMA_THREADS
# (2), LLAMA_CPP_PYTHON (llama-cpp-python==0.3.36, built from its sdist into
# .cache/llamacpp-venv on first use: no binary wheel exists).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
LIMIT="${1:-100}"
QA="${2:-$ROOT/data/hotpotqa_dev500.jsonl.gz}"
OUT="${OUT:-$ROOT/out/llamacpp-loop}"
EXPORTS="${EXPORTS:-int4-gqa int8-gqa int4}"
WORKERS="${WORKERS:-2}"
THREADS="${THREADS:-1}"
LLAMA_THREADS="${LLAMA_THREADS:-2}"
REQ="${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}"
CACHE="${STEPER_CACHE:-$ROOT/.cache}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$OUT"

VENV="$CACHE/llamacpp-venv"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  log "building $REQ into $VENV (llama.cpp from source; minutes)"
  python3 -m venv "$VENV"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$REQ" >&2
fi

if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime >&2
  BIN="$ROOT/target/release"
fi
GGUF="$(bash scripts/fetch-smollm2.sh)"
if [[ -n "${STUDENT:-}" ]]; then
  [[ -f "$STUDENT/config.json" ]] || { echo "STUDENT=$STUDENT: no config.json there" >&2; exit 1; }
  CKPT="$STUDENT"
  BASE_GGUF="$GGUF"
  GGUF="$OUT/student.gguf"
  if [[ ! -f "$GGUF" ]]; then
    log "steper-export --format gguf (base $BASE_GGUF)"
    "$BIN/steper-export" --checkpoint "$CKPT" --format gguf --gguf-base "$BASE_GGUF" \
      --gguf-type "${GGUF_TYPE:-q8_0}" --out "$GGUF" --json >"$OUT/student-gguf.json"
  fi
else
  CKPT="$OUT/smollm2"
  if [[ ! -f "$CKPT/config.json" ]]; then
    rm -rf "$CKPT"
    "$BIN/steper-train" import --gguf "$GGUF" --out "$CKPT" >/dev/null
  fi
fi
NAME="$(basename "$QA")"
NAME="${NAME%.gz}"
NAME="${NAME%.jsonl}"
INDEX="$OUT/index-$NAME"
if [[ ! -f "$INDEX.done" ]]; then
  rm -rf "$INDEX"
  "$BIN/steper-run" index --from-qa "$QA" --out "$INDEX" >/dev/null
  touch "$INDEX.done"
fi

for q in $EXPORTS; do
  if [[ ! -f "$OUT/onnx-$q/steper.json" ]]; then
    rm -rf "$OUT/onnx-$q"
    bits="${q%-gqa}"
    args=()
    [[ "$bits" != fp32 ]] && args+=(--quantize "$bits" --block-size 32)
    [[ "$q" == *-gqa ]] && args+=(--attention gqa)
    log "export $q"
    "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/onnx-$q" "${args[@]}" >/dev/null
  fi
done

# Both sides in the same run, one after the other on the idle machine.
for q in $EXPORTS; do
  log "steper-run eval $q ($WORKERS workers × $THREADS threads)"
  "$BIN/steper-run" eval --model "$OUT/onnx-$q" --index "$INDEX" --data "$QA" --limit "$LIMIT" \
    --workers "$WORKERS" --threads "$THREADS" --out "$OUT/steper-$q-$NAME.jsonl" >/dev/null
done
log "llama.cpp loop ($LLAMA_THREADS threads)"
"$VENV/bin/python" "$ROOT/experiments/llamacpp-loop/ircot_llamacpp.py" "$GGUF" "$QA" "$LIMIT" \
  "$OUT/llamacpp-$NAME.json" --threads "$LLAMA_THREADS" >/dev/null

python3 - "$OUT" "$NAME" "$EXPORTS" "$WORKERS" "$THREADS" "$GGUF" <<'PY'
import json, sys
out, name, exports, workers, threads, gguf = sys.argv[1], sys.argv[2], sys.argv[3].split(), *sys.argv[4:7]
theirs = json.load(open(f"{out}/llamacpp-{name}.json"))["summary"]
rows = {}
for q in exports:
    s = json.load(open(f"{out}/steper-{q}-{name}.jsonl.summary.json"))
    rows[q] = {
        "config": f"{q} export, {workers} workers x {threads} threads",
        "questions": s["questions"], "questions_per_sec": s["questions_per_sec"],
        "em": s["em"], "f1": s["f1"], "forced_share": s["forced_share"], "mean_steps": s["mean_steps"],
        "seconds": s["seconds"],
        "ratio_questions_per_sec": s["questions_per_sec"] / theirs["questions_per_sec"],
    }
print(json.dumps({"gguf": gguf, "llamacpp_python_loop": theirs, "steper_run": rows}, indent=1))
PY
