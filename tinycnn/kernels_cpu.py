"""numba kernels for the CPU backend: the hot loops of kernels_reference, compiled.

Each public function has the signature and meaning of its namesake in kernels_reference
(tests compare them entry by entry). Loops run in parallel over the batch, so two threads
never write the same image and results do not depend on the thread count. Compiled code
is cached on disk (cache=True): the compile cost is paid once per machine, not per run.
"""
import os
import threading

# How long numba's idle OpenMP threads spin before they sleep. A Week2 step runs ~60 short
# numba kernels back to back and no BLAS, so waking sleeping threads for each one costs; but
# where a model still calls OpenBLAS (Dense layers, convolutions over 64 channels), spinning
# threads take the cores from OpenBLAS's own. Week2 step on the 2-core machine, direct
# convolutions / im2col + GEMM convolutions: GOMP_SPINCOUNT=1000 14.4 / 36.8-38.5 ms; sleeping
# at once (OMP_WAIT_POLICY=PASSIVE) 16.3-18.1 / 30.5-30.7; 10,000 13.3-13.9 / 105-124;
# 100,000 13.7-17.9 / 705-736; spinning forever (ACTIVE) 12.9-13.6 / 928-937.
# 1000 is the default unless the user chose either variable. It must be set before numba loads.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from . import kernels_reference as _ref  # noqa: E402
from .kernels_reference import dropout_keep_threshold, dropout_key, output_hw  # noqa: E402

_JIT = dict(parallel=True, cache=True, nogil=True, fastmath=False)


def _numba_threads():
    """Threads for tinycnn's numba kernels: $TINYCNN_NUMBA_THREADS, else numba's default (all cores).

    With the convolutions in numba, a Week2 step calls no BLAS at all, so nothing competes for
    the cores: measured 18.7-19.1 ms per step with two numba threads against 20.9-22.2 with one on
    the 2-core machine. (With im2col + OpenBLAS convolutions one numba thread was better, 27.5 against
    31.4 ms: OpenBLAS threads spin for a while after each GEMM and took the second core.)"""
    import numba

    wanted = os.environ.get("TINYCNN_NUMBA_THREADS")
    if wanted:  # for the importing thread (numba's count is per thread)
        numba.set_num_threads(max(1, min(int(wanted), numba.config.NUMBA_NUM_THREADS)))


def _keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees the same ~100 MB of activations every time; by
    default glibc serves arrays this large with fresh mmap pages, so every step pays a page
    fault and the zeroing of each page on first touch (measured: 2 ms of a 32 ms Week2 step).
    Opt out with TINYCNN_MALLOC_TUNING=0; a no-op off glibc."""
    if os.environ.get("TINYCNN_MALLOC_TUNING", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)  # arrays up to 1 GiB come from the heap...
        libc.mallopt(m_trim_threshold, 2**31 - 1)  # ...and freed heap memory (up to 2 GiB) stays mapped
    except (OSError, AttributeError):
        pass


_keep_freed_memory()
_numba_threads()

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
    n, h, w, c, oh, ow = _conv_sizes(x.shape, kh, kw, stride, pads)
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
    _, _, _, _, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
    dx = np.empty(x_shape, dtype=cols.dtype)
    _col2im(np.ascontiguousarray(cols), kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx)
    return dx


@njit(**_JIT)
def _relu_backward(dy, y, dx):
    fdy, fy, fdx = dy.reshape(-1), y.reshape(-1), dx.reshape(-1)
    for i in prange(fdy.size):
        fdx[i] = fdy[i] if fy[i] > 0 else 0.0


def relu_backward(dy, y):
    """One pass instead of NumPy's two (a boolean temporary, then the product)."""
    if dy.size < SMALL:
        return _ref.relu_backward(dy, y)
    dx = np.empty(dy.shape, dtype=dy.dtype)
    _relu_backward(np.ascontiguousarray(dy), np.ascontiguousarray(y), dx)
    return dx


# -- Convolution, cache-blocked: the batch is cut into chunks whose patch matrix fits in the
# cores' L2 caches, so each chunk is written by im2col and read back by the GEMM without a trip to
# memory. Backward recomputes each chunk's patches instead of keeping the whole matrix
# (73,728 x 144 floats = 42 MB for the Week2 model's second convolution).
# Week2 step on the 2-core machine (2 x 1 MiB L2): 1 MiB chunks 30.7-31.1 ms, 2 MiB 30.9-31.3,
# 4 MiB 31.6-35.2, 8 MiB 39-40, unchunked 45.
CHUNK_BYTES = 2 << 20


