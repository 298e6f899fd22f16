#!/usr/bin/env bash
# STEPER vs uniform step-wise vs Vanilla-KD: the same from-scratch student, the same gold-teacher
# data (the same questions), the same optimizer steps, three losses, several seeds.
#
#   part 1: the synthetic world (seed WORLD_SEED), the whole held-out test split, 2/3/4-hop broken out;
#   part 2 (SHARED=1, default): the repository's data/ — gold-teacher records from hotpotqa_train100 +
#          musique_train100, evaluation on the first EVAL_LIMIT questions of hotpotqa_dev500 and
#          musique_dev200 (none of them used for training).
#
# Knobs (env): STEPS (default 200), SEEDS ("0 1"), SHARED (1), SHARED_STEPS (STEPS), EVAL_LIMIT
# (100; shared part only), PARTS ("synth shared"), OUT (out/experiment), LR (2e-3),
# STUDENT_ARGS (init-student shape flags), BIN_DIR (prebuilt binaries instead of a release
# build). Writes $OUT/results.md (tables, held-out losses, σ trajectories), per-run plots, and
# prints how long it took. Runs are skipped when their eval summary already exists, so an
# interrupted experiment resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/experiment}"
STEPS="${STEPS:-200}"
SEEDS="${SEEDS:-0 1}"
SHARED="${SHARED:-1}"
SHARED_STEPS="${SHARED_STEPS:-$STEPS}"
EVAL_LIMIT="${EVAL_LIMIT:-100}"
WORLD_SEED="${WORLD_SEED:-0}"
LR="${LR:-2e-3}"
# student shape (init-student flags); empty = init-student's defaults (the demo student)
STUDENT_ARGS="${STUDENT_ARGS:-}"
DATA="$ROOT/data"
MODES="steper uniform vanilla"
PARTS="${PARTS:-synth shared}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
if [[ -n "${BIN_DIR:-}" ]]; then
  BIN="$BIN_DIR"   # prebuilt steper-train / steper-run / steper-export
else
  cargo build --release -q -p steper-train -p steper-export -p steper-runtime
  BIN="$ROOT/target/release"
fi
mkdir -p "$OUT"
T0=$(date +%s)

# run_part NAME STEPS TRAIN_QA CORPUS EVAL_QA... : index, then per seed a student, gold-teacher
# records fitted to that student's context, the three fits (each exported and plotted), and the
# evaluations.
run_part() {
  local part="$1" steps="$2" train_qa="$3" corpus="$4"; shift 4
  local dir="$OUT/$part"
  mkdir -p "$dir"
  if [[ ! -f "$dir/index.done" ]]; then
    rm -rf "$dir/index"
    "$BIN/steper-run" index --corpus "$corpus" --out "$dir/index" >/dev/null
    touch "$dir/index.done"
  fi
  for seed in $SEEDS; do
    local s="$dir/seed$seed"
    mkdir -p "$s"
    if [[ ! -f "$s/student0/config.json" ]]; then
      "$BIN/steper-train" init-student --corpus "$corpus" --qa "$train_qa" --out "$s/student0" --seed "$seed" $STUDENT_ARGS >/dev/null
    fi
    if [[ ! -f "$s/distill/summary.json" ]]; then
      "$BIN/steper-train" distill --teacher gold --data "$train_qa" --index "$dir/index" \
        --out "$s/distill" --vanilla --fit-student "$s/student0" >/dev/null
    fi
    for mode in $MODES; do
      local run="$s/$mode"
      local data="$s/distill/stepwise.jsonl"
      [[ "$mode" == vanilla ]] && data="$s/distill/vanilla.jsonl"
      if [[ ! -f "$run/done" ]]; then
        echo "== $part seed $seed $mode ($steps steps)"
        local t=$(date +%s)
        "$BIN/steper-train" fit --student "$s/student0" --data "$data" --out "$run/ckpt" \
          --mode "$mode" --steps "$steps" --batch-size 8 --lr "$LR" --seed "$seed" --save-every 0 --eval-every 50
        rm -rf "$run/onnx"
        "$BIN/steper-export" --checkpoint "$run/ckpt" --out "$run/onnx" >/dev/null
        echo $(( $(date +%s) - t )) > "$run/train_seconds"
        "$BIN/steper-train" plot --log "$run/ckpt/train_log.jsonl" --out "$run/plots" --title "$part $mode seed $seed" >/dev/null
        touch "$run/done"
      fi
      for evalset in "$@"; do
        local name; name="$(basename "$evalset")"; name="${name%.gz}"; name="${name%.jsonl}"
        if [[ ! -f "$run/eval-$name.jsonl.summary.json" ]]; then
          local limit=()
          [[ "$part" == shared && "$EVAL_LIMIT" -gt 0 ]] && limit=(--limit "$EVAL_LIMIT")
          "$BIN/steper-run" eval --model "$run/onnx" --index "$dir/index" --data "$evalset" \
            "${limit[@]}" --out "$run/eval-$name.jsonl" >/dev/null
        fi
      done
    done
  done
}

W="$OUT/synth/world"
if [[ " $PARTS " == *" synth "* ]]; then
  if [[ ! -f "$W/test.jsonl" ]]; then
    "$BIN/steper-train" synth --seed "$WORLD_SEED" --out "$W" >/dev/null
  fi
  run_part synth "$STEPS" "$W/train.jsonl" "$W/corpus.jsonl" "$W/test.jsonl"
fi

if [[ " $PARTS " == *" shared "* && "$SHARED" == 1 && -f "$DATA/hotpotqa_train100.jsonl.gz" ]]; then
  SD="$OUT/shared/data"
  mkdir -p "$SD"
  zcat "$DATA/hotpotqa_train100.jsonl.gz" "$DATA/musique_train100.jsonl.gz" > "$SD/train.jsonl"
  if [[ ! -f "$SD/corpus.jsonl" ]]; then
    # one corpus from every file's paragraphs (training and evaluation questions alike, as a
    # retrieval corpus must hold the evaluation questions' evidence), deduplicated by title + text
    python3 - "$DATA" "$SD/corpus.jsonl" <<'PY'
import gzip, json, sys, os
data, out = sys.argv[1], sys.argv[2]
seen, n = set(), 0
with open(out + ".tmp", "w") as f:
    for name in ["hotpotqa_train100", "musique_train100", "hotpotqa_dev500", "musique_dev200"]:
        for line in gzip.open(f"{data}/{name}.jsonl.gz", "rt"):
            q = json.loads(line)
            for p in q["paragraphs"]:
                key = (p["title"], p["text"])
                if key in seen:
                    continue
                seen.add(key)
                f.write(json.dumps({"id": f"p{n}", "title": p["title"], "text": p["text"]}) + "\n")
                n += 1
os.replace(out + ".tmp", out)
PY
  fi
  run_part shared "$SHARED_STEPS" "$SD/train.jsonl" "$SD/corpus.jsonl" \
    "$DATA/hotpotqa_dev500.jsonl.gz" "$DATA/musique_dev200.jsonl.gz"
fi

SECS=$(( $(date +%s) - T0 ))
python3 "$ROOT/experiments/stepwise-vs-vanilla/report.py" "$OUT" "$SECS" "$STEPS" "$SEEDS"
