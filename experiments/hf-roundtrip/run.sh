#!/usr/bin/env bash
# Builds a tiny Llama-3.2-style checkpoint with our code (bf16, sharded with an index, tied
# embeddings, llama3 RoPE scaling, several eos ids in generation_config.json) and checks that
# Hugging Face transformers loads it unchanged and computes our logits.
#
# usage: bash experiments/hf-roundtrip/run.sh [OUT_DIR]
# A venv is made in $HF_VENV (default experiments/hf-roundtrip/.venv) with torch, transformers,
# safetensors and numpy from PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/hf-roundtrip}"
venv="${HF_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, transformers, safetensors, numpy" 2>/dev/null; then
  "$venv/bin/pip" install -q torch transformers safetensors numpy
fi
rm -rf "$out"
mkdir -p "$out"
(cd "$root" && cargo run -q -p steper-models --example hf_roundtrip -- "$out")
"$venv/bin/python" "$here/compare.py" "$out" | tee "$out/compare.json"
