// Max and average pooling on NCHW images, forward and backward, with ops/nn.py's semantics:
// max pooling pads with -inf and routes the gradient to the first maximum of each window
// (row-major order, as numpy.argmax); average pooling pads with zeros that count in the mean.
// Backward kernels gather per input pixel (no atomics, deterministic). Grid-stride loops;
// -DSG_T=float or double; includes only window.cuh.
#ifndef SG_T
#define SG_T float
#endif
typedef SG_T T;

#include "window.cuh"

__device__ __forceinline__ T sg_neg_inf() { return -(T)__int_as_float(0x7f800000); }

// out = max over each window; arg (may be null) = index i*KW + j of the window's first max
extern "C" __global__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ out,
                                       int* __restrict__ arg, GEOM) {
    GRID_STRIDE(t, (long long)N * C * OH * OW) {
        const int ow = (int)(t % OW), oh = (int)((t / OW) % OH);
        const T* xp = x + (t / ((long long)OW * OH)) * H * W;
        T best = sg_neg_inf();
        int bi = 0;
        for (int i = 0; i < KH; ++i) {
            const int h = oh * SH - PH + i;
            for (int j = 0; j < KW; ++j) {
                const int w = ow * SW - PW + j;
                const T v = (h >= 0 && h < H && w >= 0 && w < W) ? xp[(long long)h * W + w]
                                                                 : sg_neg_inf();
                if (v > best || (v != v && best == best)) {
                    best = v;
                    bi = i * KW + j;
                }
            }
        }
        out[t] = best;
        if (arg) arg[t] = bi;
    }
}

// gx[pixel] = sum of gy over the windows whose first max is that pixel
extern "C" __global__ void maxpool_bwd(const T* __restrict__ gy, const int* __restrict__ arg,
                                       T* __restrict__ gx, GEOM) {
    GRID_STRIDE(t, (long long)N * C * H * W) {
        const int w = (int)(t % W), h = (int)((t / W) % H);
        const long long base = (t / ((long long)W * H)) * OH * OW;
        T acc = (T)0;
        for_windows_reading(h, w, KH, KW, SH, SW, PH, PW, OH, OW,
                            [&](int i, int j, int oh, int ow) {
            const long long o = base + (long long)oh * OW + ow;
            if (arg[o] == i * KW + j) acc += gy[o];
        });
        gx[t] = acc;
    }
}

// maxpool_bwd reading the forward's maxima (top) instead of an argmax: a window routes gy to
// the pixel whose index is the first in the window (row-major) holding its max, the first
// NaN where the max is NaN, index 0 where every element is padding (as maxpool_fwd picks)
extern "C" __global__ void maxpool_bwd_top(const T* __restrict__ gy, const T* __restrict__ x,
                                           const T* __restrict__ top, T* __restrict__ gx,
                                           GEOM) {
    GRID_STRIDE(t, (long long)N * C * H * W) {
        const int w = (int)(t % W), h = (int)((t / W) % H);
        const long long base = (t / ((long long)W * H)) * OH * OW;
        const T* xp = x + (t / ((long long)W * H)) * H * W;
        T acc = (T)0;
        for_windows_reading(h, w, KH, KW, SH, SW, PH, PW, OH, OW,
                            [&](int i, int j, int oh, int ow) {
            const long long o = base + (long long)oh * OW + ow;
            const T m = top[o];
            int first = 0;
            for (int k = 0; k < KH * KW; ++k) {
                const int hh = oh * SH - PH + k / KW, ww = ow * SW - PW + k % KW;
                const T v = (hh >= 0 && hh < H && ww >= 0 && ww < W)
                    ? xp[(long long)hh * W + ww] : sg_neg_inf();
                if (m != m ? v != v : v == m) { first = k; break; }
            }
            if (first == i * KW + j) acc += gy[o];
        });
        gx[t] = acc;
    }
}

// out[window] = y at the window's first max (the adjoint of maxpool_bwd)
extern "C" __global__ void maxpool_gather(const T* __restrict__ y, const int* __restrict__ arg,
                                          T* __restrict__ out, GEOM) {
    GRID_STRIDE(t, (long long)N * C * OH * OW) {
        const int ow = (int)(t % OW), oh = (int)((t / OW) % OH);
        const int i = arg[t] / KW, j = arg[t] % KW;
        const int h = oh * SH - PH + i, w = ow * SW - PW + j;
        out[t] = (h >= 0 && h < H && w >= 0 && w < W)
            ? y[(t / ((long long)OW * OH)) * H * W + (long long)h * W + w] : (T)0;
    }
}

// out = sum of each zero-padded window * scale (scale = 1 / (KH * KW))
extern "C" __global__ void avgpool_fwd(const T* __restrict__ x, T* __restrict__ out, GEOM,
                                       T scale) {
    GRID_STRIDE(t, (long long)N * C * OH * OW) {
        const int ow = (int)(t % OW), oh = (int)((t / OW) % OH);
        const T* xp = x + (t / ((long long)OW * OH)) * H * W;
        T acc = (T)0;
        for (int i = 0; i < KH; ++i) {
            const int h = oh * SH - PH + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < KW; ++j) {
                const int w = ow * SW - PW + j;
                if (w >= 0 && w < W) acc += xp[(long long)h * W + w];
            }
        }
        out[t] = acc * scale;
    }
}

// gx[pixel] = sum over the windows that contain it of gy * scale
extern "C" __global__ void avgpool_bwd(const T* __restrict__ gy, T* __restrict__ gx, GEOM,
                                       T scale) {
    GRID_STRIDE(t, (long long)N * C * H * W) {
        const int w = (int)(t % W), h = (int)((t / W) % H);
        const long long base = (t / ((long long)W * H)) * OH * OW;
        T acc = (T)0;
        for_windows_reading(h, w, KH, KW, SH, SW, PH, PW, OH, OW,
                            [&](int i, int j, int oh, int ow) {
            acc += gy[base + (long long)oh * OW + ow] * scale;
        });
        gx[t] = acc;
    }
}
