#!/usr/bin/env bash
# The GPU check, one script for a machine with one CUDA GPU, CuPy (cupy-cuda13x), PyTorch and
# mpi4py, no network and no Ray. Run it from anywhere in the repository:
#
#     bash bench/gpu_check.sh        # under 9 minutes; logs and gpu_check.json in $OUT
#                                    # (or bench/out when OUT is unset)
#
# 1. env: device, driver and library versions;
# 2. steps: every case of issue 10's table through the public API (model.to("cuda"),
#    sg.compile_step, the eager loop), against PyTorch eager on the same GPU, plus bf16/fp16
#    against torch.autocast and torch.compile's step as a reference (bench/gpu_bench.py);
# 3. cli: one `shardgrad train --set device.type="cuda"` run of the digits MLP;
# 4. tests: the GPU tests (pytest -m gpu: ops and kernels against the CPU reference, the GPU
#    step against the CPU step, device transfers, pinned staging, NCCL);
# 5. capture: CUDA Graph replay of the compiled step against its plain launches (MLP at batch
#    128 and 1024, CNN at 256): whether it captured, which GEMM the capture used (cuBLAS
#    called directly with a preset workspace: runtime/capture_gemm.py), both times;
# 6. pipeline: dp = 2 (the GPU step's bucketed allreduce), pp = 2 on 2 ranks and dp = 2 x
#    pp = 2 on 4, sharing GPU 0, against the CPU runs in float32 and float64
#    (bench/gpu_pipeline.py);
# 7. libs: the optional libraries (the gpu-libs extra): whether nvmath-python (cuBLASLt) and
#    cuDNN's frontend import; where cuBLASLt does, own kernels against its GEMM + bias/activation
#    epilogue per linear-layer shape, and the MLP steps with it allowed and disabled
#    (bench/gpu_bench.py --part libs); where it does not, the line saying so.
# Every part runs in its own process under its own time limit, so one failure loses nothing
# else; the last line printed is the JSON summary.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUTDIR=${OUT:-$ROOT/bench/out}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}

# The repository root is the package `shardgrad`: put it on the path under that name
# (pip install -e would need build tools and a network the GPU machine may not have).
SITE=$(mktemp -d /tmp/sg_site.XXXXXX)
ln -s "$ROOT" "$SITE/shardgrad"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/sg_cupy_cache}"

START=$(date +%s)
STATUS=$(mktemp /tmp/sg_status.XXXXXX)

part() {  # part NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUTDIR/NAME.log
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >>"$OUTDIR/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >>"$STATUS"
    tail -n 15 "$OUTDIR/$name.log"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

# Worst case, every part at its limit: 20 + 130 + 40 + 100 + 40 + 190 + 20 = 540 s.
rm -f "$OUTDIR"/env.log "$OUTDIR"/steps.log "$OUTDIR"/cli.log "$OUTDIR"/tests.log \
    "$OUTDIR"/pipeline.log "$OUTDIR"/capture.log "$OUTDIR"/libs.log
# GPU_CHECK_PARTS picks and orders parts (default: all, as below) when device time is short.
for name in ${GPU_CHECK_PARTS:-env steps cli tests capture pipeline libs}; do
  case $name in
    env) part env 20 "$PY" bench/gpu_bench.py --part env
         nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
             >>"$OUTDIR/env.log" 2>&1 || true ;;
    steps) part steps 130 "$PY" bench/gpu_bench.py --part steps --steps 20 ;;
    cli) part cli 40 "$PY" bench/gpu_bench.py --part cli --epochs 3 ;;
    tests) part tests 100 "$PY" -m pytest -v -rfE -p no:cacheprovider --timeout 90 -m gpu \
             tests/ops/test_gpu_ops.py tests/runtime/test_gpu_runtime.py \
             tests/runtime/test_tensor_device.py tests/runtime/test_gpu_step.py \
             tests/runtime/test_capture_gemm.py tests/runtime/test_gpu_libs_device.py ;;
    capture) part capture 40 "$PY" bench/gpu_bench.py --part capture --steps 20 ;;
    fused) part fused 25 "$PY" bench/gpu_bench.py --part fused ;;
    pipeline) part pipeline 190 "$PY" bench/gpu_pipeline.py ;;
    libs) part libs 20 "$PY" bench/gpu_bench.py --part libs --steps 10 ;;
    *) echo "unknown part $name" ;;
  esac
done

"$PY" bench/gpu_summary.py "$OUTDIR" "$START" "$STATUS" | tee "$OUTDIR/gpu_check.json"
rm -rf "$SITE" "$STATUS"
