// Row-wise softmax, log-softmax and softmax cross-entropy (forward and backward) over a
// contiguous (rows, cols) matrix: one block per row (grid-stride over rows), threads striding
// over the columns, warp-shuffle then shared-memory reductions. Compiled by CuPy (NVRTC) with
// -DSG_T=float or -DSG_T=double; no #include, so NVRTC and nvcc see the same source.
#ifndef SG_T
#define SG_T float
#endif
typedef SG_T T;

__device__ __forceinline__ T sg_neg_inf() { return -(T)__int_as_float(0x7f800000); }

// NaN-propagating max, as numpy.max: a NaN, once seen, wins.
__device__ __forceinline__ T sg_max(T a, T b) { return (b > a || b != b) ? b : a; }

struct SumOp {
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
    __device__ __forceinline__ T operator()(T a, T b) const { return sg_max(a, b); }
};

template <class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = warpSize / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// blockDim.x must be a multiple of warpSize (the launcher uses 32..1024); `identity` stands
// for the lanes of warp 0 past the block's warps.
template <class Op>
__device__ T block_reduce(T v, T* sh, T identity, Op op) {
    const int lane = threadIdx.x % warpSize, w = threadIdx.x / warpSize;
    const int nw = (blockDim.x + warpSize - 1) / warpSize;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : identity;
        v = warp_reduce(v, op);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

// max and sum(exp(x - max)) of one row, shared by every kernel below
__device__ void row_stats(const T* __restrict__ xr, int cols, T* sh, T* m_out, T* s_out) {
    T m = sg_neg_inf();
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = sg_max(m, xr[j]);
    m = block_reduce(m, sh, sg_neg_inf(), MaxOp());
    T s = 0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += exp(xr[j] - m);
    *m_out = m;
    *s_out = block_reduce(s, sh, (T)0, SumOp());
}

// out = softmax(x) (log_out = 0) or log_softmax(x) (log_out = 1) along each row
extern "C" __global__ void softmax_rows(const T* __restrict__ x, T* __restrict__ out, int rows,
                                        int cols, int log_out) {
    __shared__ T sh[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + (long long)r * cols;
        T* orow = out + (long long)r * cols;
        T m, s;
        row_stats(xr, cols, sh, &m, &s);
        if (log_out) {
            const T ls = log(s);
            for (int j = threadIdx.x; j < cols; j += blockDim.x) orow[j] = (xr[j] - m) - ls;
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) orow[j] = exp(xr[j] - m) / s;
        }
    }
}

// nll[r] = -log softmax(x[r])[y[r]]; a label outside [0, cols) sets *bad and gives nll 0
extern "C" __global__ void xent_fwd(const T* __restrict__ x, const long long* __restrict__ y,
                                    T* __restrict__ nll, int* __restrict__ bad, int rows,
                                    int cols) {
    __shared__ T sh[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + (long long)r * cols;
        T m, s;
        row_stats(xr, cols, sh, &m, &s);
        if (threadIdx.x == 0) {
            const long long k = y[r];
            if (k < 0 || k >= cols) {
                // the label itself, so the error names it when the flag is read (never 0:
                // 0 is in range), clamped to int
                *bad = k < -2147483647LL ? -2147483647 : k > 2147483647LL ? 2147483647 : (int)k;
                nll[r] = 0;
            } else {
                nll[r] = -((xr[k] - m) - log(s));
            }
        }
    }
}

// gx[r, j] = (softmax(x[r])[j] - [j == y[r]]) * (g[r or 0] * scale); per_row: g has one value
// per row (reduction "none"), else one value for all (mean: scale = 1/rows; sum: scale = 1)
extern "C" __global__ void xent_bwd(const T* __restrict__ x, const long long* __restrict__ y,
                                    const T* __restrict__ g, T* __restrict__ gx, int rows,
                                    int cols, T scale, int per_row) {
    __shared__ T sh[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + (long long)r * cols;
        T* gr = gx + (long long)r * cols;
        T m, s;
        row_stats(xr, cols, sh, &m, &s);
        const T gs = g[per_row ? r : 0] * scale;
        const long long k = y[r];
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const T p = exp(xr[j] - m) / s;
            gr[j] = (p - (j == k ? (T)1 : (T)0)) * gs;
        }
    }
}
