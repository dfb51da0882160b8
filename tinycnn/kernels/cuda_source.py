"""The CUDA source of every kernel the GPU set launches, as plain text: no CuPy needed to read it.

One translation unit per (dtype, index width): `module_source(dtype, wide)` prefixes the kernels
with `typedef float T` (or double) and `typedef int I` (or long long, from gpu.WIDE elements on:
2**31 less the largest grid, so that a grid-stride index never overflows). The GPU set compiles it with CuPy's RawModule and NVRTC_OPTIONS; the tests
compile the very same text with NVRTC for sm_80 and sm_90 (tests/test_cuda_compile.py) and with
the host C++ compiler, playing every thread of a small grid on the CPU (tests/cuda_shim.py).

Rules that keep all three possible:
- every kernel is `extern "C"` (no name mangling, no templates) and includes no header;
- every kernel is a grid-stride loop over its n work items, so its result does not depend on the
  grid it is launched with (the shim launches a deliberately small one);
- no shared memory, no __syncthreads, no atomics on data: each work item *gathers* what it needs,
  so the results are deterministic and independent of thread order. A column reduction
  (BatchNorm's sums, a convolution's kernel gradient) is one launch: a fixed number of partial
  sums per column (set by the shapes alone), and the work item that finishes a column's last
  partial sum (an atomic count of arrivals per column, the one atomic here) adds that column's
  partials up in part order, so the sum's order does not depend on which thread finishes last;
- a value that a static step computes on the device (a dropout key, the learning rate) comes as
  a pointer, or, in an eager step, by value with the pointer null (no fill launch for it);
- --fmad=false: no fused multiply-adds, so a kernel rounds on the GPU exactly as the same source
  played on the CPU (tests/cuda_shim.py), except for float32 subnormals: CuPy's RawModule
  appends -ftz=true after our options (CuPy 14.2, cupy/cuda/compiler.py; its own kernels are
  compiled so too), which flushes them to zero. Against the numba CPU kernels the results agree
  to round-off, not to the bit: sums run in another order, and the CPU's BatchNorm backward keeps
  the masked gradient in float64.
"""
import numpy as np

NVRTC_OPTIONS = ("--fmad=false",)
# What CuPy's RawModule adds to NVRTC_OPTIONS, besides -arch=sm_XX (and --pch, which changes no
# code): the NVRTC test compiles with these too, so it sees what the GPU backend compiles.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

