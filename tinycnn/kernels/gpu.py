"""The GPU kernel set: CUDA overrides of the reference set, through CuPy.

The kernels' source is tinycnn/kernels/cuda_source.py: plain CUDA C++ that CuPy's RawModule
compiles (once per dtype and index width, at first use) and that the tests also compile with
NVRTC and run on the CPU, so CI vouches for this file without a GPU. Every kernel gathers (no
atomics on data), so results are deterministic. BatchNormalization, with or without the Dropout
after it and the ReLU before it, is 2 launches forward (its moving averages included) and 2
backward (the reference composite took about 40); softmax-CE and ReLU's gradient are one each;
a 1x1 convolution with stride 1 and no padding multiplies the input itself instead of an im2col
copy. The GEMMs are cuBLAS (through CuPy's matmul); depthwise convolution and average pooling
run the reference code on CuPy arrays.

NOTE: written without a GPU; what has and has not run on one is listed in CHANGELOG.md.
"""
import cupy as cp
import numpy as np

from . import cuda_source
from .reference import ReferenceKernels, output_hw
from ..randomness import DeviceKey, dropout_keep_threshold, dropout_key

THREADS = 256  # per block
MAX_BLOCKS = 4096  # grid-stride loops cover the rest; 8 blocks of 256 per SM on a 132-SM H100 is ~1k
WIDE = 2**31 - MAX_BLOCKS * THREADS  # from here on, indices are 64-bit (the loop's i + stride must fit)
BN_PARTS = 256  # partial sums per BatchNorm column (fixed: results must not depend on the device)
# A convolution's kernel gradient: a partial sum per this many rows, at most CONV_PARTS per (k, q)
# (a function of the shapes alone, as BN_PARTS). Week2's conv2 at batch 128: 72 parts of 1,024 rows.
CONV_ROWS_PER_PART, CONV_PARTS = 1024, 256
NULL = np.uint64(0)  # a null pointer argument: CuPy passes a NumPy scalar by value, 8 bytes as a pointer


class _Index(int):
    """A kernel argument of the module's index type I (int, or long long when wide)."""


def _ints(*values):
    return tuple(np.int32(v) for v in values)


def _as(array, dtype):
    return cp.ascontiguousarray(array.astype(dtype, copy=False))


