#!/usr/bin/env bash
# Builds the repository's data/ folder from the source sample files (the QA samples in the
# project's schema, IRCoT's prompt files and their licence, the SmolLM2 tokenizer):
#
#   bash scripts/make-data.sh SOURCE_DIR
#
# Each QA file is read through the project's own reader (`steper-run data convert --from auto`),
# which checks every record, and its output is written as data/NAME.jsonl.gz with `gzip -9 -n`
# (no name, no time stamp: the same input gives the same bytes). The script refuses a result
# over 15 MB. Set STEPER_RUN to use a built steper-run instead of building one (cargo build).
set -euo pipefail

if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  [[ $# -eq 1 ]] && exit 0 || exit 2
fi
SRC="$1"
[[ -d "$SRC" ]] || { echo "error: $SRC: not a directory" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/data"
LIMIT_BYTES=$((15 * 1000 * 1000))

QA_FILES=(
  hotpotqa_dev500 hotpotqa_train100 hotpotqa_trainpool1192
  musique_dev200 musique_train100
  2wikimultihopqa_dev164 2wikimultihopqa_trainpool960
)
PROMPTS=(hotpotqa musique 2wikimultihopqa)
PROMPT_LICENSE=LICENSE.ircot-Apache-2.0.txt
TOKENIZER=smollm2-135m-instruct.tokenizer.json

for f in "${QA_FILES[@]}"; do
  [[ -f "$SRC/$f.jsonl" ]] || { echo "error: $SRC/$f.jsonl: missing" >&2; exit 1; }
done
for p in "${PROMPTS[@]}"; do
  [[ -f "$SRC/ircot_prompts/$p.txt" ]] || { echo "error: $SRC/ircot_prompts/$p.txt: missing" >&2; exit 1; }
done
[[ -f "$SRC/ircot_prompts/$PROMPT_LICENSE" ]] || { echo "error: $SRC/ircot_prompts/$PROMPT_LICENSE: missing" >&2; exit 1; }
[[ -f "$SRC/$TOKENIZER" ]] || { echo "error: $SRC/$TOKENIZER: missing" >&2; exit 1; }

if [[ -n "${STEPER_RUN:-}" ]]; then
  RUN=("$STEPER_RUN")
else
  cargo build --quiet --manifest-path "$ROOT/Cargo.toml" -p steper-runtime --bin steper-run
  RUN=("$ROOT/target/debug/steper-run")
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT/ircot_prompts" "$OUT/tokenizers"

for f in "${QA_FILES[@]}"; do
  summary="$("${RUN[@]}" data convert --from auto "$SRC/$f.jsonl" --out "$TMP/$f.jsonl" --json)"
  python3 - "$f" "$summary" <<'PY'
import json, sys
name, s = sys.argv[1], json.loads(sys.argv[2])
if s["format"] != "steper" or s["skipped_records"] != 0:
    sys.exit(f"error: {name}: read as {s['format']} with {s['skipped_records']} records skipped")
print(f"{name}: {s['records']} questions, {s['skipped_supporting_facts']} supporting facts past their paragraph")
PY
  gzip -9 -n -c "$TMP/$f.jsonl" > "$TMP/$f.jsonl.gz"
  mv "$TMP/$f.jsonl.gz" "$OUT/$f.jsonl.gz"
done

for p in "${PROMPTS[@]}"; do
  install -m 0644 "$SRC/ircot_prompts/$p.txt" "$OUT/ircot_prompts/$p.txt"
done
install -m 0644 "$SRC/ircot_prompts/$PROMPT_LICENSE" "$OUT/ircot_prompts/$PROMPT_LICENSE"
gzip -9 -n -c "$SRC/$TOKENIZER" > "$TMP/$TOKENIZER.gz"
mv "$TMP/$TOKENIZER.gz" "$OUT/tokenizers/smollm2-135m-instruct.tokenizer.json.gz"

total=$(find "$OUT" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
if (( total > LIMIT_BYTES )); then
  echo "error: data/ holds $total bytes, more than $LIMIT_BYTES" >&2
  exit 1
fi
echo "data/: $total bytes"
