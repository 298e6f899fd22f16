#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need (the ONNX Runtime
# library, the SmolLM2 GGUF), then runs every test of the workspace.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ORT_DYLIB_PATH="$(bash scripts/install-ort.sh)"
export ORT_DYLIB_PATH
STEPER_SMOLLM2_GGUF="$(bash scripts/fetch-smollm2.sh)"
export STEPER_SMOLLM2_GGUF
cargo test --workspace --no-fail-fast "$@"
