#!/usr/bin/env bash
# The OpenAI-compatible teacher against a real OpenAI-compatible server on loopback:
# llama-cpp-python's server (PyPI `llama-cpp-python[server]`, built from source into a venv under
# .cache/) serving the SmolLM2-135M-Instruct GGUF, then `steper-train distill --teacher
# openai:http://127.0.0.1:PORT` on the first N HotpotQA dev questions (completions endpoint with
# the few-shot teacher prompt, then the chat endpoint). Prints both summaries as JSON.
#
# Not run by CI: compiling llama.cpp from source takes many minutes on a 2-core machine.
# Environment: N (questions, default 10), PORT (default 18089), CONCURRENCY (default 2),
# LLAMA_CPP_PYTHON (pip requirement, default llama-cpp-python[server]==0.3.36).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${N:-10}"
PORT="${PORT:-18089}"
CONCURRENCY="${CONCURRENCY:-2}"
REQ="${LLAMA_CPP_PYTHON:-llama-cpp-python[server]==0.3.36}"
VENV="$ROOT/.cache/llama-venv"
WORK="$ROOT/.cache/openai-check"
DATA="$ROOT/data/hotpotqa_dev500.jsonl.gz"

if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  # llama-cpp-python ships an sdist only: pip builds llama.cpp with CMake (scikit-build-core
  # brings cmake and ninja from PyPI when the system has none; gcc/g++ are needed).
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install "$REQ" >&2
  echo "installed $REQ in $(( $(date +%s) - start )) s" >&2
fi
GGUF="$(bash scripts/fetch-smollm2.sh)"

cargo build --quiet -p steper-train --bin steper-train >&2
cargo build --quiet -p steper-runtime --bin steper-run >&2
rm -rf "$WORK"
mkdir -p "$WORK"
zcat "$DATA" | sed -n "1,${N}p" > "$WORK/questions.jsonl"
target/debug/steper-run index --from-qa "$DATA" --out "$WORK/index" >&2

"$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias smollm2-135m-instruct \
  --host 127.0.0.1 --port "$PORT" --n_ctx 8192 --n_threads "$(nproc)" \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then cat "$WORK/server.log" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

run() {
  local out="$1"; shift
  target/debug/steper-train distill --teacher "openai:http://127.0.0.1:$PORT" \
    --teacher-model smollm2-135m-instruct --teacher-prompt default --teacher-context 8192 \
    --concurrency "$CONCURRENCY" --data "$WORK/questions.jsonl" --index "$WORK/index" \
    --out "$WORK/$out" --vanilla --json "$@"
}
echo "== /v1/completions (few-shot teacher prompt) =="
run completions
echo "== /v1/chat/completions (chat template, instruction as system message) =="
run chat --teacher-chat
