"""numba kernels for the CPU backend: the hot loops of kernels_reference, compiled.

Each public function has the signature and meaning of its namesake in kernels_reference
(tests compare them entry by entry). Loops run in parallel over the batch, so two threads
never write the same image and results do not depend on the thread count. Compiled code
is cached on disk (cache=True): the compile cost is paid once per machine, not per run.
"""
import os

import numba
import numpy as np
from numba import njit, prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    # numba would pick OpenMP, whose spinning threads fight OpenBLAS's threads for the cores
    # between GEMMs: measured 730 ms per Week2 step on 2 cores, against 54 ms with workqueue.
    numba.config.THREADING_LAYER = "workqueue"

from . import kernels_reference as _ref
from .kernels_reference import conv_output_size, dropout_keep_threshold, dropout_key

_JIT = dict(parallel=True, cache=True, nogil=True, fastmath=False)

# Below this many elements, waking the thread pool costs more than the loop: use NumPy.
SMALL = 1 << 15


@njit(**_JIT)
def _im2col(x, kh, kw, sh, sw, top, left, oh, ow, out):
    n, h, w, c = x.shape
    for b in prange(n):
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for a in range(kh):
                    hi = i * sh + a - top
                    for d in range(kw):
                        wi = j * sw + d - left
                        base = (a * kw + d) * c
                        if 0 <= hi < h and 0 <= wi < w:
                            for ch in range(c):
                                out[row, base + ch] = x[b, hi, wi, ch]
                        else:
                            for ch in range(c):
                                out[row, base + ch] = 0.0


def im2col(x, kh, kw, stride, pads):
    n, h, w, c = x.shape
    oh = conv_output_size(h, kh, stride[0], pads[0] + pads[1])
    ow = conv_output_size(w, kw, stride[1], pads[2] + pads[3])
    out = np.empty((n * oh * ow, kh * kw * c), dtype=x.dtype)
    _im2col(np.ascontiguousarray(x), kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, out)
    return out


@njit(**_JIT)
def _col2im(cols, kh, kw, sh, sw, top, left, oh, ow, dx):
    n, h, w, c = dx.shape
    for b in prange(n):
        dx[b] = 0.0
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for a in range(kh):
                    hi = i * sh + a - top
                    if hi < 0 or hi >= h:
                        continue
                    for d in range(kw):
                        wi = j * sw + d - left
                        if wi < 0 or wi >= w:
                            continue
                        base = (a * kw + d) * c
                        for ch in range(c):
                            dx[b, hi, wi, ch] += cols[row, base + ch]


def col2im(cols, x_shape, kh, kw, stride, pads):
    n, h, w, c = x_shape
    oh = conv_output_size(h, kh, stride[0], pads[0] + pads[1])
    ow = conv_output_size(w, kw, stride[1], pads[2] + pads[3])
    dx = np.empty(x_shape, dtype=cols.dtype)
    _col2im(np.ascontiguousarray(cols), kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx)
    return dx


# -- Convolution, cache-blocked: the batch is cut into chunks whose patch matrix fits in the
# L3 cache, so each chunk is written by im2col and read back by the GEMM without a trip to
# memory. Backward recomputes each chunk's patches instead of keeping the whole matrix
# (73,728 x 144 floats = 42 MB for the Week2 model's second convolution).
CHUNK_BYTES = 4 << 20


