#!/usr/bin/env bash
# Install the ONNX Runtime shared library used by `ort` (load-dynamic) from the PyPI wheel
# onnxruntime==1.31.1 into .cache/onnxruntime/ (git-ignored). Prints the library path on stdout;
# scripts export it as ORT_DYLIB_PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STEPER_CACHE:-$ROOT/.cache}"
VERSION="${ORT_VERSION:-1.31.1}"
DEST="$CACHE/onnxruntime"
LIB="$DEST/libonnxruntime.so.$VERSION"
if [[ -s "$LIB" ]]; then
  echo "$LIB"
  exit 0
fi
mkdir -p "$DEST/wheel"
python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
  --dest "$DEST/wheel" "onnxruntime==$VERSION" >&2
WHEEL="$(ls "$DEST"/wheel/onnxruntime-"$VERSION"-*.whl | head -n1)"
python3 - "$WHEEL" "$LIB" <<'PY'
import sys, zipfile, shutil, os
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z:
    member = next(m for m in z.namelist()
                  if os.path.basename(m).startswith("libonnxruntime.so.") and "/capi/" in m)
    tmp = dst + ".tmp"
    with z.open(member) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out)
    os.replace(tmp, dst)
PY
rm -rf "$DEST/wheel"
echo "$LIB"
