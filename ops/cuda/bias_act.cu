// Bias + activation over a contiguous (rows, cols) matrix with the bias along the last axis:
// forward out = act(x + b), backward gz = g * act'(x + b) (the bias gradient is gz summed over
// the rows, a separate reduction). act: 0 identity, 1 relu, 2 gelu (tanh form), 3 tanh.
// Grid-stride, one element per iteration. -DSG_T=float or double; no #include.
#ifndef SG_T
#define SG_T float
#endif
typedef SG_T T;

#define SG_GELU_C 0.7978845608028654   // sqrt(2 / pi)

__device__ __forceinline__ T act_fwd(T z, int act) {
    if (act == 1) return z < (T)0 ? (T)0 : z;          // max(z, 0), NaN kept
    if (act == 2) return (T)0.5 * z * ((T)1 + tanh((T)SG_GELU_C * (z + (T)0.044715 * z * z * z)));
    if (act == 3) return tanh(z);
    return z;
}

__device__ __forceinline__ T act_grad(T z, int act) {
    if (act == 1) return z > (T)0 ? (T)1 : (T)0;       // [z > 0]
    if (act == 2) {
        // d/dz 0.5 z (1 + tanh u), u = c (z + 0.044715 z^3)
        const T t = tanh((T)SG_GELU_C * (z + (T)0.044715 * z * z * z));
        return (T)0.5 * ((T)1 + t)
             + (T)0.5 * z * ((T)1 - t * t) * (T)SG_GELU_C * ((T)1 + (T)0.134145 * z * z);
    }
    if (act == 3) { const T t = tanh(z); return (T)1 - t * t; }
    return (T)1;
}

extern "C" __global__ void bias_act_fwd(const T* __restrict__ x, const T* __restrict__ b,
                                        T* __restrict__ out, long long n, int cols, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        out[i] = act_fwd(x[i] + b[i % cols], act);
}

extern "C" __global__ void bias_act_bwd(const T* __restrict__ g, const T* __restrict__ x,
                                        const T* __restrict__ b, T* __restrict__ gz,
                                        long long n, int cols, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        gz[i] = g[i] * act_grad(x[i] + b[i % cols], act);
}
