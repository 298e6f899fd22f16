#!/usr/bin/env bash
# Compiles the CUDA build of the trainer, the exporter and the models crate on a machine with no GPU
# and no CUDA toolkit, from NVIDIA's PyPI wheels:
#   1. downloads the CUDA 13.0 compiler, headers and libraries candle links against
#      (nvidia-cuda-nvcc, -crt, -nvvm, -cccl, -runtime, -nvrtc, nvidia-cublas, nvidia-curand) into
#      .cache/cuda/wheels and lays them out as a toolkit in .cache/cuda/root (bin, include, lib,
#      nvvm; unversioned .so links as a toolkit has);
#   2. compiles the models crate with `--features cuda` (candle's kernels: PTX for every op, the
#      statically compiled quantized-matmul kernels for sm_$CUDA_COMPUTE_CAP), then writes the
#      link-time stub of the driver library, lib/stubs/libcuda.so (soname libcuda.so.1; linked
#      as lib/libcuda.so), with
#      every driver entry point the compiled code calls — as the toolkit's own stubs/libcuda.so
#      is: a binary linked against it loads the machine's real driver at run time;
#   3. `cargo build --release --features cuda -p steper-train -p steper-export` into
#      target/cuda (apart from the CPU build in target/release).
# It prints one JSON line: the CUDA version, the compute capability, the seconds of each stage,
# the binaries and the CUDA libraries they need at run time.
#
# CUDA 13.0 matches the GPU machines this project is checked on (driver 580, nvcc 13.0): the PTX
# of candle's kernels is JIT-compiled by the driver, which refuses PTX from a newer compiler.
# Override with CUDA_WHEEL_VERSION (13.0 or 12.x) and the versions below.
# Env: CUDA_COMPUTE_CAP (90: Hopper, as no GPU here can be asked), CUDA_TARGET_DIR (target/cuda),
# CUDA_CACHE (.cache/cuda), CARGO_BUILD_JOBS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${CUDA_CACHE:-$ROOT/.cache/cuda}"
TARGET_DIR="${CUDA_TARGET_DIR:-$ROOT/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
NVCC_V="${NVCC_VERSION:-13.0.88}"         # nvidia-cuda-nvcc / -crt / -nvvm / -nvrtc
CCCL_V="${CCCL_VERSION:-13.0.85}"         # nvidia-cuda-cccl
CUDART_V="${CUDART_VERSION:-13.0.96}"     # nvidia-cuda-runtime
CUBLAS_V="${CUBLAS_VERSION:-13.0.2.14}"   # nvidia-cublas
CURAND_V="${CURAND_VERSION:-10.4.0.35}"   # nvidia-curand
T0=$(date +%s)
now() { date +%s; }

# 1. the toolkit from wheels
t=$(now)
WHEELS="$CACHE/wheels"
TK="$CACHE/root"
mkdir -p "$WHEELS"
want=("nvidia-cuda-nvcc==$NVCC_V" "nvidia-cuda-crt==$NVCC_V" "nvidia-nvvm==$NVCC_V"
      "nvidia-cuda-nvrtc==$NVCC_V" "nvidia-cuda-cccl==$CCCL_V" "nvidia-cuda-runtime==$CUDART_V"
      "nvidia-cublas==$CUBLAS_V" "nvidia-curand==$CURAND_V")
