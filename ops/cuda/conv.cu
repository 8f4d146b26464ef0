// im2col and its adjoint col2im for conv2d on NCHW images. cols has the layout
// (N, C, KH, KW, OH, OW) that ops/nn.py's im2col gives: reshaped to (N, C*KH*KW, OH*OW) it is
// the right operand of one batched matmul. col2im gathers (one thread per image pixel, summing
// the window elements that read it in (i, j) order), so it needs no atomics and is
// deterministic. Grid-stride loops; -DSG_T=float or double; includes only window.cuh.
#ifndef SG_T
#define SG_T float
#endif
typedef SG_T T;

#include "window.cuh"

extern "C" __global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, GEOM) {
    const long long total = (long long)N * C * KH * KW * OH * OW;
    GRID_STRIDE(t, total) {
        long long r = t;
        const int ow = (int)(r % OW); r /= OW;
        const int oh = (int)(r % OH); r /= OH;
        const int j = (int)(r % KW); r /= KW;
        const int i = (int)(r % KH); r /= KH;
        const int c = (int)(r % C); r /= C;
        const int n = (int)r;
        const int h = oh * SH - PH + i, w = ow * SW - PW + j;
        T v = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) v = x[(((long long)n * C + c) * H + h) * W + w];
        cols[t] = v;
    }
}

extern "C" __global__ void col2im(const T* __restrict__ cols, T* __restrict__ x, GEOM) {
    const long long total = (long long)N * C * H * W;
    GRID_STRIDE(t, total) {
        long long r = t;
        const int w = (int)(r % W); r /= W;
        const int h = (int)(r % H); r /= H;
        const int c = (int)(r % C); r /= C;
        const int n = (int)r;
        const T* cw = cols + ((long long)n * C + c) * KH * KW * OH * OW;
        T acc = (T)0;
        for_windows_reading(h, w, KH, KW, SH, SW, PH, PW, OH, OW,
                            [&](int i, int j, int oh, int ow) {
            acc += cw[((long long)(i * KW + j) * OH + oh) * OW + ow];
        });
        x[t] = acc;
    }
}