# Each work item i runs in a grid-stride loop; I is the index type (see module_source).
_PRELUDE = r"""
#define TINYCNN_FOR_EACH(i, n) \
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (I)blockDim.x * gridDim.x)

// For input pixel (y, x): each offset (a, d) of a kh x kw window at stride (sh, sw) whose output
// (oy, ox) covers it, in (a, d) order; the statement after it runs once per such window. What
// col2im, the convolution's input gradient and max-pool's gradient gather over.
#define TINYCNN_FOR_EACH_COVERING_WINDOW(a, d, oy, ox, y, x, kh, kw, sh, sw, top, left, oh, ow)              \
    for (int a = 0, oy = 0; a < (kh); ++a)                                                                  \
        if ((oy = (y) + (top) - a) >= 0 && oy % (sh) == 0 && (oy /= (sh)) < (oh))                            \
            for (int d = 0, ox = 0; d < (kw); ++d)                                                          \
                if ((ox = (x) + (left) - d) >= 0 && ox % (sw) == 0 && (ox /= (sw)) < (ow))

// Element i of an NHWC tensor of (h, w, c) images: declares its image b, row y, column x, channel ch.
#define TINYCNN_NHWC_POSITION(i, h, w, c, b, y, x, ch)                                                    \
    const int ch = (int)((i) % (c)), x = (int)(((i) / (c)) % (w)), y = (int)(((i) / ((I)(c) * (w))) % (h)); \
    const I b = (i) / ((I)(c) * (w) * (h))

__device__ __forceinline__ int tinycnn_max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int tinycnn_min(int a, int b) { return a < b ? a : b; }

// A column reduction's last arrival: after work item (part, ch) has written its partial sums,
// true in exactly one of the column's `parts` work items, the last to arrive, which then sees
// every partial of the column (the fences) and resets the column's count for the next launch.
__device__ __forceinline__ bool tinycnn_last_arrival(unsigned int* arrivals, int ch, int parts) {
    __threadfence();
    if (atomicAdd(&arrivals[ch], 1u) != (unsigned int)(parts - 1)) return false;
    __threadfence();
    arrivals[ch] = 0u;
    return true;
}

// Column ch's totals of the (parts, 2c) partials, in part order (__ldcg: from L2, past this SM's L1,
// where the other blocks' partials are), into totals [sum1 (c), sum2 (c), m].
__device__ __forceinline__ void tinycnn_column_totals(const double* partials, double* totals, int ch, int c,
                                                      int parts, double m, double* s1, double* s2) {
    double a = 0.0, b = 0.0;
    for (int p = 0; p < parts; ++p) {
        a += __ldcg(partials + (long long)p * 2 * c + ch);
        b += __ldcg(partials + (long long)p * 2 * c + c + ch);
    }
    totals[ch] = a;
    totals[c + ch] = b;
    if (ch == 0) totals[2 * c] = m;
    *s1 = a;
    *s2 = b;
}

// BatchNorm's moments of column ch from the float64 sums of x - shift and its square over count rows,
// and (moving_mean not null) the moving statistics' update with them, as tinycnn_bn_moving_update.
__device__ __forceinline__ void tinycnn_moments(int ch, double s1, double s2, double count, double shift, double eps,
                                                T* mean, T* var, T* inv_std, T* moving_mean, T* moving_var,
                                                T momentum, T complement) {
    const double d = s1 / count;
    const double v = s2 / count - d * d;
    const double var64 = v > 0.0 ? v : 0.0;
    const T mean_t = (T)(shift + d), var_t = (T)var64;
    mean[ch] = mean_t;
    var[ch] = var_t;
    inv_std[ch] = (T)(1.0 / sqrt(var64 + eps));
    if (moving_mean) {
        moving_mean[ch] = moving_mean[ch] * momentum + complement * mean_t;
        moving_var[ch] = moving_var[ch] * momentum + complement * var_t;
    }
}

// BatchNorm's input element e: x[e], or with `relu` max(x[e], 0) as np.maximum gives it (NaN stays
// NaN, -0.0 stays -0.0): a ReLU before the BatchNorm read as the BatchNorm reads, no pass of its own.
__device__ __forceinline__ T tinycnn_bn_input(const T* x, long long e, int relu) {
    const T v = x[e];
    return (!relu || v >= (T)0 || v != v) ? v : (T)0;
}

// The index of v's largest entry as argmax gives it: the first maximum, or the first NaN.
__device__ __forceinline__ int tinycnn_argmax(const T* v, int n) {
    int best = 0;
    T top = v[0];
    if (top != top) return 0;
    for (int j = 1; j < n; ++j) {
        const T x = v[j];
        if (x != x) return j;
        if (x > top) { top = x; best = j; }
    }
    return best;
}

// Dropout's counter-based hash, as tinycnn.randomness.lowbias32 on the 64-bit element index:
// element `index` is kept when hash(index ^ key) >> 8 >= threshold.
__device__ __forceinline__ bool tinycnn_keep(unsigned long long index, unsigned int key, unsigned int threshold) {
    unsigned long long h = index ^ key;
    h ^= h >> 16; h = (h * 0x7FEB352Dull) & 0xFFFFFFFFull; h ^= h >> 15;
    h = (h * 0x846CA68Bull) & 0xFFFFFFFFull; h ^= h >> 16;
    return (h >> 8) >= threshold;
}
"""

