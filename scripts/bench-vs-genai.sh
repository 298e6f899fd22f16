#!/usr/bin/env bash
# Decode speed of `steper-run` against onnxruntime-genai on the same exports, the same ONNX
# Runtime library and the same machine, in one run: for every round, every context length in
# PROMPTS and every export in MODELS, `steper-run bench-decode` (one measured run after a warm-up)
# then onnxruntime-genai (the same: warm-up, one measured run; greedy, NEW tokens). Our side loads
# the libonnxruntime.so of the `onnxruntime` wheel that onnxruntime-genai itself uses, so both
# sides run the same ONNX Runtime build. Medians over ROUNDS and the ratio ours / genai are
# printed as JSON and a markdown table and written to $OUT/bench-vs-genai.{json,md}.
#
# Environment: MODELS (export directories; default: the int4 and int4-gqa exports of the imported
# SmolLM2-135M-Instruct, made in $OUT), PROMPTS ("128 1024"), NEW (128), THREADS (2), ROUNDS (5),
# OUT (out/bench-vs-genai), BIN_DIR (prebuilt steper binaries; else a release build), GENAI_REQ
# (onnxruntime-genai==0.18.0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROMPTS="${PROMPTS:-128 1024}"
NEW="${NEW:-128}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-5}"
OUT="${OUT:-$ROOT/out/bench-vs-genai}"
GENAI_REQ="${GENAI_REQ:-onnxruntime-genai==0.18.0}"
source scripts/bench-common.sh
steper_bin
genai_venv "$GENAI_REQ"

# The ONNX Runtime library onnxruntime-genai runs on (its `onnxruntime` dependency).
ORT_LIB="$("$GENAI_VENV/bin/python" - <<'PY'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))
print(libs[0])
PY
)"
export ORT_DYLIB_PATH="$ORT_LIB"
ORT_VER="$(basename "$ORT_LIB" | sed 's/^libonnxruntime\.so\.//')"
GENAI_VER="$("$GENAI_VENV/bin/python" -c 'import onnxruntime_genai as og; print(og.__version__)')"
mkdir -p "$OUT"

if [[ -z "${MODELS:-}" ]]; then
  CKPT="$OUT/smollm2"
  smollm2_checkpoint "$CKPT"
  smollm2_export "$CKPT" "$OUT/onnx-int4" --quantize int4 --block-size 32
  smollm2_export "$CKPT" "$OUT/onnx-int4-gqa" --quantize int4 --block-size 32 --attention gqa
  MODELS="$OUT/onnx-int4 $OUT/onnx-int4-gqa"
fi
for m in $MODELS; do
  genai_threads "$m" "$THREADS"
done

RAW="$OUT/raw"
rm -rf "$RAW"
mkdir -p "$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for p in $PROMPTS; do
    for m in $MODELS; do
      name="$(basename "$m")"
      log "round $r/$ROUNDS, context $p, $name: steper-run, onnxruntime-genai"
      "$BIN/steper-run" bench-decode --model "$m" --backends ort --prompt-tokens "$p" \
        --new-tokens "$NEW" --threads "$THREADS" --runs 1 > "$RAW/steper.$name.$p.$r.json"
      genai_decode "$m" "$p" "$NEW" > "$RAW/genai.$name.$p.$r.json"
    done
  done
done

python3 - "$RAW" "$OUT/bench-vs-genai.json" "$ROUNDS" "$NEW" "$THREADS" "$ORT_VER" "$GENAI_VER" "$PROMPTS" $MODELS <<'EOF'
import json, os, statistics, sys
raw, out, rounds, new, threads, ort_ver, genai_ver, prompts = sys.argv[1:9]
models = sys.argv[9:]
rounds, new, threads = int(rounds), int(new), int(threads)
rows = []
for p in prompts.split():
    for m in models:
        name = os.path.basename(m)
        ours = [json.load(open(f"{raw}/steper.{name}.{p}.{r}.json"))["bench_decode"][0]["decode_tok_s"]
                for r in range(1, rounds + 1)]
        genai = [json.load(open(f"{raw}/genai.{name}.{p}.{r}.json"))["decode_tok_s"] for r in range(1, rounds + 1)]
        # Paired per round (the two ran back to back), then the median of the ratios.
        ratios = [a / b for a, b in zip(ours, genai)]
        rows.append({"export": name, "context": int(p), "steper_run_tok_s": statistics.median(ours),
                     "genai_tok_s": statistics.median(genai), "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "steper_run": ours, "genai": genai})
report = {"onnxruntime": ort_ver, "onnxruntime_genai": genai_ver, "new_tokens": new, "threads": threads,
          "rounds": rounds, "rows": rows}
with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
os.replace(out + ".tmp", out)
md = [f"Decode, {new} greedy tokens after a prompt of the given context, {threads} threads, {rounds} rounds "
      f"(medians; ratio = median of the per-round ratios, range in brackets); ONNX Runtime {ort_ver} on both "
      f"sides, onnxruntime-genai {genai_ver}", "",
      "| export | context | steper-run tok/s | onnxruntime-genai tok/s | steper-run / genai |", "|---|---|---|---|---|"]
for x in rows:
    md.append(f"| {x['export']} | {x['context']} | {x['steper_run_tok_s']:.1f} | {x['genai_tok_s']:.1f} | "
              f"{x['ratio_median']:.3f}× [{x['ratio_min']:.2f}, {x['ratio_max']:.2f}] |")
mdp = out.removesuffix(".json") + ".md"
open(mdp + ".tmp", "w").write("\n".join(md) + "\n")
os.replace(mdp + ".tmp", mdp)
print(json.dumps({"rows": [{k: v for k, v in x.items() if k not in ("steper_run", "genai")} for x in rows]}, indent=2))
print("\n".join(md))
EOF
