#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need (the ONNX Runtime
# library, the SmolLM2 GGUF), then runs every test of the workspace (unit, integration, the slow
# real-model tier and doc tests), the API documentation build and the runtime's feature matrix.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The install step of the README: the ONNX Runtime library (found by the tests through
# .cargo/config.toml) and the SmolLM2 GGUF (found through scripts/fetch-smollm2.sh).
bash scripts/install-ort.sh >/dev/null
bash scripts/fetch-smollm2.sh >/dev/null

# One feature set for everything (--all-targets both times), so nothing builds twice. The tests
# make their fixtures themselves (crate steper-test-support); the slow real-model tier
# (`#[ignore = "slow: …"]`) runs too.
cargo build --workspace --all-targets
cargo test --workspace --all-targets --no-fail-fast "$@" -- --include-ignored
cargo test --workspace --doc
# the API documentation builds without a warning (broken or private links, missing docs)
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Feature matrix of steper-runtime beyond the defaults (the CLI's): the library with no feature
# builds (its unit tests run with the test fixtures' features above: the dev-dependencies turn
# features on), and the embedder's `default-features = false, features = ["ort"]` (crate
# steper-embed-ort, built alone so that it sees exactly that feature set) runs on the tiny
# export with its own retriever.
cargo build -p steper-runtime --no-default-features --lib
cargo build -p steper-embed-ort
TINY="$(target/debug/steper-test-fixture)"
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}" \
  target/debug/steper-embed-ort "$TINY/export" "$TINY/world/corpus.jsonl" "$TINY/world/dev.jsonl" 3 60000
