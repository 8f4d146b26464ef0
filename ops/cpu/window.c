// The window ops' CPU kernels: im2col / col2im and max pooling with its gradient, on NCHW
// images, with ops/nn.py's semantics (ops/cuda/conv.cu and pool.cu are their GPU twins).
// Each computes the planes [p0, p1) of the N*C (image, channel) planes, so the intra-op pool
// (runtime/pool.c) splits a call over threads by planes. Sums run in the order NumPy's
// reference (_spread) adds, window element (i, j) by element, so the results are its values.
// Geometry g: N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW. Written once as a macro over the
// element type T (suffix S), instantiated for float and double; runtime/pool.c runs them.
#include <stdlib.h>

// the loops over windows are vectorized (gathers); OpenMP's simd directive says it is safe
#define SG_SIMD _Pragma("omp simd")

// the geometry's sizes as locals (a kernel may leave some unused)
#define SG_GEOMETRY(g)                                                                          \
    const long long H = (g)[2], W = (g)[3], KH = (g)[4], KW = (g)[5], SH = (g)[6], SW = (g)[7], \
        PH = (g)[8], PW = (g)[9], OH = (g)[10], OW = (g)[11];                                   \
    (void)H; (void)W; (void)KH; (void)KW; (void)SH; (void)SW; (void)PH; (void)PW; (void)OH;     \
    (void)OW

#define SG_WINDOW_KERNELS(T, S)                                                                 \
/* first and one-past-last ow whose input column ow * SW - PW + j lies in [0, W) */             \
static inline void sg_cols_##S(const long long* g, long long j, long long* lo, long long* hi) { \
    const long long W = g[3], SW = g[7], PW = g[9], OW = g[11];                                 \
    long long a = PW - j > 0 ? (PW - j + SW - 1) / SW : 0;                                      \
    long long b = W - 1 + PW - j >= 0 ? (W - 1 + PW - j) / SW + 1 : 0;                          \
    *lo = a < OW ? a : OW;                                                                      \
    *hi = b < OW ? (b > *lo ? b : *lo) : OW;                                                    \
}                                                                                               \
static void sg_im2col_##S(void** p, const long long* g, long long p0, long long p1) {          \
    const T* x = (const T*)p[0]; T* cols = (T*)p[1];                                            \
    SG_GEOMETRY(g);                                                                             \
    for (long long q = p0; q < p1; ++q) {                                                       \
        const T* xq = x + q * H * W;                                                            \
        T* dst = cols + q * KH * KW * OH * OW;                                                  \
        for (long long i = 0; i < KH; ++i)                                                      \
            for (long long j = 0; j < KW; ++j, dst += OH * OW) {                                \
                long long lo, hi;                                                               \
                sg_cols_##S(g, j, &lo, &hi);                                                    \
                for (long long oh = 0; oh < OH; ++oh) {                                         \
                    T* __restrict__ row = dst + oh * OW;                                        \
                    const long long h = oh * SH - PH + i;                                       \
                    if (h < 0 || h >= H) {                                                      \
                        for (long long ow = 0; ow < OW; ++ow) row[ow] = 0;                      \
                        continue;                                                               \
                    }                                                                           \
                    const T* __restrict__ src = xq + h * W - PW + j;                            \
                    for (long long ow = 0; ow < lo; ++ow) row[ow] = 0;                          \
                    if (SW == 1)                                                                \
                        for (long long ow = lo; ow < hi; ++ow) row[ow] = src[ow];               \
                    else                                                                        \
                        for (long long ow = lo; ow < hi; ++ow) row[ow] = src[ow * SW];          \
                    for (long long ow = hi; ow < OW; ++ow) row[ow] = 0;                         \
                }                                                                               \
            }                                                                                   \
    }                                                                                           \
}                                                                                               \
static void sg_col2im_##S(void** p, const long long* g, long long p0, long long p1) {          \
    const T* cols = (const T*)p[0]; T* x = (T*)p[1];                                            \
    SG_GEOMETRY(g);                                                                             \
    for (long long q = p0; q < p1; ++q) {                                                       \
        T* xq = x + q * H * W;                                                                  \
        const T* src = cols + q * KH * KW * OH * OW;                                            \
        for (long long k = 0; k < H * W; ++k) xq[k] = 0;                                        \
        for (long long i = 0; i < KH; ++i)                                                      \
            for (long long j = 0; j < KW; ++j, src += OH * OW) {                                \
                long long lo, hi;                                                               \
                sg_cols_##S(g, j, &lo, &hi);                                                    \
                for (long long oh = 0; oh < OH; ++oh) {                                         \
                    const long long h = oh * SH - PH + i;                                       \
                    if (h < 0 || h >= H) continue;                                              \
                    T* __restrict__ dst = xq + h * W - PW + j;                                  \
                    const T* __restrict__ row = src + oh * OW;                                  \
                    if (SW == 1)                                                                \
                        SG_SIMD for (long long ow = lo; ow < hi; ++ow) dst[ow] += row[ow];      \
                    else                                                                        \
                        for (long long ow = lo; ow < hi; ++ow) dst[ow * SW] += row[ow];         \
                }                                                                               \
            }                                                                                   \
    }                                                                                           \
}                                                                                               \
/* NumPy's maximum: a NaN on either side wins */                                               \
static inline T sg_max_##S(T a, T b) { return (a > b || a != a) ? a : b; }                      \
/* where each window (oh, ow) starts in its plane, when no window reaches into the padding:    \
   then element (i, j) of every window is one gather, vectorized over the windows */          \
