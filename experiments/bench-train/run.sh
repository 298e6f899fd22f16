#!/usr/bin/env bash
# Training-throughput benchmark (not a test): `steper-train bench-fit` (candle, the real trainer)
# vs the same step in PyTorch CPU (torch_step.py, torch from PyPI in .cache/torch-venv), for
#   1. the demo student (init-student defaults: 4 layers, hidden 256; all weights trained),
#   2. SmolLM2-135M-Instruct (imported from the GGUF; embeddings frozen, top TOP layers trained).
# Prints one JSON array and writes out/bench-train.json. Knobs: STEPS (5), SEQ (256), BATCH (8),
# SMOL_BATCH (4), TOP (2), THREADS (all cores), BIN_DIR (prebuilt steper-train instead of a release build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-5}"; SEQ="${SEQ:-256}"; BATCH="${BATCH:-8}"; SMOL_BATCH="${SMOL_BATCH:-4}"; TOP="${TOP:-2}"
THREADS="${THREADS:-$(nproc)}"
OUT="$ROOT/out/bench-train"
mkdir -p "$OUT"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR/steper-train"   # a prebuilt binary
else
  cargo build --release -q -p steper-train
  BIN="$ROOT/target/release/steper-train"
fi

VENV="$ROOT/.cache/torch-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing torch from PyPI into $VENV (large download)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch numpy
fi

# 1. the demo student
if [[ ! -f "$OUT/world/corpus.jsonl" ]]; then
  "$BIN" synth --seed 0 --out "$OUT/world" >/dev/null
fi
if [[ ! -f "$OUT/student/config.json" ]]; then
  "$BIN" init-student --corpus "$OUT/world/corpus.jsonl" --qa "$OUT/world/train.jsonl" --out "$OUT/student" >/dev/null
fi
# 2. SmolLM2
if [[ ! -f "$OUT/smollm2/config.json" ]]; then
  "$BIN" import --gguf "$(bash scripts/fetch-smollm2.sh)" --out "$OUT/smollm2" >/dev/null
fi

export RAYON_NUM_THREADS="$THREADS"
run() { # name student batch extra-args...
  local name="$1" student="$2" batch="$3"; shift 3
  "$BIN" bench-fit --student "$student" --batch-size "$batch" --seq-len "$SEQ" --steps "$STEPS" "$@" > "$OUT/$name.candle.json"
  "$VENV/bin/python" experiments/bench-train/torch_step.py --config "$student/config.json" --threads "$THREADS" \
    --batch-size "$batch" --seq-len "$SEQ" --steps "$STEPS" "$@" > "$OUT/$name.torch.json"
}
run demo-student "$OUT/student" "$BATCH"
run smollm2-top$TOP "$OUT/smollm2" "$SMOL_BATCH" --freeze-embeddings --top-layers "$TOP"

python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
rows = []
for cand in sorted(glob.glob(f"{out}/*.candle.json")):
    name = os.path.basename(cand)[: -len(".candle.json")]
    c = json.load(open(cand)); t = json.load(open(f"{out}/{name}.torch.json"))
    rows.append({"model": name, "tokens_per_step": c["tokens_per_step"],
                 "trainable_parameters": c["trainable_parameters"], "total_parameters": c["total_parameters"],
                 "candle_tokens_per_sec": round(c["tokens_per_sec"], 1), "torch_tokens_per_sec": round(t["tokens_per_sec"], 1),
                 "candle_over_torch": round(c["tokens_per_sec"] / t["tokens_per_sec"], 3),
                 "candle_peak_rss_mib": c["peak_rss_mib"], "torch_peak_rss_mib": round(t["peak_rss_mib"], 1),
                 "torch": t["framework"], "threads": t["threads"]})
text = json.dumps(rows, indent=2)
open(f"{out}.json.tmp", "w").write(text); os.replace(f"{out}.json.tmp", f"{out}.json")
print(text)
PY
