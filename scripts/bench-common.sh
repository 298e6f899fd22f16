# Shared by the benchmark scripts (sourced, after ROOT is set and the working directory is the
# repository root): the steper binaries, SmolLM2-135M-Instruct imported and exported, and
# onnxruntime-genai in .cache/genai-venv.

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# BIN: $BIN_DIR when set, else a release build of the tools.
steper_bin() {
  if [[ -n "${BIN_DIR:-}" ]]; then
    BIN="$BIN_DIR"
  else
    cargo build --release -q -p steper-train -p steper-export -p steper-runtime >&2
    BIN="$ROOT/target/release"
  fi
}

# smollm2_checkpoint DIR: the GGUF imported into DIR (once).
smollm2_checkpoint() {
  if [[ ! -f "$1/config.json" ]]; then
    rm -rf "$1"
    "$BIN/steper-train" import --gguf "$(bash scripts/fetch-smollm2.sh)" --out "$1" >/dev/null
  fi
}

# smollm2_export CKPT DIR [steper-export args…]: the export, unless DIR already holds one.
smollm2_export() {
  local ckpt="$1" dir="$2"
  shift 2
  [[ -f "$dir/steper.json" ]] && return 0
  rm -rf "$dir"
  "$BIN/steper-export" --checkpoint "$ckpt" --out "$dir" "$@" >/dev/null
}

GENAI_VENV="$ROOT/.cache/genai-venv"
# genai_venv [REQUIREMENT]: onnxruntime-genai installed in GENAI_VENV (once).
genai_venv() {
  if [[ ! -x "$GENAI_VENV/bin/python" ]] || ! "$GENAI_VENV/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
    python3 -m venv "$GENAI_VENV"
    "$GENAI_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${1:-onnxruntime-genai}" >&2
  fi
}
# genai_threads DIR N / genai_decode DIR PROMPT NEW: see scripts/genai_bench.py.
genai_threads() { "$GENAI_VENV/bin/python" "$ROOT/scripts/genai_bench.py" threads "$@"; }
genai_decode() { "$GENAI_VENV/bin/python" "$ROOT/scripts/genai_bench.py" decode "$@"; }