static int* sg_starts_##S(const long long* g) {                                                \
    SG_GEOMETRY(g);                                                                             \
    if (PH || PW || (OH - 1) * SH + KH > H || (OW - 1) * SW + KW > W || H * W > 0x7fffffffLL)   \
        return 0;                                                                               \
    int* at = (int*)malloc(sizeof(int) * (size_t)(OH * OW > 0 ? OH * OW : 1));                  \
    if (!at) return 0;                                                                          \
    for (long long oh = 0; oh < OH; ++oh)                                                       \
        for (long long ow = 0; ow < OW; ++ow) at[oh * OW + ow] = (int)(oh * SH * W + ow * SW);  \
    return at;                                                                                  \
}                                                                                               \
/* o[t] = max(o[t], xk[at[t]]) (o[t] = xk[at[t]] when first), vectorized: gathers */         \
/* not inlined: inside its caller the restrict promises were lost and the loop stayed scalar */\
__attribute__((noinline)) static void sg_max_gather_##S(                                       \
    T* __restrict__ o, const T* __restrict__ xk, const int* __restrict__ at, long long P,      \
    int first) {                                                                                \
    if (first) {                                                                                \
        SG_SIMD for (long long t = 0; t < P; ++t) o[t] = xk[at[t]];                             \
    } else {                                                                                    \
        SG_SIMD for (long long t = 0; t < P; ++t) o[t] = sg_max_##S(o[t], xk[at[t]]);          \
    }                                                                                           \
}                                                                                               \
/* first[t] = at[t] + off where no earlier element matched and xk[at[t]] is the maximum m[t]   \
   (a NaN where m[t] is NaN), vectorized: gathers */                                           \
__attribute__((noinline)) static void sg_first_max_##S(                                        \
    int* __restrict__ first, const T* __restrict__ xk, const int* __restrict__ at,             \
    const T* __restrict__ m, long long P, int off) {                                           \
    SG_SIMD for (long long t = 0; t < P; ++t) {                                                 \
        const T v = xk[at[t]], mm = m[t];                                                       \
        const int eq = (v == mm) | ((mm != mm) & (v != v));                                     \
        first[t] = (first[t] < 0) & eq ? at[t] + off : first[t];                                \
    }                                                                                           \
}                                                                                               \
static void sg_maxpool_##S(void** p, const long long* g, long long p0, long long p1) {         \
    const T* x = (const T*)p[0]; T* out = (T*)p[1];                                             \
    SG_GEOMETRY(g);                                                                             \
    const long long P = OH * OW;                                                                \
    const T ninf = -(T)__int_as_float(0x7f800000);                                              \
    int* at = sg_starts_##S(g);                                                                 \
    for (long long q = p0; q < p1; ++q) {                                                       \
        const T* xq = x + q * H * W;                                                            \
        T* __restrict__ o = out + q * P;                                                        \
        if (at) {                                                                               \
            for (long long k = 0; k < KH * KW; ++k)                                             \
                sg_max_gather_##S(o, xq + (k / KW) * W + k % KW, at, P, k == 0);                \
            continue;                                                                           \
        }                                                                                       \
        for (long long oh = 0; oh < OH; ++oh)                                                   \
            for (long long ow = 0; ow < OW; ++ow) {                                             \
                /* padding is -inf, which changes no maximum: only pixels are read */          \
                const long long h0 = oh * SH - PH, w0 = ow * SW - PW;                           \
                const long long i0 = h0 < 0 ? -h0 : 0, i1 = H - h0 < KH ? H - h0 : KH;          \
                const long long j0 = w0 < 0 ? -w0 : 0, j1 = W - w0 < KW ? W - w0 : KW;          \
                T best = ninf;                                                                  \
                for (long long i = i0; i < i1; ++i)                                             \
                    for (long long j = j0; j < j1; ++j)                                         \
                        best = sg_max_##S(best, xq[(h0 + i) * W + w0 + j]);                     \
                o[oh * OW + ow] = best;                                                         \
            }                                                                                   \
    }                                                                                           \
    free(at);                                                                                   \
}                                                                                               \
/* disjoint windows, no padding: each pixel is in one window at most, so it takes gy or 0;    \
   each window's first maximum is found by gathers over the windows, element by element */    \
