#!/usr/bin/env bash
# Prompt-lookup decoding in the loop, paired with one-token-per-call decoding: `steper-run eval`
# on the same export, index and questions, with and without `--prompt-lookup N`, alternating
# per round in one run; prints JSON with each setting's questions/s, decode milliseconds per
# generated token (from the records' step traces), EM/F1, and how many predictions differ from
# the run without lookup, plus the per-round paired ratios.
#
# usage: experiments/prompt-lookup/run.sh MODEL INDEX QA [LIMIT (100)]
# env: BIN_DIR (target/release), OUT (out/prompt-lookup), ROUNDS (2), DRAFTS ("8 4": the N of
# each lookup setting), WORKERS (2), THREADS (1 per worker).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="$1"
INDEX="$2"
QA="$3"
LIMIT="${4:-100}"
BIN="${BIN_DIR:-$ROOT/target/release}"
OUT="${OUT:-$ROOT/out/prompt-lookup}"
ROUNDS="${ROUNDS:-2}"
DRAFTS="${DRAFTS:-8 4}"
WORKERS="${WORKERS:-2}"
THREADS="${THREADS:-1}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$OUT"

for r in $(seq 1 "$ROUNDS"); do
  for n in off $DRAFTS; do
    flag=()
    [[ "$n" != off ]] && flag=(--prompt-lookup "$n")
    log "round $r, lookup $n"
    "$BIN/steper-run" eval --model "$MODEL" --index "$INDEX" --data "$QA" --limit "$LIMIT" \
      --workers "$WORKERS" --threads "$THREADS" "${flag[@]}" --json \
      --out "$OUT/r$r-$n.jsonl" >/dev/null
  done
done

python3 - "$OUT" "$ROUNDS" "off $DRAFTS" <<'PY'
import json, statistics, sys
out, rounds, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()

def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]

res = {"settings": {}, "rounds": rounds}
base = {r["id"]: r["prediction"] for r in load(f"{out}/r1-off.jsonl")}
for s in settings:
    qps, ms_tok, ratios = [], [], []
    for k in range(1, rounds + 1):
        summ = json.load(open(f"{out}/r{k}-{s}.jsonl.summary.json"))
        recs = load(f"{out}/r{k}-{s}.jsonl")
        toks = sum(st["new_tokens"] for r in recs for st in r["trace"])
        dec = sum(st["decode_ms"] for r in recs for st in r["trace"])
        qps.append(summ["questions_per_sec"])
        ms_tok.append(dec / max(toks, 1))
        off = json.load(open(f"{out}/r{k}-off.jsonl.summary.json"))["questions_per_sec"]
        ratios.append(summ["questions_per_sec"] / off)
    recs = load(f"{out}/r1-{s}.jsonl")
    res["settings"][s] = {
        "questions": summ["questions"],
        "em": summ["em"], "f1": summ["f1"], "forced_share": summ["forced_share"],
        "mean_steps": summ["mean_steps"],
        "generated_tokens": toks,
        "questions_per_sec": qps,
        "decode_ms_per_token": [round(x, 3) for x in ms_tok],
        "qps_vs_off_per_round": [round(x, 3) for x in ratios],
        "qps_vs_off_median": round(statistics.median(ratios), 3),
        "predictions_differing_from_off": sum(1 for r in recs if base.get(r["id"]) != r["prediction"]),
    }
print(json.dumps(res, indent=1))
PY
