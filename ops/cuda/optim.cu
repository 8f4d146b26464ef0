// Optimizer updates, in place, with graph/optim.py's rules: SGD (weight decay, momentum,
// Nesterov; dampening 0) and Adam / AdamW. One element's update is a __device__ function the
// kernels share: sgd_update / adam_update over one flat buffer of length n, and the
// multi-tensor kernels ops/gpu.py generates (multi_tensor_source: a list of tensors whose
// pointers and lengths are kernel arguments, one launch for them all, as apex's
// multi_tensor_apply). Grid-stride; -DSG_T=float or double; no #include.
#ifndef SG_T
#define SG_T float
#endif
typedef SG_T T;

// d = g + wd p; with momentum: b = mu b + d, d = nesterov ? d + mu b : b;  p -= lr d
__device__ __forceinline__ void sgd_elem(T* __restrict__ p, const T* __restrict__ g,
                                         T* __restrict__ buf, long long i, T lr, T mu, T wd,
                                         int nesterov) {
    T d = wd != (T)0 ? g[i] + wd * p[i] : g[i];
    if (mu != (T)0) {
        const T b = mu * buf[i] + d;
        buf[i] = b;
        d = nesterov ? d + mu * b : b;
    }
    p[i] = p[i] - lr * d;
}

// Adam: g += wd p (decoupled = 0) or p -= lr wd p (AdamW); m = b1 m + (1-b1) g;
// v = b2 v + (1-b2) g^2; p -= lr (m / bc1) / (sqrt(v / bc2) + eps), bc = 1 - beta^t
__device__ __forceinline__ void adam_elem(T* __restrict__ p, const T* __restrict__ g,
                                          T* __restrict__ m, T* __restrict__ v, long long i,
                                          T lr, T b1, T b2, T eps, T wd, T bc1, T bc2,
                                          int decoupled) {
    T gi = g[i], pi = p[i];
    if (wd != (T)0) {
        if (decoupled) pi = pi - lr * wd * pi;
        else gi = gi + wd * pi;
    }
    const T mi = b1 * m[i] + ((T)1 - b1) * gi;
    const T vi = b2 * v[i] + ((T)1 - b2) * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - lr * (mi / bc1) / (sqrt(vi / bc2) + eps);
}

extern "C" __global__ void sgd_update(T* __restrict__ p, const T* __restrict__ g,
                                      T* __restrict__ buf, long long n, T lr, T mu, T wd,
                                      int nesterov) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        sgd_elem(p, g, buf, i, lr, mu, wd, nesterov);
}

extern "C" __global__ void adam_update(T* __restrict__ p, const T* __restrict__ g,
                                       T* __restrict__ m, T* __restrict__ v, long long n, T lr,
                                       T b1, T b2, T eps, T wd, T bc1, T bc2, int decoupled) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        adam_elem(p, g, m, v, i, lr, b1, b2, eps, wd, bc1, bc2, decoupled);
}