static void sg_maxpool_grad_disjoint_##S(const T* gy, const T* x, const T* top, T* gx,         \
                                         const long long* g, long long p0, long long p1,        \
                                         const int* at) {                                       \
    const long long H = g[2], W = g[3], KH = g[4], KW = g[5], OH = g[10], OW = g[11],           \
        P = OH * OW;                                                                            \
    int* __restrict__ first = (int*)malloc(sizeof(int) * (size_t)(P > 0 ? P : 1));              \
    for (long long q = p0; q < p1; ++q) {                                                       \
        const T* xq = x + q * H * W; const T* m = top + q * P; const T* gq = gy + q * P;        \
        T* oq = gx + q * H * W;                                                                 \
        for (long long k = 0; k < H * W; ++k) oq[k] = 0;                                        \
        for (long long t = 0; t < P; ++t) first[t] = -1;                                        \
        for (long long k = 0; k < KH * KW; ++k) {                                               \
            const int off = (int)((k / KW) * W + k % KW);                                       \
            sg_first_max_##S(first, xq + off, at, m, P, off);                                   \
        }                                                                                       \
        for (long long t = 0; t < P; ++t)                                                       \
            if (first[t] >= 0) oq[first[t]] = gq[t];                                            \
    }                                                                                           \
    free(first);                                                                                \
}                                                                                               \
/* gx = the sum, window element (i, j) by element, of gy over the windows whose first        \
   maximum (row-major; the first NaN where the maximum, top, is NaN) is that pixel */          \
static void sg_maxpool_grad_##S(void** p, const long long* g, long long p0, long long p1) {    \
    const T* gy = (const T*)p[0]; const T* x = (const T*)p[1]; const T* top = (const T*)p[2];  \
    T* gx = (T*)p[3];                                                                           \
    if (g[6] >= g[4] && g[7] >= g[5]) {                                                         \
        int* at = sg_starts_##S(g);                                                             \
        if (at) {                                                                               \
            sg_maxpool_grad_disjoint_##S(gy, x, top, gx, g, p0, p1, at);                        \
            free(at);                                                                           \
            return;                                                                             \
        }                                                                                       \
    }                                                                                           \
    SG_GEOMETRY(g);                                                                             \
    const T ninf = -(T)__int_as_float(0x7f800000);                                              \
    int* first = (int*)malloc(sizeof(int) * (size_t)(OH * OW > 0 ? OH * OW : 1));               \
    for (long long q = p0; q < p1; ++q) {                                                       \
        const T* xq = x + q * H * W; const T* tq = top + q * OH * OW;                           \
        const T* gq = gy + q * OH * OW; T* oq = gx + q * H * W;                                 \
        for (long long k = 0; k < H * W; ++k) oq[k] = 0;                                        \
        for (long long oh = 0; oh < OH; ++oh)                                                   \
            for (long long ow = 0; ow < OW; ++ow) {                                             \
                const T m = tq[oh * OW + ow];                                                   \
                int f = -1;                                                                     \
                for (long long k = 0; k < KH * KW; ++k) {                                       \
                    const long long h = oh * SH - PH + k / KW, w = ow * SW - PW + k % KW;       \
                    const T v = (h >= 0 && h < H && w >= 0 && w < W) ? xq[h * W + w] : ninf;    \
                    if (m != m ? v != v : v == m) { f = (int)k; break; }                        \
                }                                                                               \
                first[oh * OW + ow] = f;                                                        \
            }                                                                                   \
        for (long long i = 0; i < KH; ++i)                                                      \
            for (long long j = 0; j < KW; ++j)                                                  \
                for (long long oh = 0; oh < OH; ++oh) {                                         \
                    const long long h = oh * SH - PH + i;                                       \
                    if (h < 0 || h >= H) continue;                                              \
                    for (long long ow = 0; ow < OW; ++ow) {                                     \
                        const long long w = ow * SW - PW + j;                                   \
                        if (w >= 0 && w < W && first[oh * OW + ow] == i * KW + j)               \
                            oq[h * W + w] += gq[oh * OW + ow];                                  \
                    }                                                                           \
                }                                                                               \
    }                                                                                           \
    free(first);                                                                                \
}

SG_WINDOW_KERNELS(float, f32)
SG_WINDOW_KERNELS(double, f64)
