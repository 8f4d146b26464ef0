"""The host CUDA emulation (tests/runtime/host_cuda.py) runs a block as many threads: warp
shuffles exchange values between the 32 lanes of a warp, __syncthreads is a real barrier,
and grid-stride loops stride over every block and thread. Each case here computes a
different answer with one thread per launch (the emulation this replaced), so it fails
there; and the softmax kernels' block reductions run with up to 1024 threads."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import host_cuda  # noqa: E402

from shardgrad.ops import gpu  # noqa: E402

pytestmark = [pytest.mark.hostcc,
              pytest.mark.skipif(host_cuda.compiler() is None, reason="no host C++ compiler")]

KERNELS = r"""
__device__ float warp_sum(float v) {
    for (int o = warpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[block * warps + warp] = sum over the warp's lanes of (threadIdx.x + 1)
extern "C" __global__ void warp_sums(float* out) {
    const float s = warp_sum((float)(threadIdx.x + 1));
    if (threadIdx.x % warpSize == 0)
        out[blockIdx.x * (blockDim.x / warpSize) + threadIdx.x / warpSize] = s;
}

// out[block] = sum over the block of x[block * blockDim + t], via __shfl_down_sync and
// shared memory (the two-level reduction of ops/cuda/softmax.cu)
extern "C" __global__ void block_sums(const float* x, float* out) {
    __shared__ float sh[32];
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int d = warpSize / 2; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
    if (threadIdx.x % warpSize == 0) sh[threadIdx.x / warpSize] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0;
        for (int w = 0; w < (int)(blockDim.x / warpSize); ++w) s += sh[w];
        out[blockIdx.x] = s;
    }
}

// every thread reads its right neighbour's value, written before the barrier
extern "C" __global__ void rotate(int* out) {
    __shared__ int sh[1024];
    sh[threadIdx.x] = (int)(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
}

// lane 5 waits at __syncthreads while the rest of its warp waits at a shuffle
extern "C" __global__ void divergent(float* out) {
    float v = 1;
    if (threadIdx.x == 5) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
"""

STRIDE = r"""
// grid-stride: out[i] names the (block, thread) that wrote it
extern "C" __global__ void who(int* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        out[i] = (int)(blockIdx.x * 10000 + threadIdx.x);
}
"""


@pytest.fixture(scope="module")
def launch():
    return host_cuda.HostLauncher()


@pytest.mark.parametrize("block", [32, 64, 256])
def test_warp_shuffles_exchange_between_lanes(launch, block):
    grid = 3
    out = np.full(grid * block // 32, -1, np.float32)
    launch(KERNELS, "warp_sums", (), grid, block, (out,))
    lane_sum = sum(range(1, 33))
    want = [lane_sum + 32 * 32 * w for w in range(block // 32)] * grid
    np.testing.assert_array_equal(out, np.array(want, np.float32))
    assert launch.threads["warp_sums"] == block


def test_block_reduction_through_shuffles_and_shared_memory(launch):
    grid, block = 5, 512
    x = np.random.default_rng(0).integers(-8, 8, grid * block).astype(np.float32)
    out = np.zeros(grid, np.float32)
    launch(KERNELS, "block_sums", (), grid, block, (x, out))
    np.testing.assert_array_equal(out, x.reshape(grid, block).sum(axis=1))


def test_syncthreads_is_a_barrier(launch):
    grid, block = 2, 96
    out = np.zeros(grid * block, np.int32)
    launch(KERNELS, "rotate", (), grid, block, (out,))
    t = np.arange(block)
    want = np.concatenate([b * 1000 + (t + 1) % block for b in range(grid)])
    np.testing.assert_array_equal(out, want)


def test_grid_stride_loops_visit_every_block_and_thread(launch):
    n, grid, block = 1000, 3, 64
    out = np.full(n, -1, np.int32)
    launch(STRIDE, "who", (), grid, block, (out, np.int32(n)))
    g = np.arange(n) % (grid * block)
    np.testing.assert_array_equal(out, (g // block) * 10000 + g % block)


def test_a_barrier_not_every_thread_reaches_is_reported(launch):
    with pytest.raises(RuntimeError, match="divergent .* deadlocked"):
        launch(KERNELS, "divergent", (), 1, 32, (np.zeros(32, np.float32),))


def test_softmax_block_reductions_run_on_many_threads(launch, monkeypatch):
    monkeypatch.setattr(gpu, "launch", launch)
    x = np.random.default_rng(1).standard_normal((3, 1500))
    before = launch.fiber_switches(gpu.source("softmax.cu"), ("-DSG_T=double",))
    got = gpu.softmax(np, x, axis=1)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    assert launch.threads["softmax_rows"] == 1024
    # each of the 1024 threads of each row's block stopped at the reductions' barriers
    assert launch.fiber_switches(gpu.source("softmax.cu"), ("-DSG_T=double",)) - before > (
        3 * 1024 * 10)