def _conv_sizes(x_shape, kh, kw, stride, pads):
    n, h, w, c = x_shape
    return (n, h, w, c) + output_hw(h, w, kh, kw, stride, pads)


def _chunk(bytes_per_image, n):
    return max(1, min(n, CHUNK_BYTES // bytes_per_image))


_scratch = threading.local()  # per thread: two models training in two threads never share one


def _scratch_buffer(name, shape, dtype, zeroed=False):
    """A reusable work array (the chunk's patch matrix and its gradient): allocated once per
    shape instead of once per chunk. Only for values that die before the kernel returns.
    `zeroed`: zero-filled when first made (for buffers whose unwritten parts must stay 0)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, shape, np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = (np.zeros if zeroed else np.empty)(shape, dtype=dtype)
    return buf


def _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow):
    cols = _scratch_buffer("cols", ((stop - start) * oh * ow, kh * kw * x.shape[3]), x.dtype)
    _im2col(x[start:stop], kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, cols)
    return cols


from . import kernels_cpu_conv as _direct  # noqa: E402  (it imports the helpers above)

# Which convolution: "direct" (register-blocked loops, kernels_cpu_conv) where it applies, else
# "gemm" (chunked im2col + OpenBLAS). $TINYCNN_CONV=gemm forces the GEMM path everywhere.
# Direct applies to float32/float64 layers with at most DIRECT_MAX_CHANNELS input and output
# channels: there the GEMM has as few columns as the layer has filters and runs at a fraction of
# the machine's rate, while the direct loops keep 8 pixels x 16 filters in registers. Week2 conv2
# (16 -> 16, 3x3, 128 images of 26x26) on the 2-core machine, forward: 1.1-1.4 ms direct,
# 3.2-3.7 ms GEMM. Larger layers were not measured, so they keep the GEMM.
CONV = os.environ.get("TINYCNN_CONV", "direct")
if CONV not in ("direct", "gemm"):
    raise ValueError(f"TINYCNN_CONV must be 'direct' or 'gemm', got {CONV!r}")
DIRECT_MAX_CHANNELS = 64


def _algorithm(x, kernel2d):
    direct = (CONV == "direct" and x.dtype in (np.float32, np.float64)
              and x.shape[3] <= DIRECT_MAX_CHANNELS and kernel2d.shape[1] <= DIRECT_MAX_CHANNELS)
    return "direct" if direct else "gemm"


def conv2d_forward(x, kernel2d, kh, kw, stride, pads):
    x = np.ascontiguousarray(x)
    n, h, w, c, oh, ow = _conv_sizes(x.shape, kh, kw, stride, pads)
    algorithm = _algorithm(x, kernel2d)
    if algorithm == "direct":
        xpad = np.ascontiguousarray(_ref._pad(x, pads))
        return _direct.forward(xpad, np.ascontiguousarray(kernel2d), kh, kw, stride, oh, ow), (algorithm, xpad)
    chunk = _chunk(oh * ow * kh * kw * c * x.itemsize, n)
    z = np.empty((n * oh * ow, kernel2d.shape[1]), dtype=x.dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        cols = _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow)
        np.matmul(cols, kernel2d, out=z[start * oh * ow : stop * oh * ow])
    return z, (algorithm, x)


def conv2d_backward(dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
    algorithm, x = saved
    dz = np.ascontiguousarray(dz)
    n, h, w, c, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
    if algorithm == "direct":
        _direct.filter_grad(x, dz, kh, kw, stride, oh, ow, dkernel2d)
        if not need_dx:
            return None
        # The gather form needs stride 1 and pads below the kernel size; with few input channels
        # its output (padded to 16 channels) wastes more than the GEMM + col2im costs.
        gather = stride == (1, 1) and max(pads[:2]) < kh and max(pads[2:]) < kw and c >= _direct.LANES // 2
        if gather:
            return _direct.input_grad(dz, x_shape, np.ascontiguousarray(kernel2d), kh, kw, pads, oh, ow)
        return _gemm_input_grad(dz, x_shape, kernel2d, kh, kw, stride, pads)
    rows = oh * ow
    chunk = _chunk(rows * kh * kw * c * x.itemsize, n)
    dkernel2d[...] = 0
    part = np.empty_like(dkernel2d)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        cols = _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow)
        np.matmul(cols.T, dz[start * rows : stop * rows], out=part)
        dkernel2d += part
    return _gemm_input_grad(dz, x_shape, kernel2d, kh, kw, stride, pads) if need_dx else None


def _gemm_input_grad(dz, x_shape, kernel2d, kh, kw, stride, pads):
    """dx = col2im(dz @ kernel^T), a chunk of images at a time (the chunk's dcols stay in cache)."""
    n, h, w, c, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
    rows = oh * ow
    chunk = _chunk(rows * kh * kw * c * dz.itemsize, n)
    dx = np.empty(x_shape, dtype=dz.dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        dcols = _scratch_buffer("dcols", ((stop - start) * rows, kh * kw * c), dz.dtype)
        np.matmul(dz[start * rows : stop * rows], kernel2d.T, out=dcols)
        _col2im(dcols, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx[start:stop])
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
    oh, ow = output_hw(h, w, pool[0], pool[1], stride)
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


# -- BatchNormalization over the rows of (M, C), optionally fused with the Dropout after it.
# Statistics: one pass, float64 sums of x - shift (shift = the first row, so the variance does
# not cancel); each of _BLOCKS row blocks sums into its own partial row and the partials are
# added in a fixed order, so results do not depend on the thread count. Backward recomputes
# xhat from x instead of storing it: forward writes one tensor (y), not two.
_BLOCKS = 64


@njit(cache=True, inline="always")
def _hash_keep(i, key, threshold):
    """The counter-based dropout decision of kernels_reference, for element index i."""
    m32 = np.uint64(0xFFFFFFFF)
    h = np.uint64(i) ^ key
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x7FEB352D)) & m32
    h = h ^ (h >> np.uint64(15))
    h = (h * np.uint64(0x846CA68B)) & m32
    h = h ^ (h >> np.uint64(16))
    return (h >> np.uint64(8)) >= threshold


@njit(**_JIT)
def _bn_stats(x2d):
    m, c = x2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, 2, c), dtype=np.float64)
    for blk in prange(_BLOCKS):
        for r in range(blk * step, min(m, (blk + 1) * step)):
            for ch in range(c):
                v = np.float64(x2d[r, ch]) - np.float64(x2d[0, ch])
                partial[blk, 0, ch] += v
                partial[blk, 1, ch] += v * v
    mean = np.empty(c, dtype=np.float64)
    var = np.empty(c, dtype=np.float64)
    for ch in range(c):
        s1 = 0.0
        s2 = 0.0
        for blk in range(_BLOCKS):
            s1 += partial[blk, 0, ch]
            s2 += partial[blk, 1, ch]
        d = s1 / m
        mean[ch] = np.float64(x2d[0, ch]) + d
        var[ch] = max(s2 / m - d * d, 0.0)
    return mean, var


