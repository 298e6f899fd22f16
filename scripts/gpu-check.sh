#!/usr/bin/env bash
# The GPU check of the candle paths: training and the candle teacher on CUDA against the CPU.
#
#   bash scripts/gpu-check.sh prepare   # here, on a machine with no GPU: fills .gpu-check/
#   bash scripts/gpu-check.sh run       # on an NVIDIA machine (H100/H200), no network needed
#
# `prepare` runs scripts/check-cuda-build.sh (the CUDA build of steper-train, from NVIDIA's PyPI
# wheels) and puts into .gpu-check/ (git-ignored; ≤ 64 MiB, what travels with the working tree):
# the stripped, xz-compressed CUDA binary; gold-teacher step-wise records of 40 HotpotQA train
# questions and the BM25 index of 10 dev questions (made with the CPU build); nothing else —
# the models are made on the GPU machine by `init-student` (random weights, no download).
#
# `run` needs only an NVIDIA driver, python3 and the CUDA 13 runtime libraries (cudart, cublas,
# cublasLt, curand, nvrtc: found in the machine's Python packages or CUDA install). It makes
# students at SmolLM2-135M's shape (the SmolLM2 tokenizer of data/tokenizers) and at
# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 151,936), and:
#   1. `fit`: the same 20 steps on CUDA and on the CPU, f32 — losses compared step for step
#      under FIT_LOSS_TOL — then 20 steps on CUDA in bf16 (reported against f32);
#   2. `bench-fit --device cuda`: tokens/s and peak GPU memory (nvidia-smi, sampled every
#      100 ms) at both shapes, f32 and bf16;
#   3. the candle teacher (`distill --teacher checkpoint:…`) on 10 dev questions on CUDA and on
#      the CPU in f32: greedy traces compared question for question.
# It writes one JSON report, $OUT/gpu-check.json (GPU_CHECK_OUT overrides), and prints it. It is
# sized to finish in ≤ 8 minutes on one H100.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PREP="${GPU_CHECK_PREP:-$ROOT/.gpu-check}"
# Rehearsal on a machine without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 runs every command
# of `run` with the CPU in place of the GPU and tiny shapes (flags, files and report checked).
DEV="${GPU_CHECK_DEVICE:-cuda}"
SMALL="${GPU_CHECK_SMALL:-0}"
# Losses of the same f32 steps on two devices differ by reduction order only.
FIT_LOSS_TOL="${FIT_LOSS_TOL:-1e-3}"

prepare() {
  local cuda_json
  cuda_json="$(bash scripts/check-cuda-build.sh)"
  export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash scripts/install-ort.sh)}"
  cargo build --release -p steper-train -p steper-runtime >&2
  local cpu="$ROOT/target/release" cuda="${CUDA_TARGET_DIR:-$ROOT/target/cuda}/release"
  rm -rf "$PREP.tmp"
  mkdir -p "$PREP.tmp"
  strip -o "$PREP.tmp/steper-train" "$cuda/steper-train"
  xz -T0 -6 "$PREP.tmp/steper-train"
  local work="$PREP.tmp/work"
  mkdir -p "$work"
  zcat data/hotpotqa_trainpool1192.jsonl.gz | head -n 40 > "$work/train.jsonl"
  zcat data/hotpotqa_dev500.jsonl.gz | head -n 10 > "$PREP.tmp/dev10.jsonl"
  "$cpu/steper-run" index --from-qa "$work/train.jsonl" --out "$work/index-train" >/dev/null
  "$cpu/steper-train" distill --teacher gold --data "$work/train.jsonl" --index "$work/index-train" \
    --out "$work/distill" >/dev/null
  cp "$work/distill/stepwise.jsonl" "$PREP.tmp/stepwise.jsonl"
  "$cpu/steper-run" index --from-qa "$PREP.tmp/dev10.jsonl" --out "$PREP.tmp/index-dev10" >/dev/null
  rm -rf "$work"
  echo "$cuda_json" > "$PREP.tmp/cuda-build.json"
  git rev-parse HEAD > "$PREP.tmp/commit"
  rm -rf "$PREP"
  mv "$PREP.tmp" "$PREP"
  du -sh "$PREP" >&2
  echo "prepared $PREP; on the GPU machine: bash scripts/gpu-check.sh run (carry .gpu-check)" >&2
}

