#!/usr/bin/env bash
# Training-throughput benchmark (not a test): `steper-train bench-fit` (candle, the real trainer)
# vs the same step in PyTorch CPU (torch_step.py, torch from PyPI in .cache/torch-venv), for
#   1. the demo student (init-student defaults: 4 layers, hidden 256; all weights trained),
#   2. SmolLM2-135M-Instruct (imported from the GGUF; embeddings frozen, top TOP layers trained).
# Each row is measured three ways: candle, the PyTorch twin doing the same thing (target-only logits,
# same frozen layers / prefix cache / LoRA) and PyTorch as a user would write it (HF-style logits at
# every position, loss masked, no cache). Prints one JSON array and writes out/bench-train.json.
# Knobs: ROWS ("demo top cache lora"), STEPS (5), SEQ (256), BATCH (8), SMOL_BATCH (4), TOP (2),
# LORA_RANK (8), LORA_TOP (8), THREADS (all cores), BIN_DIR (prebuilt steper-train), VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-5}"; SEQ="${SEQ:-256}"; BATCH="${BATCH:-8}"; SMOL_BATCH="${SMOL_BATCH:-4}"; TOP="${TOP:-2}"
LORA_RANK="${LORA_RANK:-8}"; LORA_TOP="${LORA_TOP:-8}"
THREADS="${THREADS:-$(nproc)}"
OUT="$ROOT/out/bench-train"
mkdir -p "$OUT"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR/steper-train"   # a prebuilt binary
else
  cargo build --release -q -p steper-train
  BIN="$ROOT/target/release/steper-train"
fi

VENV="${VENV:-$ROOT/.cache/torch-venv}"
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
# One row: steper-train bench-fit with CANDLE args, the PyTorch twin doing the same thing
# (target-only logits, same frozen layers / cache / LoRA) and the step as a user would write it
# in PyTorch (HF-style: logits at every position, loss masked; same trainable weights, no cache).
row() { # name student batch "candle args" "twin args" "user args"
  local name="$1" student="$2" batch="$3" cargs="$4" targs="$5" uargs="$6"
  local common=(--batch-size "$batch" --seq-len "$SEQ" --steps "$STEPS")
  # shellcheck disable=SC2086
  "$BIN" bench-fit --student "$student" "${common[@]}" $cargs > "$OUT/$name.candle.json"
  # shellcheck disable=SC2086
  "$VENV/bin/python" experiments/bench-train/torch_step.py --config "$student/config.json" --threads "$THREADS" \
    "${common[@]}" --logits targets $targs > "$OUT/$name.twin.json"
  # shellcheck disable=SC2086
  "$VENV/bin/python" experiments/bench-train/torch_step.py --config "$student/config.json" --threads "$THREADS" \
    "${common[@]}" --logits all $uargs > "$OUT/$name.user.json"
}
ROWS="${ROWS:-demo top cache lora}"
for r in $ROWS; do
  case "$r" in
    demo) row demo-student "$OUT/student" "$BATCH" "" "" "" ;;
    top) row "smollm2-top$TOP" "$OUT/smollm2" "$SMOL_BATCH" "--freeze-embeddings --top-layers $TOP" \
      "--freeze-embeddings --top-layers $TOP" "--freeze-embeddings --top-layers $TOP" ;;
    cache) row "smollm2-top$TOP-cached" "$OUT/smollm2" "$SMOL_BATCH" "--freeze-embeddings --top-layers $TOP --prefix-cache" \
      "--freeze-embeddings --top-layers $TOP --prefix-cache" "--freeze-embeddings --top-layers $TOP" ;;
    lora) row "smollm2-lora$LORA_RANK-top$LORA_TOP" "$OUT/smollm2" "$SMOL_BATCH" "--lora-rank $LORA_RANK --top-layers $LORA_TOP" \
      "--lora-rank $LORA_RANK --top-layers $LORA_TOP" "--lora-rank $LORA_RANK --top-layers $LORA_TOP" ;;
    *) echo "unknown row $r (demo top cache lora)" >&2; exit 2 ;;
  esac
done

python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
rows = []
for cand in sorted(glob.glob(f"{out}/*.candle.json")):
    name = os.path.basename(cand)[: -len(".candle.json")]
    c = json.load(open(cand)); t = json.load(open(f"{out}/{name}.twin.json")); u = json.load(open(f"{out}/{name}.user.json"))
    rows.append({"model": name, "tokens_per_step": c["tokens_per_step"],
                 "trainable_parameters": c["trainable_parameters"], "total_parameters": c["total_parameters"],
                 "candle_tokens_per_sec": round(c["tokens_per_sec"], 1),
                 "torch_twin_tokens_per_sec": round(t["tokens_per_sec"], 1),
                 "torch_user_tokens_per_sec": round(u["tokens_per_sec"], 1),
                 "candle_over_twin": round(c["tokens_per_sec"] / t["tokens_per_sec"], 3),
                 "candle_over_user": round(c["tokens_per_sec"] / u["tokens_per_sec"], 3),
                 "candle_peak_rss_mib": c["peak_rss_mib"], "twin_peak_rss_mib": round(t["peak_rss_mib"], 1),
                 "user_peak_rss_mib": round(u["peak_rss_mib"], 1),
                 "torch": t["framework"], "threads": t["threads"]})
text = json.dumps(rows, indent=2)
open(f"{out}.json.tmp", "w").write(text); os.replace(f"{out}.json.tmp", f"{out}.json")
print(text)
PY
