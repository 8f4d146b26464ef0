// What conv.cu and pool.cu share: the geometry of a 2-d window over NCHW images, the
// grid-stride loop, and the window's inversion (for an input pixel, the output windows that
// read it), which col2im and the pooling backward kernels gather over. Included with
// #include "window.cuh"; ops/gpu.py's source() pastes it in, so NVRTC needs no include path
// and CuPy's kernel cache, keyed on the source text, sees every change to it.
#ifndef SG_WINDOW_CUH
#define SG_WINDOW_CUH

// the geometry every kernel takes, as plain int arguments
#define GEOM int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, \
             int OH, int OW

#define GRID_STRIDE(t, total) \
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < (total); \
         t += (long long)blockDim.x * gridDim.x)

// Calls f(i, j, oh, ow) for each output window (oh, ow) whose element (i, j) is the input
// pixel (h, w), i.e. oh * SH - PH + i == h and ow * SW - PW + j == w, in row-major (i, j)
// order: the order the gather kernels sum in (and ops/nn.py's _spread), so sums are
// deterministic and equal to the reference's where no multiply-add is contracted.
template <class F>
__device__ __forceinline__ void for_windows_reading(int h, int w, int KH, int KW, int SH, int SW,
                                                    int PH, int PW, int OH, int OW, F f) {
    for (int i = 0; i < KH; ++i) {
        const int hp = h + PH - i;
        if (hp < 0 || hp % SH) continue;
        const int oh = hp / SH;
        if (oh >= OH) continue;
        for (int j = 0; j < KW; ++j) {
            const int wp = w + PW - j;
            if (wp < 0 || wp % SW) continue;
            const int ow = wp / SW;
            if (ow >= OW) continue;
            f(i, j, oh, ow);
        }
    }
}

#endif
