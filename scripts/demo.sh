#!/usr/bin/env bash
# The main job on the embedded default (CPU, no server, no GPU): fetch the real SmolLM2-135M
# GGUF, import it as an HF-style checkpoint, and generate a continuation with the candle model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${STEPER_OUT:-$ROOT/out}"
mkdir -p "$OUT"
cargo build --release -p steper-train
GGUF="$(bash scripts/fetch-smollm2.sh)"
CKPT="$OUT/smollm2-135m"
if [[ ! -f "$CKPT/config.json" ]]; then
  ./target/release/steper-train import --gguf "$GGUF" --out "$CKPT"
fi
./target/release/steper-train generate --checkpoint "$CKPT" \
  --prompt "Wikipedia Title: Eiffel Tower
The Eiffel Tower is a wrought-iron lattice tower in Paris, France.

Q: In which city is the Eiffel Tower?
A:" --max-new-tokens 24
