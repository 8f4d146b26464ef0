// The optimizers' fused CPU updates (graph.optim's eager SGD and Adam step, as torch's
// foreach/fused optimizers): every parameter and its state updated in place in one pass, the
// rule's float ops in the rule's order (each rounded to the element type, as NumPy computes
// the rule op by op), so the values are the rule's bit for bit. A call covers a list of
// tensors as one index space [0, total): the intra-op pool (runtime/pool.c) splits it into
// parts, each part running sg_<rule>_<S> over the pieces of the tensors it covers.
// Hyper-parameters h arrive as doubles (Python's floats) and are rounded to the element type
// first, as NumPy rounds a Python scalar against a float32 array.
#include <math.h>

// SGD: h = lr, weight decay, momentum, flags (1 weight decay, 2 momentum, 4 Nesterov);
// s[0] the momentum buffer
#define SG_UPDATE_KERNELS(T, S)                                                                \
static void sg_sgd_##S(void* pv, const void* gv, void** s, long long i0, long long i1,    \
                         const double* h) {                                              \
    T* p = (T*)pv;                                                                             \
    const T* g = (const T*)gv;                                                                 \
    const T lr = (T)h[0], wd = (T)h[1], mu = (T)h[2];                                          \
    const int flags = (int)h[3];                                                               \
    T* b = (T*)s[0];                                                                           \
    if (flags == 0) {                                                                          \
        for (long long i = i0; i < i1; ++i) p[i] = p[i] - lr * g[i];                           \
        return;                                                                                \
    }                                                                                          \
    for (long long i = i0; i < i1; ++i) {                                                      \
        T d = g[i];                                                                            \
        if (flags & 1) d = d + wd * p[i];                                                      \
        if (flags & 2) {                                                                       \
            T m = b[i] * mu;                                                                   \
            m = m + d;                                                                         \
            b[i] = m;                                                                          \
            d = (flags & 4) ? d + mu * m : m;                                                  \
        }                                                                                      \
        p[i] = p[i] - lr * d;                                                                  \
    }                                                                                          \
}                                                                                              \
/* Adam: h = lr, weight decay, flags (1 L2 decay, 2 decoupled decay: AdamW), b1, 1 - b1, b2,  \
   1 - b2, 1 - b1^t, 1 - b2^t, eps, lr * weight decay; s = exp_avg, exp_avg_sq */              \
static void sg_adam_##S(void* pv, const void* gv, void** s, long long i0, long long i1,    \
                         const double* h) {                                              \
    T* p = (T*)pv;                                                                             \
    const T* g = (const T*)gv;                                                                 \
    const T lr = (T)h[0], wd = (T)h[1], b1 = (T)h[3], c1m = (T)h[4], b2 = (T)h[5],             \
            c2m = (T)h[6], k1 = (T)h[7], k2 = (T)h[8], eps = (T)h[9], lrwd = (T)h[10];         \
    const int flags = (int)h[2];                                                               \
    T* ma = (T*)s[0];                                                                          \
    T* va = (T*)s[1];                                                                          \
    for (long long i = i0; i < i1; ++i) {                                                      \
        T gi = g[i], pi = p[i];                                                                \
        if (flags & 1) gi = gi + wd * pi;                                                      \
        if (flags & 2) pi = pi - lrwd * pi;                                                    \
        const T m = b1 * ma[i] + c1m * gi;                                                     \
        const T v = b2 * va[i] + c2m * (gi * gi);                                              \
        ma[i] = m;                                                                             \
        va[i] = v;                                                                             \
        const T mh = m / k1, vh = v / k2;                                                      \
        p[i] = pi - lr * mh / (sg_sqrt_##S(vh) + eps);                                         \
    }                                                                                          \
}

static inline float sg_sqrt_f32(float x) { return sqrtf(x); }
static inline double sg_sqrt_f64(double x) { return sqrt(x); }
SG_UPDATE_KERNELS(float, f32)
SG_UPDATE_KERNELS(double, f64)
