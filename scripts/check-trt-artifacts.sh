#!/usr/bin/env bash
# Checks the TensorRT / ONNX Runtime artifacts against their real peers, on a machine without a
# GPU (docs/results/2026-12-06-trt-artifacts-vs-peers.md):
#   - the INT8 tables of steper-calibrate (calibration.flatbuffers / .cache / .json) against the
#     same ranges written by onnxruntime.quantization's write_calibration_table;
#   - the QDQ models of steper-calibrate and the `--target portable` quantized exports against
#     onnx.checker (full check, strict shape inference) and ONNX Runtime session creation, with
#     every op listed against the TensorRT ONNX parser's operator table (scripts/trt_operators.py);
#   - steper-run's CUDA / TensorRT provider registration against the onnxruntime-gpu wheel's
#     provider libraries.
# Makes a Python venv under .cache/ (PyPI: onnxruntime, onnx, flatbuffers, numpy), builds the
# debug binaries it needs, makes the tiny fixture, prints one JSON report on stdout and exits 1
# on a mismatch. Network: PyPI on the first run (the venv, the ONNX Runtime library, the
# onnxruntime-gpu wheel: 256 MB, kept in .cache/onnxruntime-gpu-wheel; its unpacked 315 MB are
# deleted at exit). SKIP_PROVIDERS=1 leaves out the provider part (and the wheel).
#
# Usage: scripts/check-trt-artifacts.sh [--out REPORT.json] [--keep DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${STEPER_CACHE:-$ROOT/.cache}"
OUT=""
KEEP=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-trt-artifacts.sh: unknown argument $1 (expected --out FILE, --keep DIR)" >&2; exit 2 ;;
  esac
done

ORT_VERSION=1.31.1
VENV="$CACHE/trt-check-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import onnxruntime, onnx, flatbuffers" 2>/dev/null; then
  echo "== venv $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "onnxruntime==$ORT_VERSION" "onnx==1.23.2" "flatbuffers==25.12.19" "numpy==2.4.6" >&2
fi

echo "== building steper-test-fixture, steper-calibrate, steper-export, steper-run (debug)" >&2
cargo build -q -p steper-test-support -p steper-calibration -p steper-export -p steper-runtime \
  --bin steper-test-fixture --bin steper-calibrate --bin steper-export --bin steper-run >&2
BIN="$ROOT/target/debug"
FIXTURE="$("$BIN/steper-test-fixture" | tail -n1)"
CPU_LIB="$(bash scripts/install-ort.sh)"
export ORT_DYLIB_PATH="$CPU_LIB"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/steper-trt-check.XXXXXX")"
cleanup() {
  if [[ -n "$KEEP" ]]; then
    mkdir -p "$KEEP" && cp -r "$WORK"/int8* "$WORK"/portable-* "$KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== calibrating the tiny export ($FIXTURE)" >&2
CAL=(--model "$FIXTURE/export" --data "$FIXTURE/world/train.jsonl" --index "$FIXTURE/index"
     --samples 12 --holdout 0 --greedy-tokens 0 --bench-tokens 0 --max-tokens 256 --bins 512
     --threads 2)
"$BIN/steper-calibrate" "${CAL[@]}" --out "$WORK/int8" >&2
"$BIN/steper-calibrate" "${CAL[@]}" --method minmax --ranges "$WORK/int8/calibration.json" \
  --out "$WORK/int8-minmax" >&2
"$BIN/steper-calibrate" "${CAL[@]}" --method minmax --ranges "$WORK/int8/calibration.json" \
  --smooth-alpha 0.8 --keep-float down_proj --out "$WORK/int8-smooth" >&2

echo "== portable quantized exports" >&2
for q in int8 int4; do
  "$BIN/steper-export" --checkpoint "$FIXTURE/student" --out "$WORK/portable-$q" \
    --quantize "$q" --target portable >&2
done

PROVIDER_ARGS=()
if [[ "${SKIP_PROVIDERS:-0}" != 1 ]]; then
  WHEEL_DIR="$CACHE/onnxruntime-gpu-wheel"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/onnxruntime_gpu-"$ORT_VERSION"-*.whl >/dev/null 2>&1; then
    echo "== downloading onnxruntime-gpu $ORT_VERSION (256 MB, --no-deps)" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
      --dest "$WHEEL_DIR" "onnxruntime-gpu==$ORT_VERSION" >&2
  fi
  WHEEL="$(ls "$WHEEL_DIR"/onnxruntime_gpu-"$ORT_VERSION"-*.whl | head -n1)"
  "$VENV/bin/python" - "$WHEEL" "$WORK/ort-gpu" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for m in z.namelist():
        if m.startswith("onnxruntime/capi/lib") and ".so" in m:
            z.extract(m, sys.argv[2])
PY
  PROVIDER_ARGS=(--ort-gpu-capi "$WORK/ort-gpu/onnxruntime/capi" --ort-gpu-wheel "$(basename "$WHEEL")"
                 --cpu-ort-lib "$CPU_LIB" --steper-run "$BIN/steper-run" --fixture "$FIXTURE")
fi

echo "== checking against the peers" >&2
set +e
"$VENV/bin/python" scripts/check_trt_artifacts.py \
  --calib "$WORK/int8" --calib "$WORK/int8-minmax" --calib "$WORK/int8-smooth" \
  --model "fp32-export=$FIXTURE/export/model.onnx" \
  --model "qdq=$WORK/int8/model.int8.onnx" \
  --model "qdq-smoothed=$WORK/int8-smooth/model.int8.onnx" \
  --model "smoothed-fp32=$WORK/int8-smooth/smoothed-fp32/model.onnx" \
  --model "portable-int8=$WORK/portable-int8/model.onnx" \
  --model "portable-int4=$WORK/portable-int4/model.onnx" \
  "${PROVIDER_ARGS[@]}" > "$WORK/report.json"
RC=$?
set -e
if [[ -n "$OUT" ]]; then cp "$WORK/report.json" "$OUT"; fi
cat "$WORK/report.json"
exit "$RC"
