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
VENV="$ROOT/.cache/genai-venv"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime >&2
  BIN="$ROOT/target/release"
fi
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$GENAI_REQ" >&2
fi
# The ONNX Runtime library onnxruntime-genai runs on (its `onnxruntime` dependency).
ORT_LIB="$("$VENV/bin/python" - <<'PY'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))
print(libs[0])
PY
)"
export ORT_DYLIB_PATH="$ORT_LIB"
ORT_VER="$(basename "$ORT_LIB" | sed 's/^libonnxruntime\.so\.//')"
GENAI_VER="$("$VENV/bin/python" -c 'import onnxruntime_genai as og; print(og.__version__)')"
mkdir -p "$OUT"

if [[ -z "${MODELS:-}" ]]; then
  GGUF="$(bash scripts/fetch-smollm2.sh)"
  CKPT="$OUT/smollm2"
  if [[ ! -f "$CKPT/config.json" ]]; then
    rm -rf "$CKPT"
    "$BIN/steper-train" import --gguf "$GGUF" --out "$CKPT" >/dev/null
  fi
  MODELS=""
  for q in int4 int4-gqa; do
    if [[ ! -f "$OUT/onnx-$q/steper.json" ]]; then
      rm -rf "$OUT/onnx-$q"
      args=(--quantize int4 --block-size 32)
      [[ "$q" == *-gqa ]] && args+=(--attention gqa)
      "$BIN/steper-export" --checkpoint "$CKPT" --out "$OUT/onnx-$q" "${args[@]}" >/dev/null
    fi
    MODELS+=" $OUT/onnx-$q"
  done
fi
# genai reads the intra-op thread count from genai_config.json's session options.
for m in $MODELS; do
  python3 - "$m/genai_config.json" "$THREADS" <<'PY'
import json, os, sys
p, t = sys.argv[1], int(sys.argv[2])
c = json.load(open(p))
c["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = t
open(p + ".tmp", "w").write(json.dumps(c, indent=2))
os.replace(p + ".tmp", p)
PY
done

genai_bench() {
  "$VENV/bin/python" - "$1" "$2" "$NEW" <<'PY'
import json, sys, time
import onnxruntime_genai as og
out, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(og.Config(out))
vocab = json.load(open(out + "/genai_config.json"))["model"]["vocab_size"]
ids = [(i * 7919 + 17) % vocab for i in range(prompt)]
def run():
    p = og.GeneratorParams(model)
    p.set_search_options(do_sample=False, max_length=prompt + new, min_length=prompt + new)
    g = og.Generator(model, p)
    g.append_tokens(ids)
    n, t = 0, time.perf_counter()
    while n < new and not g.is_done():
        g.generate_next_token()
        n += 1
    return n / (time.perf_counter() - t)
run()
print(json.dumps({"decode_tok_s": run()}))
PY
}

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
      genai_bench "$m" "$p" > "$RAW/genai.$name.$p.$r.json"
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
