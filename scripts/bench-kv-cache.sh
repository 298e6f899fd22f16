#!/usr/bin/env bash
# How the KV cache is kept, measured: SmolLM2-135M-Instruct exported fp32 and int4 (MatMulNBits,
# block 32), each with standard-operator attention (the graph concatenates the cache) and with
# ONNX Runtime's GroupQueryAttention (--attention gqa), the GQA exports run both with the cache
# in place (`--kv-cache in-place`: one buffer per layer bound as past and present) and
# concatenated (`--kv-cache concat`: the fused op copies the past into a new present). One
# `steper-run bench-decode --runs 1` per configuration per round, ROUNDS rounds alternating the
# configurations (drift on a shared machine hits all of them), after one warm-up each; medians
# and ratios to the standard graph of the same weights as JSON + a markdown table, written to
# $OUT/bench-kv-cache.{json,md}.
#
# Environment: PROMPT (1024: the reasoning loop's regime), NEW (64), THREADS (2), ROUNDS (3),
# OUT (out/bench-kv-cache), BIN_DIR (prebuilt steper binaries; else a release build),
# QUANT ("fp32 int4").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROMPT="${PROMPT:-1024}"
NEW="${NEW:-64}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-$ROOT/out/bench-kv-cache}"
QUANT="${QUANT:-fp32 int4}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
source scripts/bench-common.sh
steper_bin
mkdir -p "$OUT"
CKPT="$OUT/smollm2"
smollm2_checkpoint "$CKPT"
for q in $QUANT; do
  for att in standard gqa; do
    args=(--attention "$att")
    [[ "$q" != fp32 ]] && args+=(--quantize "$q" --block-size 32)
    smollm2_export "$CKPT" "$OUT/onnx-$q-$att" "${args[@]}"
  done
done

RAW="$OUT/raw"
rm -rf "$RAW"
mkdir -p "$RAW"
bench() {  # bench DIR KV_MODE RUNS → JSON on stdout
  "$BIN/steper-run" bench-decode --model "$1" --backends ort --kv-cache "$2" \
    --prompt-tokens "$PROMPT" --new-tokens "$NEW" --threads "$THREADS" --runs "$3"
}
configs=()
for q in $QUANT; do
  configs+=("$q-standard:concat" "$q-gqa:concat" "$q-gqa:in-place")
done
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS: ${configs[*]}"
  for c in "${configs[@]}"; do
    bench "$OUT/onnx-${c%%:*}" "${c##*:}" 1 > "$RAW/${c/:/.}.$r.json"
  done
done

python3 - "$RAW" "$ROUNDS" "$OUT/bench-kv-cache.json" "$PROMPT" "$NEW" "$THREADS" "${configs[@]}" <<'EOF'
import json, os, statistics, sys
raw, rounds, out, prompt, new, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
configs = sys.argv[7:]
samples = {}
for c in configs:
    name, mode = c.split(":")
    s = samples.setdefault(c, {"prefill": [], "decode": []})
    for r in range(1, rounds + 1):
        row = json.load(open(f"{raw}/{name}.{mode}.{r}.json"))["bench_decode"][0]
        s["prefill"].append(row["prefill_tok_s"])
        s["decode"].append(row["decode_tok_s"])
med = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in samples.items()}
ratios = {}
for c, d in med.items():
    base = med[c.split("-")[0] + "-standard:concat"]
    ratios[c] = {f"{k}_vs_standard": round(d[k] / base[k], 3) for k in ("prefill", "decode")}
report = {"prompt_tokens": prompt, "new_tokens": new, "threads": threads, "rounds": rounds,
          "medians_tok_s": med, "ratios": ratios, "samples": samples}
with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
os.replace(out + ".tmp", out)
md = [f"SmolLM2-135M-Instruct, {prompt}-token prompt + {new} greedy tokens, {threads} threads, median of {rounds} rounds", "",
      "| export | attention | KV cache | prefill tok/s | decode tok/s | prefill vs standard | decode vs standard |",
      "|---|---|---|---|---|---|---|"]
for c, d in med.items():
    name, mode = c.split(":")
    q, att = name.split("-")
    r = ratios[c]
    md.append(f"| {q} | {att} | {mode} | {d['prefill']:.1f} | {d['decode']:.1f} | "
              f"{r['prefill_vs_standard']}× | {r['decode_vs_standard']}× |")
mdp = out.removesuffix(".json") + ".md"
open(mdp + ".tmp", "w").write("\n".join(md) + "\n")
os.replace(mdp + ".tmp", mdp)
print(json.dumps({"medians_tok_s": med, "ratios": ratios}, indent=2))
print("\n".join(md))
EOF