stamp="$TK/.wheels"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${want[*]}" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 "${want[@]}" >&2
  rm -rf "$TK.tmp"
  mkdir -p "$TK.tmp/unpack"
  for spec in "${want[@]}"; do
    name="${spec%%==*}"; ver="${spec##*==}"
    whl=$(ls "$WHEELS/${name//-/_}-$ver-"*.whl 2>/dev/null | head -1)
    [[ -n "$whl" ]] || { echo "check-cuda-build: no wheel of $spec in $WHEELS" >&2; exit 1; }
    python3 -m zipfile -e "$whl" "$TK.tmp/unpack" >&2
  done
  # The wheels hold nvidia/cu13/{bin,include,lib,nvvm} (cu12 wheels: nvidia/<pkg>/…): merge them.
  for d in "$TK.tmp"/unpack/nvidia/*/; do
    for sub in bin include lib nvvm; do
      [[ -d "$d$sub" ]] && { mkdir -p "$TK.tmp/$sub"; cp -a "$d$sub/." "$TK.tmp/$sub/"; }
    done
  done
  rm -rf "$TK.tmp/unpack"
  chmod +x "$TK.tmp"/bin/* "$TK.tmp"/nvvm/bin/* 2>/dev/null || true
  # A toolkit's unversioned names, as the linker asks for them.
  for so in "$TK.tmp"/lib/lib*.so.*; do
    base="${so%%.so.*}.so"
    [[ -e "$base" ]] || ln -s "$(basename "$so")" "$base"
  done
  ln -s lib "$TK.tmp/lib64"
  echo "${want[*]}" > "$TK.tmp/.wheels"
  rm -rf "$TK"
  mv "$TK.tmp" "$TK"
fi
export CUDA_HOME="$TK" CUDA_PATH="$TK" CUDA_ROOT="$TK" NVCC="$TK/bin/nvcc"
export PATH="$TK/bin:$PATH"
NVCC_RELEASE="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ -n "$NVCC_RELEASE" ]] || { echo "check-cuda-build: $NVCC --version printed no release" >&2; exit 1; }
t_toolkit=$(( $(now) - t ))

# 2. candle's kernels, then the driver stub from what the compiled code calls
t=$(now)
export CARGO_TARGET_DIR="$TARGET_DIR"
cargo build --release --features cuda -p steper-models --lib >&2
STUB="$TK/lib/stubs"
mkdir -p "$STUB"
rlibs=$(ls "$TARGET_DIR"/release/deps/libcudarc-*.rlib "$TARGET_DIR"/release/deps/libcandle_core-*.rlib)
# Driver entry points: cu + capital letter (cuda*, cublas*, curand*, nvrtc* live in the real
# libraries of the wheels).
nm -u --no-sort $rlibs 2>/dev/null | awk '{print $NF}' | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u \
  > "$STUB/libcuda.symbols"
[[ -s "$STUB/libcuda.symbols" ]] || { echo "check-cuda-build: no driver symbols found in $rlibs" >&2; exit 1; }
{
  echo "/* Link-time stub of the CUDA driver library: every entry point fails with"
  echo "   CUDA_ERROR_STUB_LIBRARY (34). The real libcuda.so.1 of the driver is loaded at run time. */"
  while read -r s; do echo "int $s(void) { return 34; }"; done < "$STUB/libcuda.symbols"
} > "$STUB/libcuda-stub.c"
cc -shared -fPIC -o "$STUB/libcuda.so.tmp" -Wl,-soname,libcuda.so.1 "$STUB/libcuda-stub.c"
mv "$STUB/libcuda.so.tmp" "$STUB/libcuda.so"
# cudarc's build script searched lib/ before the stub existed: the linker finds it there.
ln -sf stubs/libcuda.so "$TK/lib/libcuda.so"
ln -sf libcuda.so "$STUB/libcuda.so.1"
t_kernels=$(( $(now) - t ))

# 3. the binaries
t=$(now)
cargo build --release --features cuda -p steper-train -p steper-export >&2
t_bins=$(( $(now) - t ))

bins=()
for b in steper-train steper-export; do
  [[ -x "$TARGET_DIR/release/$b" ]] || { echo "check-cuda-build: $TARGET_DIR/release/$b was not built" >&2; exit 1; }
  bins+=("$TARGET_DIR/release/$b")
done
# Without a GPU: the binary starts against the stub and `--device cuda` is a clear error.
rm -rf "$TARGET_DIR/no-gpu-student"
LD_LIBRARY_PATH="$STUB:$TK/lib" "${bins[0]}" init-student --out "$TARGET_DIR/no-gpu-student" \
  --tokenizer data/tokenizers/smollm2-135m-instruct.tokenizer.json.gz --eos-token "<|im_end|>" \
  --layers 1 --hidden 32 --heads 2 --kv-heads 1 --intermediate 64 >/dev/null
no_gpu="$(LD_LIBRARY_PATH="$STUB:$TK/lib" RUST_BACKTRACE=0 "${bins[0]}" bench-fit \
  --student "$TARGET_DIR/no-gpu-student" --device cuda --steps 1 2>&1 | head -1 || true)"
rm -rf "$TARGET_DIR/no-gpu-student"
case "$no_gpu" in
  *"no CUDA device 0 was found"*) ;;
  *) echo "check-cuda-build: --device cuda without a GPU did not fail as expected: $no_gpu" >&2; exit 1 ;;
esac
needed=$(readelf -d "${bins[0]}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -E 'cu|nvrtc' | paste -sd, -)
python3 - "$NVCC_RELEASE" "$CUDA_COMPUTE_CAP" "$t_toolkit" "$t_kernels" "$t_bins" \
  "$(( $(now) - T0 ))" "$needed" "$(wc -l < "$STUB/libcuda.symbols")" "$no_gpu" "${bins[@]}" <<'PY'
import json, os, sys
cuda, cap, tk, kern, bins_s, total, needed, nsym, no_gpu = sys.argv[1:10]
bins = sys.argv[10:]
print(json.dumps({
    "cuda": cuda, "compute_cap": int(cap),
    "seconds": {"toolkit": int(tk), "models_and_kernels": int(kern), "binaries": int(bins_s),
                "total": int(total)},
    "binaries": [{"path": b, "bytes": os.path.getsize(b)} for b in bins],
    "needs_at_run_time": [n for n in needed.split(",") if n],
    "driver_stub_symbols": int(nsym),
    "without_gpu": no_gpu,
}))
PY