@njit(**_JIT)
def _bn_normalize(x2d, mean, inv_std, gamma, beta, key, threshold, scale, use_dropout, y, keep):
    m, c = x2d.shape
    for r in prange(m):
        for ch in range(c):
            v = (x2d[r, ch] - mean[ch]) * inv_std[ch] * gamma[ch] + beta[ch]
            if use_dropout:
                k = _hash_keep(r * c + ch, key, threshold)
                keep[r, ch] = k
                v = v * scale if k else 0.0
            y[r, ch] = v


def _bn_forward(x2d, gamma, beta, eps, rate, seed):
    x2d = np.ascontiguousarray(x2d)
    mean64, var64 = _bn_stats(x2d)
    dtype = x2d.dtype
    mean, var = mean64.astype(dtype), var64.astype(dtype)
    inv_std = (1.0 / np.sqrt(var64 + eps)).astype(dtype)
    y = np.empty_like(x2d)
    use_dropout = rate > 0.0
    keep = np.empty(x2d.shape if use_dropout else (1, 1), dtype=np.uint8)
    scale = dtype.type(1.0 / (1.0 - rate))
    key = np.uint64(dropout_key(seed) if use_dropout else 0)
    _bn_normalize(x2d, mean, inv_std, gamma, beta, key, np.uint64(dropout_keep_threshold(rate)), scale,
                  use_dropout, y, keep)
    saved = (x2d, mean, keep if use_dropout else None, scale)
    return y, saved, mean, var, inv_std


def batchnorm_forward_train(x2d, gamma, beta, eps):
    if x2d.size < SMALL:
        return _ref.batchnorm_forward_train(x2d, gamma, beta, eps)
    return _bn_forward(x2d, gamma, beta, eps, 0.0, 0)


