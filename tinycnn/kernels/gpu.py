"""The GPU kernel set: CUDA overrides of the reference set, through CuPy.

Every CUDA kernel is built once, at import, and reused. Each thread computes one output element
by *gathering* its inputs (col2im and max-pool backward included), so nothing uses atomics and
results are deterministic. Entries not overridden here (BatchNorm, softmax-CE, ReLU, the
convolutions' GEMMs, depthwise convolution, average pooling) run the reference code on CuPy
arrays; the reference composites call this set's primitives (im2col, col2im, dropout).

NOTE: written and reviewed without a GPU in this project's sessions so far; the kernel tests in
tests/test_kernels.py compare every entry with the reference wherever a GPU is present.
"""
import cupy as cp

from .reference import ReferenceKernels, output_hw
from ..randomness import dropout_keep_threshold, dropout_key

IM2COL = cp.ElementwiseKernel(
    "raw T x, int32 h, int32 w, int32 c, int32 kh, int32 kw, int32 sh, int32 sw, int32 top, int32 left, "
    "int32 oh, int32 ow",
    "T col",
    """
    const int k = kh * kw * c;
    const int row = i / k, j = i % k;
    const int ch = j % c, d = (j / c) % kw, a = j / (c * kw);
    const int ox = row % ow, oy = (row / ow) % oh, b = row / (ow * oh);
    const int y = oy * sh + a - top, xx = ox * sw + d - left;
    col = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((b * h + y) * w + xx) * c + ch] : (T)0;
    """,
    "tinycnn_im2col",
)

COL2IM = cp.ElementwiseKernel(
    "raw T cols, int32 h, int32 w, int32 c, int32 kh, int32 kw, int32 sh, int32 sw, int32 top, int32 left, "
    "int32 oh, int32 ow",
    "T dx",
    """
    const int ch = i % c, xx = (i / c) % w, y = (i / (c * w)) % h, b = i / (c * w * h);
    T total = 0;
    for (int a = 0; a < kh; ++a) {
        const int sy = y + top - a;
        if (sy < 0 || sy % sh != 0 || sy / sh >= oh) continue;
        for (int d = 0; d < kw; ++d) {
            const int sx = xx + left - d;
            if (sx < 0 || sx % sw != 0 || sx / sw >= ow) continue;
            const int row = (b * oh + sy / sh) * ow + sx / sw;
            total += cols[(long long)row * (kh * kw * c) + (a * kw + d) * c + ch];
        }
    }
    dx = total;
    """,
    "tinycnn_col2im",
)

# Windows are clipped to the image, so 'same' padding never wins a maximum (as the reference's -inf).
MAXPOOL_FORWARD = cp.ElementwiseKernel(
    "raw T x, int32 h, int32 w, int32 c, int32 ph, int32 pw, int32 sh, int32 sw, int32 top, int32 left, "
    "int32 oh, int32 ow",
    "T y, int32 argmax",
    """
    const int ch = i % c, ox = (i / c) % ow, oy = (i / (c * ow)) % oh, b = i / (c * ow * oh);
    const int y0 = oy * sh - top, x0 = ox * sw - left;
    const int a0 = max(0, -y0), a1 = min(ph, h - y0), d0 = max(0, -x0), d1 = min(pw, w - x0);
    T best = x[((b * h + y0 + a0) * w + x0 + d0) * c + ch];
    int k = a0 * pw + d0;
    for (int a = a0; a < a1; ++a)
        for (int d = d0; d < d1; ++d) {
            const T v = x[((b * h + y0 + a) * w + x0 + d) * c + ch];
            if (v > best) { best = v; k = a * pw + d; }
        }
    y = best;
    argmax = k;
    """,
    "tinycnn_maxpool_forward",
)

MAXPOOL_BACKWARD = cp.ElementwiseKernel(
    "raw T dy, raw int32 argmax, int32 h, int32 w, int32 c, int32 ph, int32 pw, int32 sh, int32 sw, "
    "int32 top, int32 left, int32 oh, int32 ow",
    "T dx",
    """
    const int ch = i % c, xx = (i / c) % w, y = (i / (c * w)) % h, b = i / (c * w * h);
    T total = 0;
    for (int a = 0; a < ph; ++a) {
        const int sy = y + top - a;
        if (sy < 0 || sy % sh != 0 || sy / sh >= oh) continue;
        for (int d = 0; d < pw; ++d) {
            const int sx = xx + left - d;
            if (sx < 0 || sx % sw != 0 || sx / sw >= ow) continue;
            const int o = ((b * oh + sy / sh) * ow + sx / sw) * c + ch;
            if (argmax[o] == a * pw + d) total += dy[o];
        }
    }
    dx = total;
    """,
    "tinycnn_maxpool_backward",
)