# The CUDA runtime libraries of the machine: a CUDA install or the nvidia-* Python packages.
find_cuda_libs() {
  local d dirs=()
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    d=""
    for root in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
      [[ -e "$root/$lib" ]] && { d="$root"; break; }
    done
    if [[ -z "$d" ]]; then
      d="$(python3 - "$lib" <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "**", sys.argv[1]), recursive=True):
        print(os.path.dirname(p)); sys.exit()
PY
)"
    fi
    [[ -n "$d" ]] || d="$(find / -name "$lib" -not -path '*/proc/*' 2>/dev/null | head -1 | xargs -r dirname)"
    [[ -n "$d" ]] || { echo "gpu-check: $lib not found on this machine" >&2; return 1; }
    dirs+=("$d")
  done
  printf '%s\n' "${dirs[@]}" | sort -u | paste -sd: -
}

run() {
  [[ -f "$PREP/steper-train.xz" ]] || { echo "gpu-check: $PREP/steper-train.xz missing: run 'bash scripts/gpu-check.sh prepare' first" >&2; exit 1; }
  local out="${GPU_CHECK_OUT:-${OUT:-$ROOT/out/gpu-check}}"
  local w="/tmp/gpu-check"
  rm -rf "$w"; mkdir -p "$w" "$out"
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    "$PREP/steper-train.xz" "$w/steper-train"
  chmod +x "$w/steper-train"
  export LD_LIBRARY_PATH="${GPU_CHECK_LIBS:-$(find_cuda_libs)}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local T="$w/steper-train" log="$out/gpu-check.log"
  : > "$log"
  step() { echo "== $* ($(( $(date +%s) - T0 )) s)" | tee -a "$log" >&2; }
  T0=$(date +%s)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$w/gpu.txt" 2>&1 || true
  local tok="$ROOT/data/tokenizers/smollm2-135m-instruct.tokenizer.json.gz"

  local smol=(--layers 30 --hidden 576 --heads 9 --kv-heads 3 --intermediate 1536)
  local qwen=(--vocab-size 151936 --layers 24 --hidden 896 --heads 14 --kv-heads 2 --intermediate 4864)
  local fit_steps=20 bench_steps=10
  if [[ "$SMALL" == 1 ]]; then
    smol=(--layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128)
    qwen=(--vocab-size 49216 --layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128)
    fit_steps=3 bench_steps=2
  fi
  step "students: SmolLM2-135M shape, Qwen2.5-0.5B shape (random weights)"
  "$T" init-student --tokenizer "$tok" --eos-token "<|im_end|>" --out "$w/smollm2" \
    "${smol[@]}" --context 2048 >> "$log" 2>&1
  "$T" init-student --tokenizer "$tok" --eos-token "<|im_end|>" --model-type qwen2 --out "$w/qwen05" \
    "${qwen[@]}" --context 2048 >> "$log" 2>&1

  fit_run() { # name device dtype
    "$T" fit --student "$w/smollm2" --data "$PREP/stepwise.jsonl" --out "$w/fit-$1" --steps "$fit_steps" \
      --batch-size 2 --lr 1e-4 --warmup 2 --seed 0 --eval-fraction 0 --eval-every 0 --save-every 0 \
      --device "$2" --dtype "$3" >> "$log" 2>&1
  }
  step "fit: $fit_steps steps, $DEV f32"; fit_run cuda-f32 "$DEV" f32
  step "fit: $fit_steps steps, cpu f32"; fit_run cpu-f32 cpu f32
  step "fit: $fit_steps steps, $DEV bf16"; fit_run cuda-bf16 "$DEV" bf16

  bench() { # name model dtype
    local mem="$w/mem-$1.txt"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" 2>/dev/null &
    local smi=$!
    "$T" bench-fit --student "$w/$2" --batch-size 8 --seq-len 512 --steps "$bench_steps" --warmup-steps 1 --device "$DEV" \
      --dtype "$3" > "$w/bench-$1.json" 2>> "$log"
    kill "$smi" 2>/dev/null || true; wait "$smi" 2>/dev/null || true
  }
  local base_mem
  base_mem="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0)"
  for m in smollm2 qwen05; do
    for dt in f32 bf16; do step "bench-fit $m $dt"; bench "$m-$dt" "$m" "$dt"; done
  done

  teacher() { # device label
    "$T" distill --teacher "checkpoint:$w/smollm2" --data "$PREP/dev10.jsonl" --index "$PREP/index-dev10" \
      --out "$w/teacher-$2" --max-new-tokens 24 --max-steps 3 --filter none --device "$1" --dtype f32 \
      >> "$log" 2>&1
  }
  step "candle teacher, 10 questions, $DEV f32"; teacher "$DEV" gpu
  step "candle teacher, 10 questions, cpu f32"; teacher cpu cpu
  step "report"

  python3 - "$w" "$out/gpu-check.json" "$FIT_LOSS_TOL" "$base_mem" "$(( $(date +%s) - T0 ))" "$PREP" <<'PY'
import json, os, sys
w, dst, tol, base_mem, secs, prep = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
def losses(run):
    rows = [json.loads(l) for l in open(f"{w}/fit-{run}/train_log.jsonl") if l.strip()]
    return [r["total"] for r in rows if r.get("total") is not None and not r.get("skipped")]
rep = {"gpu": open(f"{w}/gpu.txt").read().strip(), "seconds": secs, "device": os.environ.get("GPU_CHECK_DEVICE", "cuda"),
       "small": os.environ.get("GPU_CHECK_SMALL", "0") == "1",
       "commit": open(f"{prep}/commit").read().strip(),
       "cuda_build": json.load(open(f"{prep}/cuda-build.json"))}
cu, cp, bf = losses("cuda-f32"), losses("cpu-f32"), losses("cuda-bf16")
diff = max(abs(a - b) for a, b in zip(cu, cp)) if cu and len(cu) == len(cp) else None
rep["fit"] = {"steps": len(cu), "loss_cuda_f32": cu, "loss_cpu_f32": cp, "loss_cuda_bf16": bf,
              "max_abs_diff_f32": diff, "tolerance": tol,
              "f32_match": diff is not None and diff <= tol,
              "max_abs_diff_bf16_vs_f32": max(abs(a - b) for a, b in zip(cu, bf)) if bf else None}
rep["bench_fit"] = {}
for name in sorted(os.listdir(w)):
    if name.startswith("bench-") and name.endswith(".json"):
        key = name[6:-5]
        try:
            b = json.load(open(f"{w}/{name}"))
        except Exception as e:
            b = {"error": str(e)}
        mem = [int(x) for x in open(f"{w}/mem-{key}.txt").read().split() if x.strip().isdigit()]
        b["peak_gpu_mib_sampled"] = (max(mem) - int(base_mem or 0)) if mem else None
        rep["bench_fit"][key] = b
def untimed(v):
    # Timings (`*_ms`, `seconds`) differ from run to run; the greedy trace is the rest.
    if isinstance(v, dict):
        return {k: untimed(x) for k, x in v.items() if not k.endswith("_ms") and k != "seconds"}
    if isinstance(v, list):
        return [untimed(x) for x in v]
    return v
def traces(dev):
    return [untimed(json.loads(l)) for l in open(f"{w}/teacher-{dev}/traces.jsonl") if l.strip()]
tc, tp = traces("gpu"), traces("cpu")
same = sum(1 for a, b in zip(tc, tp) if a == b)
rep["teacher"] = {"questions": len(tp), "identical_traces": same,
                  "all_identical": len(tc) == len(tp) and same == len(tp),
                  "first_difference": next((i for i, (a, b) in enumerate(zip(tc, tp)) if a != b), None)}
text = json.dumps(rep, indent=1)
open(dst + ".tmp", "w").write(text); os.replace(dst + ".tmp", dst)
print(text)
PY
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu-check.sh prepare|run" >&2; exit 2 ;;
esac
