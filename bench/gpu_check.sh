#!/usr/bin/env bash
# The GPU check, one script for a machine with one CUDA GPU, CuPy (cupy-cuda13x), PyTorch and
# mpi4py, no network and no Ray. Run it from anywhere in the repository:
#
#     bash bench/gpu_check.sh        # under 8 minutes; logs and gpu_check.json in $OUT
#                                    # (or bench/out when OUT is unset)
#
# 1. the GPU tests (pytest -m gpu: every op's float32 outputs and gradients on the GPU against
#    the CPU reference, the hand-written kernels, DeviceStep, pinned staging, NCCL);
# 2. benchmarks against PyTorch eager on the same GPU: the MLP 784-512-512-10 training step
#    at batch 1024, the CNN step, a fused elementwise kernel against a device-to-device copy;
# 3. the op table on cupy (test_op_cases, generic kernels);
# 4. pipelines on the GPU (bench/gpu_pipeline.py): pp = 2 on 2 ranks and dp = 2 x pp = 2 on 4,
#    sharing GPU 0, against the CPU pipeline in float32 and float64. Every part runs in its own
#    process under its own time limit, so one failure loses nothing else; the last line
#    printed is the JSON summary.
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

# Worst case, every part at its limit: 25 + 110 + 50 + 40 + 25 + 40 + 150 = 440 s.
rm -f "$OUTDIR"/env.log "$OUTDIR"/tests.log "$OUTDIR"/mlp.log "$OUTDIR"/cnn.log \
    "$OUTDIR"/fused.log "$OUTDIR"/optable.log "$OUTDIR"/pipeline.log
# GPU_CHECK_PARTS picks and orders parts (default: all, as below) when device time is short.
for name in ${GPU_CHECK_PARTS:-env tests mlp cnn fused optable pipeline}; do
  case $name in
    env) part env 25 "$PY" bench/gpu_bench.py --part env
         nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
             >>"$OUTDIR/env.log" 2>&1 || true ;;
    tests) part tests 110 "$PY" -m pytest -v -rfE -p no:cacheprovider --timeout 100 -m gpu \
             tests/ops/test_gpu_ops.py tests/runtime/test_gpu_runtime.py \
             tests/runtime/test_tensor_device.py ;;
    mlp) part mlp 50 "$PY" bench/gpu_bench.py --part mlp --steps 20 ;;
    cnn) part cnn 40 "$PY" bench/gpu_bench.py --part cnn --steps 10 ;;
    fused) part fused 25 "$PY" bench/gpu_bench.py --part fused ;;
    optable) part optable 40 "$PY" -m pytest -q -rfE -p no:cacheprovider --timeout 30 \
             tests/ops/test_op_cases.py -k "test_forward and cupy" ;;
    pipeline) part pipeline 150 "$PY" bench/gpu_pipeline.py ;;
    *) echo "unknown part $name" ;;
  esac
done

"$PY" bench/gpu_summary.py "$OUTDIR" "$START" "$STATUS" | tee "$OUTDIR/gpu_check.json"
rm -rf "$SITE" "$STATUS"