# The same counter-based hash as tinycnn.randomness.lowbias32, on the 64-bit element index as the
# CPU kernels hash it: truncating the index to 32 bits first gave other masks from element 2**32
# on (found by running this body on the CPU, tests/test_gpu_kernels_on_cpu.py).
DROPOUT_FORWARD = cp.ElementwiseKernel(
    "T x, uint32 key, uint32 threshold, T scale, uint64 offset",
    "T y, uint8 keep",
    """
    unsigned long long h = ((unsigned long long)i + offset) ^ key;
    h ^= h >> 16; h = (h * 0x7FEB352Dull) & 0xFFFFFFFFull; h ^= h >> 15;
    h = (h * 0x846CA68Bull) & 0xFFFFFFFFull; h ^= h >> 16;
    keep = (h >> 8) >= threshold;
    y = keep ? x * scale : (T)0;
    """,
    "tinycnn_dropout_forward",
)

DROPOUT_BACKWARD = cp.ElementwiseKernel(
    "T dy, uint8 keep, T scale", "T dx", "dx = keep ? dy * scale : (T)0", "tinycnn_dropout_backward"
)

# The complements 1 - beta come from the host, computed in float64 and then rounded to T, as the
# reference's are: computed on the device from beta rounded to float32 first, 1 - 0.9 was
# 0.100000024 against the CPU's 0.1 (and 1 - 0.999 0.0009999871), and the backends drifted apart.
ADAM = cp.ElementwiseKernel(
    "T g, T lr_t, T one_minus_beta_1, T one_minus_beta_2, T eps",
    "T p, T m, T v",
    """
    m += (g - m) * one_minus_beta_1;
    v += (g * g - v) * one_minus_beta_2;
    p -= lr_t * m / (sqrt(v) + eps);
    """,
    "tinycnn_adam",
)


# Every CUDA kernel this set launches (tests compile and run each of them, on the CPU too).
CUDA_KERNELS = (IM2COL, COL2IM, MAXPOOL_FORWARD, MAXPOOL_BACKWARD, DROPOUT_FORWARD, DROPOUT_BACKWARD, ADAM)


def _sizes(x_shape, kh, kw, stride, pads):
    n, h, w, c = x_shape
    return (n, h, w, c) + output_hw(h, w, kh, kw, stride, pads)


class GPUKernels(ReferenceKernels):
    """CUDA overrides of the reference set."""

    name = "gpu"
    overrides = ("im2col", "col2im", "maxpool_forward", "maxpool_backward", "dropout_forward", "dropout_backward",
                 "adam_update")

    def describe(self):
        return "gpu (CUDA through CuPy)"

    def im2col(self, x, kh, kw, stride, pads):
        n, h, w, c, oh, ow = _sizes(x.shape, kh, kw, stride, pads)
        cols = cp.empty((n * oh * ow, kh * kw * c), dtype=x.dtype)
        IM2COL(cp.ascontiguousarray(x), h, w, c, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, cols)
        return cols

    def col2im(self, cols, x_shape, kh, kw, stride, pads):
        n, h, w, c, oh, ow = _sizes(x_shape, kh, kw, stride, pads)
        dx = cp.empty(x_shape, dtype=cols.dtype)
        COL2IM(cp.ascontiguousarray(cols), h, w, c, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx)
        return dx

    def maxpool_forward(self, x, pool, stride, pads):
        n, h, w, c = x.shape
        oh, ow = output_hw(h, w, pool[0], pool[1], stride, pads)
        y = cp.empty((n, oh, ow, c), dtype=x.dtype)
        argmax = cp.empty((n, oh, ow, c), dtype=cp.int32)
        MAXPOOL_FORWARD(cp.ascontiguousarray(x), h, w, c, pool[0], pool[1], stride[0], stride[1], pads[0], pads[2],
                        oh, ow, y, argmax)
        return y, argmax

    def maxpool_backward(self, dy, argmax, x_shape, pool, stride, pads):
        n, h, w, c = x_shape
        dx = cp.empty(x_shape, dtype=dy.dtype)
        MAXPOOL_BACKWARD(cp.ascontiguousarray(dy), argmax, h, w, c, pool[0], pool[1], stride[0], stride[1],
                         pads[0], pads[2], dy.shape[1], dy.shape[2], dx)
        return dx

    def dropout_forward(self, x, rate, seed, offset=0):
        x = cp.ascontiguousarray(x)
        y = cp.empty_like(x)
        keep = cp.empty(x.shape, dtype=cp.uint8)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        DROPOUT_FORWARD(x, cp.uint32(dropout_key(seed)), cp.uint32(dropout_keep_threshold(rate)), scale,
                        cp.uint64(offset), y, keep)
        return y, (keep, scale)

    def dropout_backward(self, dy, saved):
        keep, scale = saved
        return DROPOUT_BACKWARD(dy, keep, scale)

    def adam_update(self, param, grad, m, v, lr_t, beta_1, beta_2, epsilon):
        t = param.dtype.type
        ADAM(grad, t(lr_t), t(1 - beta_1), t(1 - beta_2), t(epsilon), param, m, v)