def batchnorm_dropout_forward_train(x2d, gamma, beta, eps, rate, seed):
    if x2d.size < SMALL:
        return _ref.batchnorm_dropout_forward_train(x2d, gamma, beta, eps, rate, seed)
    return _bn_forward(x2d, gamma, beta, eps, rate, seed)


@njit(**_JIT)
def _bn_backward_sums(dy2d, x2d, mean, inv_std, keep, scale, use_mask):
    m, c = dy2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, 2, c), dtype=np.float64)
    for blk in prange(_BLOCKS):
        for r in range(blk * step, min(m, (blk + 1) * step)):
            for ch in range(c):
                g = dy2d[r, ch]
                if use_mask:
                    g = g * scale if keep[r, ch] else 0.0
                partial[blk, 0, ch] += g
                partial[blk, 1, ch] += g * ((x2d[r, ch] - mean[ch]) * inv_std[ch])
    total = np.zeros((2, c), dtype=np.float64)
    for blk in range(_BLOCKS):
        for ch in range(c):
            total[0, ch] += partial[blk, 0, ch]
            total[1, ch] += partial[blk, 1, ch]
    return total


@njit(**_JIT)
def _bn_backward_dx(dy2d, x2d, mean, inv_std, keep, scale, use_mask, k, dbeta_m, dgamma_m, dx):
    m, c = dy2d.shape
    for r in prange(m):
        for ch in range(c):
            g = dy2d[r, ch]
            if use_mask:
                g = g * scale if keep[r, ch] else 0.0
            xhat = (x2d[r, ch] - mean[ch]) * inv_std[ch]
            dx[r, ch] = k[ch] * (g - dbeta_m[ch] - xhat * dgamma_m[ch])


def _bn_backward(dy2d, saved, gamma, inv_std):
    x2d, mean, keep, scale = saved
    dy2d = np.ascontiguousarray(dy2d)
    m = dy2d.shape[0]
    use_mask = keep is not None
    keep = keep if use_mask else np.empty((1, 1), dtype=np.uint8)
    sums = _bn_backward_sums(dy2d, x2d, mean, inv_std, keep, scale, use_mask)
    dtype = dy2d.dtype
    dbeta, dgamma = sums[0].astype(dtype), sums[1].astype(dtype)
    dx = np.empty_like(dy2d)
    # dx = gamma * inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = dy after the dropout mask
    _bn_backward_dx(dy2d, x2d, mean, inv_std, keep, scale, use_mask, (gamma * inv_std).astype(dtype),
                    (sums[0] / m).astype(dtype), (sums[1] / m).astype(dtype), dx)
    return dx, dgamma, dbeta


def batchnorm_backward_train(dy2d, saved, gamma, inv_std):
    if not isinstance(saved, tuple):  # a small input took the reference path
        return _ref.batchnorm_backward_train(dy2d, saved, gamma, inv_std)
    return _bn_backward(dy2d, saved, gamma, inv_std)


def batchnorm_dropout_backward_train(dy2d, saved, gamma, inv_std):
    if len(saved) == 2:  # a small input took the reference path: (xhat, mask)
        return _ref.batchnorm_dropout_backward_train(dy2d, saved, gamma, inv_std)
    return _bn_backward(dy2d, saved, gamma, inv_std)


@njit(**_JIT)
def _bn_affine(x2d, scale, shift, y):
    m, c = x2d.shape
    for r in prange(m):
        for ch in range(c):
            y[r, ch] = x2d[r, ch] * scale[ch] + shift[ch]


def batchnorm_forward_infer(x2d, gamma, beta, moving_mean, moving_var, eps):
    """Inference: one pass of x * scale + shift (NumPy's version makes two, with a temporary)."""
    if x2d.size < SMALL:
        return _ref.batchnorm_forward_infer(x2d, gamma, beta, moving_mean, moving_var, eps)
    scale = (gamma / np.sqrt(moving_var + eps)).astype(x2d.dtype)
    shift = (beta - moving_mean * scale).astype(x2d.dtype)
    y = np.empty(x2d.shape, dtype=x2d.dtype)
    _bn_affine(np.ascontiguousarray(x2d), scale, shift, y)
    return y, scale


# -- Dropout alone (when no BatchNormalization precedes it): the same counter-based mask,
# stored as 0/1 bytes; backward applies mask and scale in one pass.
@njit(**_JIT)
def _dropout_forward(x, key, threshold, scale, y, keep):
    flat_x, flat_y, flat_k = x.reshape(-1), y.reshape(-1), keep.reshape(-1)
    for i in prange(flat_x.size):
        k = _hash_keep(i, key, threshold)
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
