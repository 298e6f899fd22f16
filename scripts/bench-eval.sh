#!/usr/bin/env bash
# Questions/s of `steper-run eval` under several --workers / --batch / --threads settings, in one
# run on the same questions, with a check that every setting gives the same answers as the first.
#
#   MODEL=EXPORT_DIR INDEX=INDEX_DIR DATA=QA.jsonl [N=20] [CONFIGS="1:1:2 1:4:2 2:1:1 2:2:1"] \
#     [BIN_DIR=target/release] [OUT=out/bench-eval] bash scripts/bench-eval.sh
#
# CONFIGS: space-separated WORKERS:BATCH:THREADS (THREADS per worker). Prints a markdown table
# and writes $OUT/bench-eval.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${MODEL:?set MODEL to an export directory}" "${INDEX:?set INDEX to an index directory}" "${DATA:?set DATA to a QA JSONL file}"
N="${N:-20}"
CONFIGS="${CONFIGS:-1:1:2 1:4:2 2:1:1 2:2:1}"
BIN="${BIN_DIR:-$ROOT/target/release}"
OUT="${OUT:-$ROOT/out/bench-eval}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
mkdir -p "$OUT"
for c in $CONFIGS; do
  IFS=: read -r w b t <<< "$c"
  echo "[$(date +%H:%M:%S)] workers $w batch $b threads $t" >&2
  "$BIN/steper-run" eval --model "$MODEL" --index "$INDEX" --data "$DATA" --limit "$N" \
    --workers "$w" --batch "$b" --threads "$t" --out "$OUT/w$w-b$b-t$t.jsonl" --json > /dev/null
done
python3 - "$OUT" "$CONFIGS" "$N" <<'PY'
import json, os, sys
out, configs, n = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
rows, first = [], None
for c in configs:
    w, b, t = c.split(":")
    base = os.path.join(out, f"w{w}-b{b}-t{t}.jsonl")
    s = json.load(open(base + ".summary.json"))
    preds = [json.loads(l)["prediction"] for l in open(base)]
    if first is None:
        first = (s["questions_per_sec"], preds)
    rows.append({"workers": int(w), "batch": int(b), "threads_per_worker": int(t),
                 "questions": s["questions"], "questions_per_sec": s["questions_per_sec"],
                 "seconds": s["seconds"], "em": s["em"], "f1": s["f1"],
                 "vs_first": s["questions_per_sec"] / first[0],
                 "answers_equal_first": sum(a == b for a, b in zip(preds, first[1]))})
tmp = os.path.join(out, "bench-eval.json.tmp")
json.dump({"questions": n, "rows": rows}, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "bench-eval.json"))
print("| workers × batch × threads | questions/s | wall s | EM | F1 | vs first | answers = first |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['workers']} × {r['batch']} × {r['threads_per_worker']} | {r['questions_per_sec']:.3f} | {r['seconds']:.1f} | "
          f"{r['em']:.3f} | {r['f1']:.3f} | {r['vs_first']:.2f}× | {r['answers_equal_first']}/{r['questions']} |")
PY