class GPUKernels(ReferenceKernels):
    """CUDA overrides of the reference set. `source(dtype, wide)` gives a module's CUDA text (tests
    pass a mutated one to show that they catch a wrong index)."""

    name = "gpu"
    fuses_relu_batchnorm = True  # the BatchNorm kernels read a ReLU's input (relu=1): see ReferenceKernels
    overrides = ("im2col", "col2im", "conv2d_forward", "conv2d_backward", "maxpool_forward", "maxpool_backward",
                 "global_avgpool_forward", "global_avgpool_backward", "relu_backward",
                 "batchnorm_forward_train", "batchnorm_backward_train", "batchnorm_moving_update",
                 "batchnorm_dropout_forward_train", "batchnorm_dropout_backward_train", "relu_batchnorm_forward_train",
                 "relu_batchnorm_backward_train", "dropout_forward", "dropout_backward", "dropout_keys",
                 "softmax_cross_entropy", "categorical_matches", "adam_update")

    def __init__(self, source=cuda_source.module_source):
        self._source = source
        self._modules = {}  # (dtype, wide) -> the compiled module
        self._functions = {}  # (dtype, wide, name) -> its kernel
        self._arrival_counts = {}  # c -> uint32 zeros (see _arrivals)

    def describe(self):
        return "gpu (CUDA through CuPy)"

    def _launch(self, name, dtype, n, *args, biggest=0):
        """Runs kernel `name` over n work items with `args` as its parameters (arrays, NumPy scalars,
        and _Index for the I-typed ones). `biggest`: the size of the largest array it touches."""
        wide = max(n, biggest) >= WIDE
        key = (np.dtype(dtype), wide)
        kernel = self._functions.get(key + (name,))
        if kernel is None:
            if key not in self._modules:
                self._modules[key] = cp.RawModule(code=self._source(*key), options=cuda_source.NVRTC_OPTIONS)
            kernel = self._functions[key + (name,)] = self._modules[key].get_function(name)
        blocks = int(max(1, min(MAX_BLOCKS, -(-n // THREADS))))
        index = np.int64 if wide else np.int32
        kernel((blocks,), (THREADS,), tuple(index(a) if isinstance(a, _Index) else a for a in args))

    def _key(self, seed):
        """A mask's key as the kernels take it, (pointer, value): a static step's DeviceKey in device
        memory (the value unused), an eager step's int seed by value (a null pointer)."""
        if isinstance(seed, DeviceKey):
            return seed.view(), np.uint32(0)
        return NULL, np.uint32(dropout_key(seed))

    def _arrivals(self, c):
        """The per-column arrival counts of a column reduction over c columns (zeros, which every
        launch leaves as it found them): one array per width, kept, so a captured graph's stays valid."""
        counts = self._arrival_counts.get(c)
        if counts is None:
            counts = self._arrival_counts[c] = cp.zeros(c, dtype=cp.uint32)
        return counts

    # -- convolution windows ----------------------------------------------------------------------
    @staticmethod
    def _is_pixel(kh, kw, stride, pads):
        """A 1x1 window at stride 1 without padding: the window is the pixel itself."""
        return (kh, kw, *stride) == (1, 1, 1, 1) and not any(pads)

    @staticmethod
    def _window(x_shape, kh, kw, stride, pads):
        """(oh, ow) and the window kernels' int arguments h, w, c, kh, kw, sh, sw, top, left, oh, ow."""
        _, h, w, c = x_shape
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        return oh, ow, _ints(h, w, c, kh, kw, *stride, pads[0], pads[2], oh, ow)

    def im2col(self, x, kh, kw, stride, pads):
        if self._is_pixel(kh, kw, stride, pads):
            return cp.ascontiguousarray(x).reshape(-1, x.shape[3])
        oh, ow, window = self._window(x.shape, kh, kw, stride, pads)
        cols = cp.empty((x.shape[0] * oh * ow, kh * kw * x.shape[3]), dtype=x.dtype)
        self._launch("tinycnn_im2col", x.dtype, cols.size, cp.ascontiguousarray(x), cols, _Index(cols.size), *window,
                     biggest=x.size)
        return cols

    def col2im(self, cols, x_shape, kh, kw, stride, pads):
        if self._is_pixel(kh, kw, stride, pads):
            return cp.ascontiguousarray(cols).reshape(x_shape)
        _, _, window = self._window(x_shape, kh, kw, stride, pads)
        dx = cp.empty(x_shape, dtype=cols.dtype)
        self._launch("tinycnn_col2im", cols.dtype, dx.size, cp.ascontiguousarray(cols), dx, _Index(dx.size), *window,
                     biggest=cols.size)
        return dx

    def conv2d_forward(self, x, kernel2d, kh, kw, stride, pads):
        """A 1x1 window: the reference's GEMM of the pixels. A larger one: one launch
        (tinycnn_conv_forward) that gathers each window as it multiplies, instead of im2col and a
        GEMM (saved: the input, which the backward gathers from again)."""
        if self._is_pixel(kh, kw, stride, pads):
            return super().conv2d_forward(x, kernel2d, kh, kw, stride, pads)
        x = cp.ascontiguousarray(x)
        oh, ow, window = self._window(x.shape, kh, kw, stride, pads)
        f = kernel2d.shape[1]
        z = cp.empty((x.shape[0] * oh * ow, f), dtype=x.dtype)
        self._launch("tinycnn_conv_forward", x.dtype, z.size, x, cp.ascontiguousarray(kernel2d), z, _Index(z.size),
                     *window, np.int32(f), biggest=max(x.size, kernel2d.size))
        return z, x

    def conv2d_backward(self, dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
        """A 1x1 window: the reference's two GEMMs. A larger one: the kernel gradient in one launch
        (tinycnn_conv_filter_grad, from the saved input) and the input gradient in another
        (tinycnn_conv_input_grad), instead of three GEMMs and col2im: no window columns at all."""
        if self._is_pixel(kh, kw, stride, pads):
            return super().conv2d_backward(dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx)
        x, dz = saved, cp.ascontiguousarray(dz)
        _, _, window = self._window(x_shape, kh, kw, stride, pads)
        m, f = dz.shape
        k = kh * kw * x_shape[3]
        parts = int(min(CONV_PARTS, max(1, -(-m // CONV_ROWS_PER_PART))))
        partials = cp.empty((parts, k, f), dtype=dz.dtype)
        dk = dkernel2d if dkernel2d.flags.c_contiguous else cp.empty((k, f), dtype=dz.dtype)
        self._launch("tinycnn_conv_filter_grad", dz.dtype, parts * k * f, x, dz, partials, dk, self._arrivals(k * f),
                     _Index(m), *window, *_ints(f, parts), biggest=max(x.size, dz.size, partials.size))
        if dk is not dkernel2d:
            dkernel2d[...] = dk
        if not need_dx:
            return None
        dx = cp.empty(x_shape, dtype=dz.dtype)
        self._launch("tinycnn_conv_input_grad", dz.dtype, dx.size, dz, cp.ascontiguousarray(kernel2d), dx,
                     _Index(dx.size), *window, np.int32(f), biggest=max(dz.size, kernel2d.size))
        return dx

    # -- max pooling --------------------------------------------------------------------------------
    def maxpool_forward(self, x, pool, stride, pads):
        n, h, w, c = x.shape
        oh, ow = output_hw(h, w, pool[0], pool[1], stride, pads)
        y = cp.empty((n, oh, ow, c), dtype=x.dtype)
        argmax = cp.empty((n, oh, ow, c), dtype=cp.int32)
        self._launch("tinycnn_maxpool_forward", x.dtype, y.size, cp.ascontiguousarray(x), y, argmax,
                     _Index(y.size), *_ints(h, w, c, *pool, *stride, pads[0], pads[2], oh, ow), biggest=x.size)
        return y, argmax

    def maxpool_backward(self, dy, argmax, x_shape, pool, stride, pads):
        n, h, w, c = x_shape
        dx = cp.empty(x_shape, dtype=dy.dtype)
        self._launch("tinycnn_maxpool_backward", dy.dtype, dx.size, cp.ascontiguousarray(dy),
                     cp.ascontiguousarray(argmax), dx, _Index(dx.size),
                     *_ints(h, w, c, *pool, *stride, pads[0], pads[2], dy.shape[1], dy.shape[2]), biggest=dy.size)
        return dx

    # -- global average pooling: one launch each way (CuPy's mean and broadcast copy took four) --------
    def global_avgpool_forward(self, x):
        n, h, w, c = x.shape
        y = cp.empty((n, c), dtype=x.dtype)
        self._launch("tinycnn_global_avgpool_forward", x.dtype, y.size, cp.ascontiguousarray(x), y, _Index(y.size),
                     *_ints(h * w, c), biggest=x.size)
        return y

    def global_avgpool_backward(self, dy, x_shape):
        n, h, w, c = x_shape
        dx = cp.empty(x_shape, dtype=dy.dtype)
        self._launch("tinycnn_global_avgpool_backward", dy.dtype, dx.size, cp.ascontiguousarray(dy), dx,
                     _Index(dx.size), *_ints(h * w, c))
        return dx

    # -- ReLU ---------------------------------------------------------------------------------------------
    def relu_backward(self, dy, y):
        dy, y = cp.ascontiguousarray(dy), cp.ascontiguousarray(y)
        dx = cp.empty_like(dy)
        self._launch("tinycnn_relu_backward", dy.dtype, dy.size, dy, y, dx, _Index(dy.size))
        return dx

    # -- batch normalization (+ the dropout after it) -------------------------------------------------
    @staticmethod
    def _bn_sums(m, c):
        """A column reduction's scratch: its parts (partial sums per column), the (parts, 2C) float64
        partials, and the totals [sum1 (C), sum2 (C), m] its finishers write."""
        parts = int(min(m, BN_PARTS))
        return parts, cp.empty((parts, 2 * c), dtype=cp.float64), cp.empty(2 * c + 1, dtype=cp.float64)

    def _bn_forward(self, x2d, gamma, beta, eps, rate, seed, offset, reduce, moving, relu=False):
        """BatchNorm of x2d (of max(x2d, 0) when `relu`), then the dropout mask when rate > 0; the
        moving statistics updated where the moments are computed."""
        x2d = cp.ascontiguousarray(x2d)
        relu = np.int32(relu)
        m, c = x2d.shape
        dtype = x2d.dtype
        if moving is None:
            moving = (NULL, NULL, dtype.type(0), dtype.type(0))
        else:  # the complement in float64, then rounded to T, as batchnorm_moving_update's
            moving = (moving[0], moving[1], dtype.type(moving[2]), dtype.type(1.0 - moving[2]))
        parts, partials, totals = self._bn_sums(m, c)
        mean, var, inv_std = (cp.empty(c, dtype=dtype) for _ in range(3))
        # one launch: partial sums, each column's totals, and (without a reduce) the moments; the
        # ranks' sums must add up, so they are not shifted by the first row
        self._launch("tinycnn_bn_forward_partials", dtype, parts * c, x2d, relu, np.int32(reduce is None), partials,
                     _Index(m), np.int32(c), np.int32(parts), self._arrivals(c), totals, np.int32(reduce is None),
                     mean, var, inv_std, np.float64(eps), *moving, biggest=m * c)
        if reduce is not None:
            self._launch("tinycnn_bn_moments", dtype, c, reduce(totals), mean, var, inv_std, np.int32(c),
                         np.float64(eps), *moving)
        use_dropout = rate > 0.0
        y = cp.empty_like(x2d)
        keep = cp.empty(x2d.shape if use_dropout else (1,), dtype=cp.uint8)
        scale = dtype.type(1.0 / (1.0 - rate))
        self._launch("tinycnn_bn_normalize", dtype, x2d.size, x2d, relu, mean, inv_std, _as(gamma, dtype),
                     _as(beta, dtype), y, keep, _Index(y.size), np.int32(c), np.int32(use_dropout),
                     *(self._key(seed) if use_dropout else (NULL, np.uint32(0))),  # without dropout: no key read
                     np.uint32(dropout_keep_threshold(rate)), scale, np.uint64(offset))
        return y, (x2d, relu, mean, keep if use_dropout else None, scale), mean, var, inv_std

    def _bn_backward(self, dy2d, saved, gamma, inv_std, reduce, out):
        x2d, relu, mean, keep, scale = saved
        dy2d = cp.ascontiguousarray(dy2d)
        m, c = dy2d.shape
        dtype = dy2d.dtype
        use_mask = np.int32(keep is not None)
        keep = keep if keep is not None else cp.empty((1,), dtype=cp.uint8)
        parts, partials, totals = self._bn_sums(m, c)
        # this rank's dgamma and dbeta, written where the caller asks (its gradient buffer's slots)
        dgamma, dbeta = (target if target is not None else cp.empty(c, dtype=dtype) for target in out)
        self._launch("tinycnn_bn_backward_partials", dtype, parts * c, dy2d, x2d, relu, mean, inv_std, keep, scale,
                     use_mask, partials, _Index(m), np.int32(c), np.int32(parts), self._arrivals(c), totals, dbeta,
                     dgamma, biggest=m * c)
        if reduce is not None:  # dx needs the whole batch's sums and row count
            totals = reduce(totals)
        dx = cp.empty_like(dy2d)
        self._launch("tinycnn_bn_backward_dx", dtype, dx.size, dy2d, x2d, relu, mean, inv_std, keep, scale, use_mask,
                     _as(gamma, dtype), totals, dx, _Index(dx.size), np.int32(c))
        return dx, dgamma, dbeta

    def batchnorm_forward_train(self, x2d, gamma, beta, eps, reduce=None, moving=None):
        return self._bn_forward(x2d, gamma, beta, eps, 0.0, 0, 0, reduce, moving)

    def batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    def batchnorm_moving_update(self, moving_mean, moving_var, mean, var, momentum):
        t = moving_mean.dtype.type
        self._launch("tinycnn_bn_moving_update", moving_mean.dtype, moving_mean.size, moving_mean, moving_var,
                     _as(mean, moving_mean.dtype), _as(var, moving_mean.dtype), _Index(moving_mean.size), t(momentum),
                     t(1.0 - momentum))

    def batchnorm_dropout_forward_train(self, x2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        return self._bn_forward(x2d, gamma, beta, eps, rate, seed, offset, reduce, moving)

    def batchnorm_dropout_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    def relu_batchnorm_forward_train(self, z2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        return self._bn_forward(z2d, gamma, beta, eps, rate, seed, offset, reduce, moving, relu=True)

    def relu_batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    # -- dropout and Adam ---------------------------------------------------------------------------------
    def dropout_forward(self, x, rate, seed, offset=0):
        x = cp.ascontiguousarray(x)
        y = cp.empty_like(x)
        keep = cp.empty(x.shape, dtype=cp.uint8)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        self._launch("tinycnn_dropout_forward", x.dtype, x.size, x, y, keep, _Index(x.size), *self._key(seed),
                     np.uint32(dropout_keep_threshold(rate)), scale, np.uint64(offset))
        return y, (keep, scale)

    def dropout_backward(self, dy, saved):
        keep, scale = saved
        dy = cp.ascontiguousarray(dy)
        dx = cp.empty_like(dy)
        self._launch("tinycnn_dropout_backward", dy.dtype, dy.size, dy, keep, dx, _Index(dx.size), scale)
        return dx

    def dropout_keys(self, bases, offsets, calls, step, out):
        self._launch("tinycnn_dropout_keys", np.float32, out.size, bases, offsets, calls, step, out,
                     _Index(out.size))

    def softmax_cross_entropy(self, logits, targets, eps=None, scale=None, loss_sum=None):
        """One launch: the scaled gradient, and the loss sum added up by the last row to finish."""
        logits = cp.ascontiguousarray(logits)
        rows, classes = logits.shape
        probs, grad = cp.empty_like(logits), cp.empty_like(logits)
        loss = cp.empty(rows, dtype=logits.dtype)
        t = logits.dtype.type
        lo, hi = (np.log(t(eps)), np.log1p(t(-eps))) if eps is not None else (t(0), t(0))
        if loss_sum is not None and rows == 0:
            loss_sum[...] = 0
        self._launch("tinycnn_softmax_ce", logits.dtype, rows, logits, _as(targets, logits.dtype), probs, loss, grad,
                     _Index(rows), np.int32(classes), np.int32(eps is not None), t(lo), t(hi),
                     t(1 if scale is None else scale), NULL if loss_sum is None else loss_sum, self._arrivals(1),
                     biggest=logits.size)
        return probs, loss, grad

    def categorical_matches(self, predictions, targets, into=None):
        """One launch: each row's hit, counted by the last row to finish into `into` (an epoch's
        running count: no add after it) or a new zero."""
        predictions = cp.ascontiguousarray(predictions)
        rows, classes = predictions.shape
        total = cp.zeros((), dtype=cp.int64) if into is None else into
        if rows:
            hits = cp.empty(rows, dtype=cp.uint8)
            self._launch("tinycnn_categorical_matches", predictions.dtype, rows, predictions,
                         _as(targets, predictions.dtype), hits, _Index(rows), np.int32(classes), total,
                         self._arrivals(1), biggest=predictions.size)
        return total

    def adam_update(self, param, grad, m, v, lr_t, beta_1, beta_2, epsilon):
        t = param.dtype.type  # the complements in float64, then rounded to T, as the reference's
        # a static step's learning rate in device memory, an eager step's by value
        lr = (lr_t, np.float64(0.0)) if isinstance(lr_t, cp.ndarray) else (NULL, np.float64(lr_t))
        self._launch("tinycnn_adam", param.dtype, param.size, param, m, v, cp.ascontiguousarray(grad),
                     _Index(param.size), *lr, t(1 - beta_1), t(1 - beta_2), t(epsilon))