# name -> source. Images are NHWC; pads are given as (top, left); see reference.py for the math.
KERNELS = {
    "tinycnn_im2col": r"""
extern "C" __global__ void tinycnn_im2col(const T* x, T* cols, I n, int h, int w, int c, int kh, int kw,
                                          int sh, int sw, int top, int left, int oh, int ow) {
    const I k = (I)kh * kw * c;
    TINYCNN_FOR_EACH(i, n) {
        const I row = i / k;
        const int j = (int)(i % k);
        const int ch = j % c, d = (j / c) % kw, a = j / (c * kw);
        const int ox = (int)(row % ow), oy = (int)((row / ow) % oh);
        const I b = row / ((I)ow * oh);
        const int y = oy * sh + a - top, xx = ox * sw + d - left;
        cols[i] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((b * h + y) * w + xx) * c + ch] : (T)0;
    }
}
""",
    "tinycnn_col2im": r"""
extern "C" __global__ void tinycnn_col2im(const T* cols, T* dx, I n, int h, int w, int c, int kh, int kw,
                                          int sh, int sw, int top, int left, int oh, int ow) {
    TINYCNN_FOR_EACH(i, n) {
        TINYCNN_NHWC_POSITION(i, h, w, c, b, y, xx, ch);
        T total = 0;
        TINYCNN_FOR_EACH_COVERING_WINDOW(a, d, oy, ox, y, xx, kh, kw, sh, sw, top, left, oh, ow)
            total += cols[((b * oh + oy) * ow + ox) * ((I)kh * kw * c) + (a * kw + d) * c + ch];
        dx[i] = total;
    }
}
""",
    # A convolution in one launch: z[row, q] sums x * kernel2d[(a, d, ch), q] over the window's
    # positions inside the image, in (a, d, ch) order (im2col's column order; the padding adds
    # nothing): no (N*OH*OW, K) window columns written and read back by a GEMM.
    "tinycnn_conv_forward": r"""
extern "C" __global__ void tinycnn_conv_forward(const T* x, const T* kernel2d, T* z, I n, int h, int w, int c,
                                                int kh, int kw, int sh, int sw, int top, int left, int oh, int ow,
                                                int f) {
    TINYCNN_FOR_EACH(i, n) {
        const int q = (int)(i % f);
        const I row = i / f;
        const int ox = (int)(row % ow), oy = (int)((row / ow) % oh);
        const I b = row / ((I)ow * oh);
        T total = 0;
        for (int a = 0; a < kh; ++a) {
            const int y = oy * sh + a - top;
            if (y < 0 || y >= h) continue;
            for (int d = 0; d < kw; ++d) {
                const int xx = ox * sw + d - left;
                if (xx < 0 || xx >= w) continue;
                const T* p = x + ((b * h + y) * w + xx) * (I)c;
                const T* k = kernel2d + (I)(a * kw + d) * c * f + q;
                for (int ch = 0; ch < c; ++ch) total += p[ch] * k[(I)ch * f];
            }
        }
        z[i] = total;
    }
}
""",
    # A convolution's kernel gradient dk[k, q], k = (a, d, ch): the sum over rows of the window
    # column im2col would write, gathered from x, times dz[row, q]. `parts` partial sums per (k, q),
    # over rows part, part + parts, ...; the work item that finishes a column's last one adds them
    # up in part order (as BatchNorm's sums: the result does not depend on which finishes last).
    "tinycnn_conv_filter_grad": r"""
extern "C" __global__ void tinycnn_conv_filter_grad(const T* x, const T* dz, T* partials, T* dk,
                                                    unsigned int* arrivals, I m, int h, int w, int c, int kh, int kw,
                                                    int sh, int sw, int top, int left, int oh, int ow, int f,
                                                    int parts) {
    const int kf = kh * kw * c * f;
    TINYCNN_FOR_EACH(j, (I)parts * kf) {
        const int col = (int)(j % kf), part = (int)(j / kf);
        const int q = col % f, k = col / f;
        const int ch = k % c, d = (k / c) % kw, a = k / (c * kw);
        T s = 0;
        for (I r = part; r < m; r += parts) {
            const int ox = (int)(r % ow), oy = (int)((r / ow) % oh);
            const int y = oy * sh + a - top, xx = ox * sw + d - left;
            if (y < 0 || y >= h || xx < 0 || xx >= w) continue;
            const I b = r / ((I)ow * oh);
            s += x[((b * h + y) * w + xx) * c + ch] * dz[r * f + q];
        }
        partials[(I)part * kf + col] = s;
        if (!tinycnn_last_arrival(arrivals, col, parts)) continue;
        T total = 0;
        for (int p = 0; p < parts; ++p) total += __ldcg(partials + (I)p * kf + col);
        dk[col] = total;
    }
}
""",
    # A convolution's input gradient in one launch: col2im's gather, with each window column it
    # reads, (dz @ kernel2d.T)[row, (a, d, ch)], computed in place over the F filters (f in order),
    # instead of a GEMM that writes the (N*OH*OW, K) columns and a col2im that reads them back.
    "tinycnn_conv_input_grad": r"""
extern "C" __global__ void tinycnn_conv_input_grad(const T* dz, const T* kernel2d, T* dx, I n, int h, int w, int c,
                                                   int kh, int kw, int sh, int sw, int top, int left, int oh,
                                                   int ow, int f) {
    TINYCNN_FOR_EACH(i, n) {
        TINYCNN_NHWC_POSITION(i, h, w, c, b, y, xx, ch);
        T total = 0;
        TINYCNN_FOR_EACH_COVERING_WINDOW(a, d, oy, ox, y, xx, kh, kw, sh, sw, top, left, oh, ow) {
            const T* g = dz + ((b * oh + oy) * ow + ox) * (I)f;
            const T* k = kernel2d + (I)((a * kw + d) * c + ch) * f;
            T column = 0;
            for (int q = 0; q < f; ++q) column += g[q] * k[q];
            total += column;
        }
        dx[i] = total;
    }
}
""",
    # Windows are clipped to the image, so 'same' padding never wins a maximum (as the reference's -inf).
    "tinycnn_maxpool_forward": r"""
extern "C" __global__ void tinycnn_maxpool_forward(const T* x, T* y, int* argmax, I n, int h, int w, int c,
                                                   int ph, int pw, int sh, int sw, int top, int left,
                                                   int oh, int ow) {
    TINYCNN_FOR_EACH(i, n) {
        TINYCNN_NHWC_POSITION(i, oh, ow, c, b, oy, ox, ch);
        const int y0 = oy * sh - top, x0 = ox * sw - left;
        const int a0 = tinycnn_max(0, -y0), a1 = tinycnn_min(ph, h - y0);
        const int d0 = tinycnn_max(0, -x0), d1 = tinycnn_min(pw, w - x0);
        T best = x[((b * h + y0 + a0) * w + x0 + d0) * c + ch];
        int k = a0 * pw + d0;
        for (int a = a0; a < a1; ++a)
            for (int d = d0; d < d1; ++d) {
                const T v = x[((b * h + y0 + a) * w + x0 + d) * c + ch];
                if (v > best) { best = v; k = a * pw + d; }
            }
        y[i] = best;
        argmax[i] = k;
    }
}
""",
    "tinycnn_maxpool_backward": r"""
extern "C" __global__ void tinycnn_maxpool_backward(const T* dy, const int* argmax, T* dx, I n, int h, int w,
                                                    int c, int ph, int pw, int sh, int sw, int top, int left,
                                                    int oh, int ow) {
    TINYCNN_FOR_EACH(i, n) {
        TINYCNN_NHWC_POSITION(i, h, w, c, b, y, xx, ch);
        T total = 0;
        TINYCNN_FOR_EACH_COVERING_WINDOW(a, d, oy, ox, y, xx, ph, pw, sh, sw, top, left, oh, ow) {
            const I o = ((b * oh + oy) * ow + ox) * c + ch;
            if (argmax[o] == a * pw + d) total += dy[o];
        }
        dx[i] = total;
    }
}
""",
    # The mean over an image's hw pixels of one channel, summed in double in pixel order, one (image,
    # channel) per work item; and its gradient, dy / hw at each pixel (the reference's division).
    "tinycnn_global_avgpool_forward": r"""
extern "C" __global__ void tinycnn_global_avgpool_forward(const T* x, T* y, I n, int hw, int c) {
    TINYCNN_FOR_EACH(i, n) {
        const T* p = x + (i / c) * hw * c + i % c;
        double total = 0.0;
        for (int k = 0; k < hw; ++k) total += (double)p[(I)k * c];
        y[i] = (T)(total / hw);
    }
}
""",
    "tinycnn_global_avgpool_backward": r"""
extern "C" __global__ void tinycnn_global_avgpool_backward(const T* dy, T* dx, I n, int hw, int c) {
    TINYCNN_FOR_EACH(i, n) dx[i] = dy[i / ((I)hw * c) * c + i % c] / (T)hw;
}
""",
    "tinycnn_dropout_forward": r"""
extern "C" __global__ void tinycnn_dropout_forward(const T* x, T* y, unsigned char* keep, I n,
                                                   const unsigned int* key, unsigned int key_value,
                                                   unsigned int threshold, T scale, unsigned long long offset) {
    const unsigned int mask_key = key ? *key : key_value;
    TINYCNN_FOR_EACH(i, n) {
        const bool k = tinycnn_keep((unsigned long long)i + offset, mask_key, threshold);
        keep[i] = k;
        y[i] = k ? x[i] * scale : (T)0;
    }
}
""",
    "tinycnn_dropout_backward": r"""
extern "C" __global__ void tinycnn_dropout_backward(const T* dy, const unsigned char* keep, T* dx, I n, T scale) {
    TINYCNN_FOR_EACH(i, n) dx[i] = keep[i] ? dy[i] * scale : (T)0;
}
""",
    # moving = moving * momentum + batch * (1 - momentum), in the reference's order (the complement
    # comes from the host in float64, then rounded to T, as NumPy rounds a Python float).
    "tinycnn_bn_moving_update": r"""
extern "C" __global__ void tinycnn_bn_moving_update(T* moving_mean, T* moving_var, const T* mean, const T* var, I n,
                                                    T momentum, T complement) {
    TINYCNN_FOR_EACH(ch, n) {
        moving_mean[ch] = moving_mean[ch] * momentum + complement * mean[ch];
        moving_var[ch] = moving_var[ch] * momentum + complement * var[ch];
    }
}
""",
    # ReLU's gradient given its output: dy where y > 0, else 0 (NaN in y passes nothing, as y > 0 is false).
    "tinycnn_relu_backward": r"""
extern "C" __global__ void tinycnn_relu_backward(const T* dy, const T* y, T* dx, I n) {
    TINYCNN_FOR_EACH(i, n) dx[i] = y[i] > (T)0 ? dy[i] : (T)0;
}
""",
    # Softmax and cross-entropy from logits, one row per work item (the reference's operations in
    # its order, except that its sums over a row are pairwise): probs, the per-row loss (log-
    # probabilities clipped to [lo, hi] when `clip`), and its gradient probs - targets.
    "tinycnn_softmax_ce": r"""
extern "C" __global__ void tinycnn_softmax_ce(const T* logits, const T* targets, T* probs, T* loss, T* grad, I rows,
                                              int classes, int clip, T lo, T hi, T scale, T* loss_sum,
                                              unsigned int* arrivals) {
    TINYCNN_FOR_EACH(r, rows) {
        const T* z = logits + r * classes;
        const T* t = targets + r * classes;
        T top = z[0];
        for (int j = 1; j < classes; ++j) top = z[j] > top ? z[j] : top;
        T total = 0;
        for (int j = 0; j < classes; ++j) total += exp(z[j] - top);
        const T log_total = log(total);
        T sum = 0;
        for (int j = 0; j < classes; ++j) {
            const T shifted = z[j] - top;
            const T p = exp(shifted) / total;
            T log_p = shifted - log_total;
            if (clip) log_p = log_p < lo ? lo : (log_p > hi ? hi : log_p);
            sum += t[j] * log_p;
            probs[r * classes + j] = p;
            grad[r * classes + j] = (p - t[j]) * scale;
        }
        loss[r] = -sum;
        if (loss_sum && tinycnn_last_arrival(arrivals, 0, (int)rows)) {
            double total = 0.0;
            for (I k = 0; k < rows; ++k) total += (double)__ldcg(loss + k);
            *loss_sum = (T)total;
        }
    }
}
""",
    # The categorical accuracy's count: rows whose prediction's argmax is the target's (first maxima, NaN
    # largest, as argmax), each row's hit counted by the last row to finish and added into *total (an
    # epoch's running count, or a fresh zero).
    "tinycnn_categorical_matches": r"""
extern "C" __global__ void tinycnn_categorical_matches(const T* predictions, const T* targets, unsigned char* hits,
                                                       I rows, int classes, long long* total,
                                                       unsigned int* arrivals) {
    TINYCNN_FOR_EACH(r, rows) {
        hits[r] = tinycnn_argmax(predictions + r * classes, classes) == tinycnn_argmax(targets + r * classes, classes);
        if (tinycnn_last_arrival(arrivals, 0, (int)rows)) {
            long long count = 0;
            for (I k = 0; k < rows; ++k) count += __ldcg(hits + k);
            *total += count;
        }
    }
}
""",
    # A static step's mask keys: key[k] = dropout_key(call_seed(bases[k], offsets[k] + step * calls[k]))
    # (tinycnn.randomness: splitmix64, then lowbias32 of the low half xor the high half).
    "tinycnn_dropout_keys": r"""
extern "C" __global__ void tinycnn_dropout_keys(const unsigned long long* bases, const unsigned long long* offsets,
                                                const unsigned long long* calls, const unsigned long long* step,
                                                unsigned int* keys, I n) {
    TINYCNN_FOR_EACH(k, n) {
        unsigned long long z = bases[k] + (offsets[k] + step[0] * calls[k] + 1ull) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        const unsigned long long seed = (z ^ (z >> 31)) >> 1;
        unsigned long long h = seed & 0xFFFFFFFFull;
        h ^= h >> 16; h = (h * 0x7FEB352Dull) & 0xFFFFFFFFull; h ^= h >> 15;
        h = (h * 0x846CA68Bull) & 0xFFFFFFFFull; h ^= h >> 16;
        keys[k] = (unsigned int)(h ^ (seed >> 32));
    }
}
""",
    # The complements 1 - beta come from the host (float64, then rounded to T), as the reference's:
    # computed on the device from a float32 beta, 1 - 0.9 was 0.100000024 and the backends drifted.
    "tinycnn_adam": r"""
extern "C" __global__ void tinycnn_adam(T* p, T* m, T* v, const T* g, I n, const double* lr, double lr_value,
                                        T one_minus_beta_1, T one_minus_beta_2, T eps) {
    const T lr_t = (T)(lr ? *lr : lr_value);
    TINYCNN_FOR_EACH(i, n) {
        const T gi = g[i];
        const T mi = m[i] + (gi - m[i]) * one_minus_beta_1;
        const T vi = v[i] + (gi * gi - v[i]) * one_minus_beta_2;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr_t * mi / (sqrt(vi) + eps);
    }
}
""",
    # BatchNormalization over the rows of an (M, C) array, as the CPU set's: float64 sums of x - shift
    # and its square (shift: the first row, or 0 when ranks add their sums up), `parts` partial sums
    # per column (work item j = part * C + column sums rows part, part + parts, ...); each column's
    # last arrival writes its totals [sum1, sum2, m] (the layout a data-parallel reduce sums over
    # ranks) and, when `finish` (no reduce), the moments and (moving_mean not null) the moving statistics.
    "tinycnn_bn_forward_partials": r"""
extern "C" __global__ void tinycnn_bn_forward_partials(const T* x, int relu, int shifted, double* partials, I m,
                                                       int c, int parts, unsigned int* arrivals, double* totals,
                                                       int finish, T* mean, T* var, T* inv_std, double eps,
                                                       T* moving_mean, T* moving_var, T momentum, T complement) {
    TINYCNN_FOR_EACH(j, (I)parts * c) {
        const int ch = (int)(j % c), part = (int)(j / c);
        const double shift = shifted ? (double)tinycnn_bn_input(x, ch, relu) : 0.0;
        double s1 = 0.0, s2 = 0.0;
        for (I r = part; r < m; r += parts) {
            const double v = (double)tinycnn_bn_input(x, r * c + ch, relu) - shift;
            s1 += v;
            s2 += v * v;
        }
        partials[(I)part * 2 * c + ch] = s1;
        partials[(I)part * 2 * c + c + ch] = s2;
        if (!tinycnn_last_arrival(arrivals, ch, parts)) continue;
        tinycnn_column_totals(partials, totals, ch, c, parts, (double)m, &s1, &s2);
        if (finish)
            tinycnn_moments(ch, s1, s2, (double)m, shift, eps, mean, var, inv_std, moving_mean, moving_var, momentum,
                            complement);
    }
}
""",
    # Backward's sums: g (dy after the dropout mask) and g * xhat, xhat = (x - mean) * inv_std in T;
    # each column's last arrival writes its totals [sum1, sum2, m] and, rounded to T, dbeta = sum1
    # and dgamma = sum2 (this rank's).
    "tinycnn_bn_backward_partials": r"""
extern "C" __global__ void tinycnn_bn_backward_partials(const T* dy, const T* x, int relu, const T* mean,
                                                        const T* inv_std, const unsigned char* keep, T scale,
                                                        int use_mask,
                                                        double* partials, I m, int c, int parts,
                                                        unsigned int* arrivals, double* totals, T* dbeta, T* dgamma) {
    TINYCNN_FOR_EACH(j, (I)parts * c) {
        const int ch = (int)(j % c), part = (int)(j / c);
        double s1 = 0.0, s2 = 0.0;
        for (I r = part; r < m; r += parts) {
            const I e = r * c + ch;
            T g = dy[e];
            if (use_mask) g = keep[e] ? g * scale : (T)0;
            const T xhat = (tinycnn_bn_input(x, e, relu) - mean[ch]) * inv_std[ch];
            s1 += (double)g;
            s2 += (double)(g * xhat);
        }
        partials[(I)part * 2 * c + ch] = s1;
        partials[(I)part * 2 * c + c + ch] = s2;
        if (!tinycnn_last_arrival(arrivals, ch, parts)) continue;
        tinycnn_column_totals(partials, totals, ch, c, parts, (double)m, &s1, &s2);
        dbeta[ch] = (T)s1;
        dgamma[ch] = (T)s2;
    }
}
""",
    # The moments from totals that a data-parallel reduce summed over the ranks (unshifted sums).
    "tinycnn_bn_moments": r"""
extern "C" __global__ void tinycnn_bn_moments(const double* totals, T* mean, T* var, T* inv_std, int c, double eps,
                                              T* moving_mean, T* moving_var, T momentum, T complement) {
    TINYCNN_FOR_EACH(ch, (I)c) tinycnn_moments((int)ch, totals[ch], totals[c + ch], totals[2 * c], 0.0, eps, mean, var,
                                               inv_std, moving_mean, moving_var, momentum, complement);
}
""",
    # y = (x - mean) * inv_std * gamma + beta, then (use_dropout) the dropout mask of element offset + i.
    "tinycnn_bn_normalize": r"""
extern "C" __global__ void tinycnn_bn_normalize(const T* x, int relu, const T* mean, const T* inv_std, const T* gamma,
                                                const T* beta, T* y, unsigned char* keep, I n, int c,
                                                int use_dropout, const unsigned int* key, unsigned int key_value,
                                                unsigned int threshold, T scale, unsigned long long offset) {
    const unsigned int mask_key = key ? *key : key_value;
    TINYCNN_FOR_EACH(i, n) {
        const int ch = (int)(i % c);
        T v = (tinycnn_bn_input(x, i, relu) - mean[ch]) * inv_std[ch] * gamma[ch] + beta[ch];
        if (use_dropout) {
            const bool k = tinycnn_keep((unsigned long long)i + offset, mask_key, threshold);
            keep[i] = k;
            v = k ? v * scale : (T)0;
        }
        y[i] = v;
    }
}
""",
    # dx = gamma * inv_std * (g - sum(g) / m - xhat * sum(g * xhat) / m), the sums and m from totals;
    # with `relu`, the gradient of the ReLU's input: dx where x > 0, else 0 (relu_backward's rule).
    "tinycnn_bn_backward_dx": r"""
extern "C" __global__ void tinycnn_bn_backward_dx(const T* dy, const T* x, int relu, const T* mean, const T* inv_std,
                                                  const unsigned char* keep, T scale, int use_mask, const T* gamma,
                                                  const double* totals, T* dx, I n, int c) {
    TINYCNN_FOR_EACH(i, n) {
        const int ch = (int)(i % c);
        const double count = totals[2 * c];
        T g = dy[i];
        if (use_mask) g = keep[i] ? g * scale : (T)0;
        const T xhat = (tinycnn_bn_input(x, i, relu) - mean[ch]) * inv_std[ch];
        const T k = gamma[ch] * inv_std[ch];
        const T d = k * (g - (T)(totals[ch] / count) - xhat * (T)(totals[c + ch] / count));
        dx[i] = (!relu || x[i] > (T)0) ? d : (T)0;
    }
}
""",
}

_TYPE_NAMES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def module_source(dtype, wide):
    """The translation unit of every kernel for arrays of `dtype` (float32 or float64), with 64-bit
    indices when `wide` (some array is near 2**31 elements or more: gpu.WIDE)."""
    head = f"typedef {_TYPE_NAMES[np.dtype(dtype)]} T;\ntypedef {'long long' if wide else 'int'} I;\n"
    return head + _PRELUDE + "".join(KERNELS.values())
