#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need (the ONNX Runtime
# library, the SmolLM2 GGUF), builds a tiny real export for the runtime's real-model tests, then
# runs every test of the workspace (unit, integration and doc tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ORT_DYLIB_PATH="$(bash scripts/install-ort.sh)"
export ORT_DYLIB_PATH
STEPER_SMOLLM2_GGUF="$(bash scripts/fetch-smollm2.sh)"
export STEPER_SMOLLM2_GGUF

# One feature set for everything (--all-targets both times), so nothing builds twice.
cargo build --workspace --all-targets
TINY="$ROOT/.cache/test-tiny"
rm -rf "$TINY"
target/debug/steper-train synth --seed 7 --out "$TINY/world" --questions-per-hop 20 >/dev/null
target/debug/steper-train init-student --corpus "$TINY/world/corpus.jsonl" --out "$TINY/student" \
  --vocab-size 600 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128 --context 1024 >/dev/null
target/debug/steper-export --checkpoint "$TINY/student" --out "$TINY/export" >/dev/null
export STEPER_TEST_MODEL="$TINY/export"

cargo test --workspace --all-targets --no-fail-fast "$@"
cargo test --workspace --doc
# the API documentation builds without a warning (broken or private links, missing docs)
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Feature matrix of steper-runtime beyond the defaults (the CLI's): the library with no feature
# (its unit tests run), and the embedder's `default-features = false, features = ["ort"]`, whose
# example is built and run on the tiny export with its own retriever.
cargo test -p steper-runtime --no-default-features --lib
cargo build -p steper-runtime --no-default-features --features ort --example embed_ort
target/debug/examples/embed_ort "$TINY/export" "$TINY/world/corpus.jsonl" "$TINY/world/dev.jsonl" 3 60000
