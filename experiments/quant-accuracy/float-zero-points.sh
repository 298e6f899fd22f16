#!/usr/bin/env bash
# Float zero points (`steper-export --zero-points float`, llama.cpp's Q4_1 block form) against the
# int4 forms before them, in one run on one checkpoint: greedy agreement with the fp32 export
# along HotpotQA prompts (the `quant_agreement` example: teacher-forced and free-running), and
# decode speed against integer zero points (`steper-run bench-decode`, ROUNDS rounds alternating
# the forms, standard and GroupQueryAttention graphs, paired ratios per round).
#
# The SmolLM2 linear layers come from a Q4_1 GGUF: a layer that training left frozen is on that
# grid, so float zero points should bring it back exactly and integer ones cannot.
#
# Knobs (env): CKPT (the checkpoint; default: SmolLM2-135M-Instruct imported from the GGUF),
# OUT (out/quant-float-zp), BIN_DIR (prebuilt binaries, else a release build), FORMS (int8
# int4 int4-zp int4-fzp int4-zp-fphead int4-fzp-fphead), PROMPTS (8), NEW_TOKENS (256),
# ROUNDS (3), THREADS (2), DECODE ("int4-zp int4-fzp int4-fzp-og"; ratios against the first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/bench-common.sh
OUT="${OUT:-$ROOT/out/quant-float-zp}"
FORMS="${FORMS:-int8 int4 int4-zp int4-fzp int4-zp-fphead int4-fzp-fphead}"
PROMPTS="${PROMPTS:-8}"
NEW_TOKENS="${NEW_TOKENS:-256}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
DECODE="${DECODE:-int4-zp int4-fzp int4-fzp-og}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
steper_bin
AGREE="${AGREE_BIN:-$ROOT/target/release/examples/quant_agreement}"
if [[ ! -x "$AGREE" ]]; then
  cargo build --release -q -p steper-export --example quant_agreement
fi
mkdir -p "$OUT"
if [[ -z "${CKPT:-}" ]]; then
  smollm2_checkpoint "$OUT/smollm2"
  CKPT="$OUT/smollm2"
fi

args_of() {
  case "$1" in
    fp32) echo "" ;;
    int8) echo "--quantize int8" ;;
    int4) echo "--quantize int4" ;;
    int4-zp) echo "--quantize int4 --zero-points int" ;;
    int4-fzp) echo "--quantize int4 --zero-points float" ;;
    int4-zp-fphead) echo "--quantize int4 --zero-points int --quantize-lm-head false" ;;
    int4-fzp-fphead) echo "--quantize int4 --zero-points float --quantize-lm-head false" ;;
    int4-fzp-og) echo "--quantize int4 --zero-points float --off-grid-int8" ;;
    *) echo "unknown form $1" >&2; exit 2 ;;
  esac
}
export_form() { # form attention
  local dir="$OUT/onnx-$1-$2"
  if [[ ! -f "$dir/steper.json" ]]; then
    log "export $1 ($2 attention)"
    # shellcheck disable=SC2046
    "$BIN/steper-export" --checkpoint "$CKPT" --out "$dir" --attention "$2" $(args_of "$1") >/dev/null
  fi
  echo "$dir"
}

REF="$(export_form fp32 standard)"
for f in $FORMS; do
  dir="$(export_form "$f" standard)"
  res="$OUT/agreement-$f.json"
  [[ -s "$res" ]] && continue
  log "greedy agreement: $f against fp32 ($PROMPTS prompts × $NEW_TOKENS tokens)"
  "$AGREE" --reference "$REF" --candidate "$dir" --data data/hotpotqa_dev500.jsonl.gz \
    --prompts "$PROMPTS" --new-tokens "$NEW_TOKENS" --threads "$THREADS" >"$res.tmp"
  mv "$res.tmp" "$res"
done

models=()
for f in $DECODE; do
  for att in standard gqa; do models+=(--model "$(export_form "$f" "$att")"); done
done
for r in $(seq 1 "$ROUNDS"); do
  log "decode round $r/$ROUNDS"
  "$BIN/steper-run" bench-decode "${models[@]}" --backends ort --threads "$THREADS" --runs 1 \
    --prompt-tokens 128 --new-tokens 128 >"$OUT/decode-round$r.json"
done

python3 - "$OUT" "$FORMS" "$ROUNDS" "$DECODE" <<'PY'
import json, statistics, sys, pathlib
out, forms, rounds = pathlib.Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3])
decode = sys.argv[4].split()
lines = ["| form | teacher-forced agreement | free-running agreement | common prefix (mean tokens) |",
         "|---|---:|---:|---:|"]
for f in forms:
    a = json.loads((out / f"agreement-{f}.json").read_text())["agreement"]
    pp = a["per_prompt"]
    prefix = sum(p["common_prefix"] for p in pp) / len(pp)
    lines.append(f"| {f} | {100*a['teacher_forced']:.1f} % | {100*a['free_running']:.1f} % | {prefix:.0f} |")
rows = {}
for r in range(1, rounds + 1):
    for row in json.loads((out / f"decode-round{r}.json").read_text())["bench_decode"]:
        name = pathlib.Path(row["model"]).name
        rows.setdefault(name, []).append(row)
lines += ["", "| export | prefill tok/s (median) | decode tok/s (median) | decode per round |", "|---|---:|---:|---|"]
for name, rs in rows.items():
    dec = [x["decode_tok_s"] for x in rs]
    pre = [x["prefill_tok_s"] for x in rs]
    lines.append(f"| {name} | {statistics.median(pre):.0f} | {statistics.median(dec):.1f} | "
                 + ", ".join(f"{d:.1f}" for d in dec) + " |")
for att in ("standard", "gqa"):
    base = rows.get(f"onnx-{decode[0]}-{att}")
    for f in decode[1:]:
        b = rows.get(f"onnx-{f}-{att}")
        if base and b:
            ratios = [y["decode_tok_s"] / x["decode_tok_s"] for x, y in zip(base, b)]
            lines.append(f"\n{f} / {decode[0]}, {att} decode: median {statistics.median(ratios):.3f} "
                         f"(rounds: {', '.join(f'{q:.3f}' for q in ratios)})")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