def _chunk(x_shape, kh, kw, stride, pads):
    n, h, w, c = x_shape
    oh = conv_output_size(h, kh, stride[0], pads[0] + pads[1])
    ow = conv_output_size(w, kw, stride[1], pads[2] + pads[3])
    per_image = oh * ow * kh * kw * c * 4
    return max(1, min(n, CHUNK_BYTES // per_image)), oh * ow


def conv2d_forward(x, kernel2d, kh, kw, stride, pads):
    x = np.ascontiguousarray(x)
    chunk, rows = _chunk(x.shape, kh, kw, stride, pads)
    z = np.empty((x.shape[0] * rows, kernel2d.shape[1]), dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        cols = im2col(x[start:stop], kh, kw, stride, pads)
        np.matmul(cols, kernel2d, out=z[start * rows : stop * rows])
    return z, x


def conv2d_backward(dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
    x = saved
    chunk, rows = _chunk(x_shape, kh, kw, stride, pads)
    dx = np.empty(x_shape, dtype=dz.dtype) if need_dx else None
    dkernel2d[...] = 0
    for start in range(0, x_shape[0], chunk):
        stop = min(start + chunk, x_shape[0])
        cols = im2col(x[start:stop], kh, kw, stride, pads)
        dz_chunk = dz[start * rows : stop * rows]
        dkernel2d += cols.T @ dz_chunk
        if need_dx:
            dx[start:stop] = col2im(dz_chunk @ kernel2d.T, (stop - start,) + tuple(x_shape[1:]), kh, kw, stride, pads)
    return dx


@njit(**_JIT)
def _maxpool_forward(x, ph, pw, sh, sw, y, argmax):
    n, oh, ow, c = y.shape
    for b in prange(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    best = x[b, i * sh, j * sw, ch]
                    k = 0
                    for a in range(ph):
                        for d in range(pw):
                            v = x[b, i * sh + a, j * sw + d, ch]
                            if v > best:  # strict: ties go to the first, as in the reference
                                best = v
                                k = a * pw + d
                    y[b, i, j, ch] = best
                    argmax[b, i, j, ch] = k


def maxpool_forward(x, pool, stride):
    n, h, w, c = x.shape
    oh, ow = (h - pool[0]) // stride[0] + 1, (w - pool[1]) // stride[1] + 1
    y = np.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = np.empty((n, oh, ow, c), dtype=np.int8)
    _maxpool_forward(np.ascontiguousarray(x), pool[0], pool[1], stride[0], stride[1], y, argmax)
    return y, argmax


@njit(**_JIT)
def _maxpool_backward(dy, argmax, pw, sh, sw, dx):
    n, oh, ow, c = dy.shape
    for b in prange(n):
        dx[b] = 0.0
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    k = argmax[b, i, j, ch]
                    dx[b, i * sh + k // pw, j * sw + k % pw, ch] += dy[b, i, j, ch]


def maxpool_backward(dy, argmax, x_shape, pool, stride):
    dx = np.empty(x_shape, dtype=dy.dtype)
    _maxpool_backward(np.ascontiguousarray(dy), argmax, pool[1], stride[0], stride[1], dx)
    return dx


# -- BatchNormalization over the rows of (M, C): the batch is split into row blocks, each
# thread sums its blocks into its own partial row, and the partials are added in a fixed order.
_BLOCKS = 64


@njit(**_JIT)
def _column_sums(x2d, shift, square):
    m, c = x2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, c), dtype=np.float64)
    for blk in prange(_BLOCKS):
        for r in range(blk * step, min(m, (blk + 1) * step)):
            for ch in range(c):
                v = x2d[r, ch] - shift[ch]
                partial[blk, ch] += v * v if square else v
    total = np.zeros(c, dtype=np.float64)
    for blk in range(_BLOCKS):
        for ch in range(c):
            total[ch] += partial[blk, ch]
    return total


@njit(**_JIT)
def _bn_normalize(x2d, mean, inv_std, gamma, beta, y, xhat):
    m, c = x2d.shape
    for r in prange(m):
        for ch in range(c):
            h = (x2d[r, ch] - mean[ch]) * inv_std[ch]
            xhat[r, ch] = h
            y[r, ch] = h * gamma[ch] + beta[ch]


def batchnorm_forward_train(x2d, gamma, beta, eps):
    if x2d.size < SMALL:
        return _ref.batchnorm_forward_train(x2d, gamma, beta, eps)
    x2d = np.ascontiguousarray(x2d)
    m, c = x2d.shape
    zero = np.zeros(c, dtype=x2d.dtype)
    mean = (_column_sums(x2d, zero, False) / m).astype(x2d.dtype)
    var = (_column_sums(x2d, mean, True) / m).astype(x2d.dtype)  # two passes: no cancellation
    inv_std = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(x2d.dtype)
    y = np.empty_like(x2d)
    xhat = np.empty_like(x2d)
    _bn_normalize(x2d, mean, inv_std, gamma, beta, y, xhat)
    return y, xhat, mean, var, inv_std


@njit(**_JIT)
def _bn_backward_sums(dy2d, xhat):
    m, c = dy2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, 2, c), dtype=np.float64)
    for blk in prange(_BLOCKS):
        for r in range(blk * step, min(m, (blk + 1) * step)):
            for ch in range(c):
                g = dy2d[r, ch]
                partial[blk, 0, ch] += g
                partial[blk, 1, ch] += g * xhat[r, ch]
    total = np.zeros((2, c), dtype=np.float64)
    for blk in range(_BLOCKS):
        for ch in range(c):
            total[0, ch] += partial[blk, 0, ch]
            total[1, ch] += partial[blk, 1, ch]
    return total


@njit(**_JIT)
def _bn_backward_dx(dy2d, xhat, k, dbeta_m, dgamma_m, dx):
    m, c = dy2d.shape
    for r in prange(m):
        for ch in range(c):
            dx[r, ch] = k[ch] * (dy2d[r, ch] - dbeta_m[ch] - xhat[r, ch] * dgamma_m[ch])


def batchnorm_backward_train(dy2d, xhat, gamma, inv_std):
    if dy2d.size < SMALL:
        return _ref.batchnorm_backward_train(dy2d, xhat, gamma, inv_std)
    dy2d = np.ascontiguousarray(dy2d)
    m = dy2d.shape[0]
    sums = _bn_backward_sums(dy2d, xhat)
    dtype = dy2d.dtype
    dbeta, dgamma = sums[0].astype(dtype), sums[1].astype(dtype)
    dx = np.empty_like(dy2d)
    # dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))
    _bn_backward_dx(dy2d, xhat, (gamma * inv_std).astype(dtype), (sums[0] / m).astype(dtype),
                    (sums[1] / m).astype(dtype), dx)
    return dx, dgamma, dbeta


# -- Dropout: the same counter-based mask as kernels_reference (hash of the element index
# and a per-call key), computed in parallel; backward applies the stored 0/1 mask and scale.
@njit(**_JIT)
def _dropout_forward(x, key, threshold, scale, y, keep):
    flat_x, flat_y, flat_k = x.reshape(-1), y.reshape(-1), keep.reshape(-1)
    m32 = np.uint64(0xFFFFFFFF)
    for i in prange(flat_x.size):
        h = np.uint64(i) ^ key
        h = h ^ (h >> np.uint64(16))
        h = (h * np.uint64(0x7FEB352D)) & m32
        h = h ^ (h >> np.uint64(15))
        h = (h * np.uint64(0x846CA68B)) & m32
        h = h ^ (h >> np.uint64(16))
        k = (h >> np.uint64(8)) >= threshold
        flat_k[i] = k
        flat_y[i] = flat_x[i] * scale if k else 0.0


def dropout_forward(x, rate, seed):
    if x.size < SMALL:
        return _ref.dropout_forward(x, rate, seed)
    x = np.ascontiguousarray(x)
    scale = x.dtype.type(1.0 / (1.0 - rate))
    y = np.empty_like(x)
    keep = np.empty(x.shape, dtype=np.uint8)
    _dropout_forward(x, np.uint64(dropout_key(seed)), np.uint64(dropout_keep_threshold(rate)), scale, y, keep)
    return y, (keep, scale)


@njit(**_JIT)
def _dropout_backward(dy, keep, scale, dx):
    flat_dy, flat_dx, flat_k = dy.reshape(-1), dx.reshape(-1), keep.reshape(-1)
    for i in prange(flat_dy.size):
        flat_dx[i] = flat_dy[i] * scale if flat_k[i] else 0.0


def dropout_backward(dy, mask):
    if not isinstance(mask, tuple):  # a small input took the reference path
        return _ref.dropout_backward(dy, mask)
    keep, scale = mask
    dy = np.ascontiguousarray(dy)
    dx = np.empty_like(dy)
    _dropout_backward(dy, keep, scale, dx)
    return dx
