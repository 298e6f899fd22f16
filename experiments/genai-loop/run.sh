#!/usr/bin/env bash
# Our multi-step loop (`steper-run eval`) against the same loop as a plain Python script on
# onnxruntime-genai (ircot_genai.py), same export, same questions, same run; prints JSON with
# both questions/s and the ratio.
#
# usage: experiments/genai-loop/run.sh MODEL_DIR [LIMIT (20)] [QA (hotpotqa_dev500)]
# env: BIN_DIR (prebuilt steper-run, else target/release), EVAL_ARGS (extra steper-run eval
# flags, e.g. "--threads 2"), OUT (out/genai-loop).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="$(cd "$1" && pwd)"
LIMIT="${2:-20}"
QA="${3:-$ROOT/data/hotpotqa_dev500.jsonl.gz}"
OUT="${OUT:-$ROOT/out/genai-loop}"
BIN="${BIN_DIR:-$ROOT/target/release}"
EVAL_ARGS="${EVAL_ARGS:-}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
mkdir -p "$OUT"
VENV="${STEPER_CACHE:-$ROOT/.cache}/genai-venv"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check onnxruntime-genai >&2
fi
NAME="$(basename "$QA")"
NAME="${NAME%.gz}"
NAME="${NAME%.jsonl}"
if [[ ! -f "$OUT/index-$NAME.done" ]]; then
  rm -rf "$OUT/index-$NAME"
  "$BIN/steper-run" index --from-qa "$QA" --out "$OUT/index-$NAME" >/dev/null
  touch "$OUT/index-$NAME.done"
fi
"$BIN/steper-run" eval --model "$MODEL" --index "$OUT/index-$NAME" --data "$QA" --limit "$LIMIT" \
  --out "$OUT/steper-$NAME.jsonl" $EVAL_ARGS >/dev/null
"$VENV/bin/python" "$ROOT/experiments/genai-loop/ircot_genai.py" "$MODEL" "$QA" "$LIMIT" \
  "$OUT/genai-$NAME.json" >/dev/null
python3 - "$OUT/steper-$NAME.jsonl.summary.json" "$OUT/genai-$NAME.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))
theirs = json.load(open(sys.argv[2]))["summary"]
qps = ours["questions_per_sec"]
print(json.dumps({
    "questions": ours["questions"],
    "steper_run": {"questions_per_sec": ours["questions_per_sec"], "em": ours["em"], "f1": ours["f1"], "mean_steps": ours["mean_steps"]},
    "genai_python_loop": {k: theirs[k] for k in ("questions_per_sec", "em", "f1", "prefilled_tokens", "generated_tokens")},
    "ratio_questions_per_sec": qps / theirs["questions_per_sec"],
}, indent=1))
PY
