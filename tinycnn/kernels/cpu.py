"""The CPU kernel set: the hot loops of the reference set, compiled with numba.

Each override has the signature and meaning of its reference namesake (tests compare them entry
by entry). Loops run in parallel over the batch or over fixed blocks of rows, so two threads
never write the same element and results do not depend on the thread count. Compiled code is
cached on disk (cache=True): the compile cost is paid once per machine, not per run.

`tune_process` holds the process-wide CPU tuning (OpenMP idle policy, numba's thread count,
glibc's allocator); the backend calls it once, when the first CPU backend is created.
"""
import ctypes
import functools
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import compile_notice, cpu_conv
from .reference import ReferenceKernels, global_gradient_sums, output_hw, pad_nhwc, written_into
from .scratch import scratch_buffer
from .serial_twin import with_serial_twin
from ..randomness import dropout_keep_threshold, mask_key

_JIT = dict(parallel=True, cache=True, nogil=True, fastmath=False)
U = np.uint64  # an index cast unsigned: numba then checks no negative index (a wraparound) in the loop

# An empty array takes the reference kernel (the numba ones index its first row): the entries
# marked _reference_when_empty. Until 2026-12-06 every array under 2**15 elements did, on the
# grounds that waking the thread pool costs more than so short a loop; measured then on a 2-vCPU
# Zen 3 guest the numba kernels were as fast or faster at every size: a split Week2 step 24.8 ->
# 23.6 ms (medians, 30 rounds alternating in one process; the reference's many small NumPy
# operations hold the GIL, which the other share waits for after each BatchNorm barrier), an
# unsplit batch of 24 on two threads 8.8 -> 8.4 ms, predict over 10,000 images 0.481 -> 0.462 s.


def _reference_when_empty(entry):
    """A kernel entry that hands an empty first array to the reference set's entry of that name."""
    @functools.wraps(entry)
    def checked(self, array, *args, **kwargs):
        if array.size == 0:
            return getattr(ReferenceKernels, entry.__name__)(self, array, *args, **kwargs)
        return entry(self, array, *args, **kwargs)
    return checked


# -- process tuning --------------------------------------------------------------------------------
# How long numba's idle OpenMP threads spin before they sleep. A Week2 step runs ~60 short numba
# kernels back to back and no BLAS, so waking sleeping threads for each one costs; but where a
# model still calls OpenBLAS (Dense layers, or convolutions with TINYCNN_CONV=gemm), spinning threads take
# the cores from OpenBLAS's own. Week2 step on a 2-core Zen 5 machine, direct / im2col + GEMM
# convolutions: GOMP_SPINCOUNT=1000 14.4 / 36.8-38.5 ms; sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# 16.3-18.1 / 30.5-30.7; 10,000 13.3-13.9 / 105-124; 100,000 13.7-17.9 / 705-736; spinning forever
# (ACTIVE) 12.9-13.6 / 928-937. libgomp reads it when numba first starts its threads.
DEFAULT_SPINCOUNT = "1000"

_tuning = None  # what tune_process did, for Backend.describe()


def tune_process(settings):
    """Process-wide tuning for the CPU kernels, applied once (later calls return the first result):

    - OpenMP idle policy: GOMP_SPINCOUNT=1000 unless the user set GOMP_SPINCOUNT or
      OMP_WAIT_POLICY. It only takes effect if numba's threads have not started yet.
    - numba's thread count: `settings.numba_threads` (TINYCNN_NUMBA_THREADS) for this thread,
      else numba's default (every core). With no BLAS in a Week2 step nothing competes for the
      cores: 18.7-19.1 ms per step with two threads against 20.9-22.2 with one (2-core Zen 5).
    - glibc keeps freed memory for reuse instead of returning it to the OS
      (`settings.malloc_tuning`, TINYCNN_MALLOC_TUNING=0 opts out). A training step allocates and
      frees the same ~100 MB of activations every time; served by fresh mmap pages, every step
      paid page faults and zeroing (2 ms of a 32 ms Week2 step). Every thread allocates from the
      one heap (M_ARENA_MAX=1): with an arena of its own, the thread running a split batch's
      second share (tinycnn.batch_split) kept its own peak, +9 MB on a Week2 fit (247 -> 256 MB), for
      no speed (24.2-25.2 ms per step either way). A no-op off glibc.
    Returns a dict describing what is in force."""
    global _tuning
    if _tuning is not None:
        return _tuning
    import numba

    user_spin = next((f"{name}={os.environ[name]} (yours)" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                      if name in os.environ), None)
    if user_spin is None:
        os.environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    malloc = settings.malloc_tuning and _keep_freed_memory()
    compile_notice.install()  # a first run says why it pauses
    if settings.numba_threads is not None:
        most = numba.config.NUMBA_NUM_THREADS
        if settings.numba_threads > most:
            import warnings

            warnings.warn(f"TINYCNN_NUMBA_THREADS={settings.numba_threads} asks for more threads than numba has "
                          f"({most}: the cores, or NUMBA_NUM_THREADS); using {most}", RuntimeWarning, stacklevel=2)
        numba.set_num_threads(min(settings.numba_threads, most))
    _tuning = {
        "spin": user_spin or f"GOMP_SPINCOUNT={DEFAULT_SPINCOUNT} (tinycnn's default)",
        "numba_threads": numba.get_num_threads(),
        "malloc_tuning": "on" if malloc else "off",
    }
    return _tuning


def _keep_freed_memory():
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)  # arrays up to 1 GiB come from the heap...
        libc.mallopt(m_trim_threshold, 2**31 - 1)  # ...and freed heap memory (up to 2 GiB) stays mapped
        m_arena_max = -8
        libc.mallopt(m_arena_max, 1)  # one heap for every thread: a split batch's shares reuse each other's memory
        return True
    except (OSError, AttributeError):
        return False


# -- im2col / col2im ---------------------------------------------------------------------------------
@with_serial_twin
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


@with_serial_twin
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


def _conv_sizes(x_shape, kh, kw, stride, pads):
    n, h, w, c = x_shape
    return (n, h, w, c) + output_hw(h, w, kh, kw, stride, pads)


# Convolution by GEMM is cache-blocked: the batch is cut into chunks whose patch matrix fits in the
# cores' L2 caches, so each chunk is written by im2col and read back by the GEMM without a trip to
# memory. Backward recomputes each chunk's patches instead of keeping the whole matrix (73,728 x 144
# floats = 42 MB for the Week2 model's second convolution). Week2 step on a 2-core Zen 5 machine
# (2 x 1 MiB L2): 1 MiB chunks 30.7-31.1 ms, 2 MiB 30.9-31.3, 4 MiB 31.6-35.2, 8 MiB 39-40, unchunked 45.
CHUNK_BYTES = 2 << 20

# Direct convolution (cpu_conv) applies to every float32/float64 layer. Small layers: the GEMM has
# as few columns as the layer has filters and runs at a fraction of the machine's rate, while the
# direct loops keep 8 pixels x 16 filters (4 x 16 without AVX-512) in registers (Week2 conv2,
# 16 -> 16, 3x3, 128 images of 26x26, forward on a 2-core Zen 5: 1.1-1.4 ms direct, 3.2-3.7 ms
# GEMM). Wide layers: alone, some passes are faster as im2col + OpenBLAS (8x8, 64 -> 128: 2.1x),
# but in a network OpenBLAS's threads and numba's take turns on the same cores; the VGG-style
# network of benchmarks/vgg_scaling.py at batch 64 on a 2-vCPU AVX-512 guest: W = 32 177 -> 122 ms
# per step, W = 64 476 -> 411 ms, when its layers above 64 channels left the GEMM for the direct
# loops. TINYCNN_CONV=gemm still picks the GEMM.
#
# That was before a split batch's shares each had a core and OpenBLAS one thread (tinycnn.batch_split,
# tinycnn.share_process, tinycnn.blas_threads). On one thread, 32 images, 3x3 'same', ms of
# forward / filter gradient / input gradient, direct against GEMM (2-core Zen 3 guest, AVX2):
# 32x32 64->64 42/45/43 against 35/40/44; 16x16 128->128 43/52/35 against 39/34/46; 8x8 128->256
# 21/32/22 against 16/19/14; 8x8 256->256 45/71/47 against 30/30/35. The direct loops' 4 x 16
# register block reuses each input value for 16 filters only, and their weights (K x 16, 147 KB at
# K = 2304) stream from L2 for every pixel block; OpenBLAS's blocking keeps its panels in L1 and L2.
# The VGG-style network at W = 64, batch 64, fit's steady state: 680-700 ms direct, 545-580 ms with
# its layers of 64 channels and more as GEMMs (PyTorch 675 in the same hour). Week2's layers (16
# channels at most) keep the direct loops, which beat the GEMM there by 2-3x.
WIDE_CHANNELS = 64


def _chunk(bytes_per_image, n):
    return max(1, min(n, CHUNK_BYTES // bytes_per_image))


def _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow):
    cols = scratch_buffer("cols", ((stop - start) * oh * ow, kh * kw * x.shape[3]), x.dtype)
    _im2col(x[start:stop], kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, cols)
    return cols


# -- pooling ----------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _clip_window(o, s, pad, k, size):
    """First input index of output o's window and the valid window offsets [k0, k1)."""
    start = o * s - pad
    return start, max(0, -start), min(k, size - start)


@with_serial_twin
@njit(**_JIT)
def _maxpool_forward(x, ph, pw, sh, sw, top, left, y, argmax):
    # Channels innermost (contiguous in NHWC), the running maxima in a row of the task's own, and
    # comparisons as selects: the loop vectorizes. Ties go to the first maximum, NaN never wins.
    n, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    for b in prange(n):
        best = np.empty(c, dtype=x.dtype)
        where = np.empty(c, dtype=np.int32)
        for i in range(oh):
            hi, a0, a1 = _clip_window(i, sh, top, ph, h)
            for j in range(ow):
                wi, d0, d1 = _clip_window(j, sw, left, pw, w)
                k0 = a0 * pw + d0
                for ch in range(c):
                    best[ch] = x[b, hi + a0, wi + d0, ch]
                    where[ch] = k0
                for a in range(a0, a1):
                    for d in range(d0, d1):
                        k = np.int32(a * pw + d)
                        for ch in range(c):
                            v, m = x[b, hi + a, wi + d, ch], best[ch]
                            take = v > m  # strict: ties go to the first, as in the reference
                            best[ch] = v if take else m
                            where[ch] = k if take else where[ch]
                for ch in range(c):
                    y[b, i, j, ch] = best[ch]
                    argmax[b, i, j, ch] = where[ch]


@with_serial_twin
@njit(**_JIT)
def _maxpool2x2_forward(x, y, argmax):
    """_maxpool_forward for 2x2 windows at stride 2 without padding (every window whole): the same
    comparisons in the same order (window entries 0, 1, 2, 3; strict >), unrolled. Week2's pool over
    64 images of 24x24x10 on one thread of a Zen 3 guest: 1.96-2.32 ms -> 0.30-0.55 ms. (Its backward
    is _maxpool2x2_backward.)"""
    n = x.shape[0]
    _, oh, ow, c = y.shape
    for b in prange(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    m, k = x[b, 2 * i, 2 * j, ch], np.int32(0)
                    v = x[b, 2 * i, 2 * j + 1, ch]
                    m, k = (v, np.int32(1)) if v > m else (m, k)
                    v = x[b, 2 * i + 1, 2 * j, ch]
                    m, k = (v, np.int32(2)) if v > m else (m, k)
                    v = x[b, 2 * i + 1, 2 * j + 1, ch]
                    m, k = (v, np.int32(3)) if v > m else (m, k)
                    y[b, i, j, ch] = m
                    argmax[b, i, j, ch] = k


@with_serial_twin
@njit(**_JIT)
def _maxpool2x2_backward(dy, argmax, dx):
    """_maxpool_backward for 2x2 windows at stride 2 without padding: every input entry belongs to
    at most one window, so each is written once (no zeroing pass and += for the general scatter,
    whose k // pw and k % pw cost two integer divisions an entry). Two loop forms, the same values:
    where a pixel's channels are whole groups of 4 the entries are gathered in memory order (the
    channel loop vectorizes); otherwise (Week2's 10 channels, whose 2-lane tail runs scalar) the
    image is zeroed and each window's maximum placed. 64 images of 24x24xc on one Zen 3 thread,
    ms, general scatter -> this: c = 10 0.41 -> 0.14, 16 0.69 -> 0.08-0.09, 64 2.7-3.0 -> 0.32-0.48."""
    n, oh, ow, c = dy.shape
    h, w = dx.shape[1], dx.shape[2]
    dyf, af, dxf = dy.reshape(-1), argmax.reshape(-1), dx.reshape(-1)
    zero = dy.dtype.type(0)
    r = w * c  # one input row
    for b in prange(n):
        image = b * h * r
        if c % 4:
            for e in range(h * r):
                dxf[U(image + e)] = zero
            for i in range(oh):
                for j in range(ow):
                    go = ((b * oh + i) * ow + j) * c
                    o = image + 2 * i * r + 2 * j * c
                    for ch in range(c):
                        k = af[U(go + ch)]
                        dxf[U(o + (k >> 1) * r + (k & 1) * c + ch)] = dyf[U(go + ch)]
            continue
        for i in range(oh):
            for a in range(2):
                xo = image + (2 * i + a) * r
                for j in range(ow):
                    go = ((b * oh + i) * ow + j) * c
                    for d in range(2):
                        k = np.int32(2 * a + d)
                        o = xo + (2 * j + d) * c
                        for ch in range(c):
                            dxf[U(o + ch)] = dyf[U(go + ch)] if af[U(go + ch)] == k else zero
                for e in range(2 * ow * c, r):  # an odd width's last column: in no window
                    dxf[U(xo + e)] = zero
        for e in range(2 * oh * r, h * r):  # an odd height's last row
            dxf[U(image + e)] = zero


@with_serial_twin
@njit(**_JIT)
def _maxpool_backward(dy, argmax, pw, sh, sw, top, left, dx):
    n, oh, ow, c = dy.shape
    for b in prange(n):
        dx[b] = 0.0
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    k = argmax[b, i, j, ch]
                    dx[b, i * sh + k // pw - top, j * sw + k % pw - left, ch] += dy[b, i, j, ch]


@with_serial_twin
@njit(**_JIT)
def _avgpool_forward(x, ph, pw, sh, sw, top, left, y):
    # Channels innermost (contiguous in NHWC: the loop vectorizes), each window summed in float64
    # in (a, d) order. 32 images of 28x28x64, 2x2, Xeon KVM, 3 interleaved rounds: 1.39-2.11 ms with
    # the channel loop outermost, 0.36-0.40 ms so. Flat unsigned indices (no negative-index
    # wraparound to check on each load; the backward's too), the same bits: Zen 3 guest, 2 threads,
    # through the kernel entry, 2 interleaved rounds: 0.39-0.40 -> 0.18-0.22 ms (the backward's:
    # 0.39-0.53 -> 0.46-0.48, no change).
    n, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    xf, yf = x.reshape(-1), y.reshape(-1)
    for b in prange(n):
        total = np.empty(c, dtype=np.float64)
        for i in range(oh):
            hi, a0, a1 = _clip_window(i, sh, top, ph, h)
            for j in range(ow):
                wi, d0, d1 = _clip_window(j, sw, left, pw, w)
                count = (a1 - a0) * (d1 - d0)
                for ch in range(c):
                    total[ch] = 0.0
                for a in range(a0, a1):
                    for d in range(d0, d1):
                        xo = ((b * h + hi + a) * w + wi + d) * c
                        for ch in range(c):
                            total[ch] += xf[U(xo + ch)]
                yo = ((b * oh + i) * ow + j) * c
                for ch in range(c):
                    yf[U(yo + ch)] = total[ch] / count


@with_serial_twin
@njit(**_JIT)
def _avgpool_backward(dy, ph, pw, sh, sw, top, left, dx):
    n, h, w, c = dx.shape
    _, oh, ow, _ = dy.shape
    dyf, dxf = dy.reshape(-1), dx.reshape(-1)
    for b in prange(n):
        for e in range(h * w * c):
            dxf[U(b * h * w * c + e)] = 0.0
        for i in range(oh):
            hi, a0, a1 = _clip_window(i, sh, top, ph, h)
            for j in range(ow):
                wi, d0, d1 = _clip_window(j, sw, left, pw, w)
                count = (a1 - a0) * (d1 - d0)
                go = ((b * oh + i) * ow + j) * c
                for a in range(a0, a1):
                    for d in range(d0, d1):
                        xo = ((b * h + hi + a) * w + wi + d) * c
                        for ch in range(c):
                            dxf[U(xo + ch)] += dyf[U(go + ch)] / count


# -- depthwise convolution (MobileNet's blocks): one image per task, channels innermost ---------------
# With one filter per channel (depth multiplier 1, MobileNet's case) the innermost loop runs over
# the contiguous channels of x, z and the kernel at once, and vectorizes; with several, over each
# channel's filters. Both sum every output in the same (a, d) order, so they agree bit for bit.
# Multiplier 1, 32 images of 28x28x64, 3x3 'same', 2 threads on a Xeon KVM, four interleaved
# rounds: forward 5.4-22.8 -> 1.8-2.8 ms, backward (dx and dw) 15.4-25.6 -> 2.6-3.8 ms, against
# the loop over a single filter innermost (which ran scalar). The multiplier-1 loops then moved to
# flat unsigned indices (as the generated convolutions use: no negative-index wraparound to check),
# bit-identical. Zen 5 guest, the same shapes, four interleaved rounds through the kernel entries
# (padding and allocations included): backward 1.92-2.54 -> 1.61-1.79 ms, forward 1.07-1.47 ->
# 1.19-1.28 ms (the loops alone: 0.79-1.11 -> 0.76-0.88 and 1.96-2.30 -> 1.55-1.60).
@with_serial_twin
@njit(**_JIT)
def _depthwise1_forward(xpad, kernel, sh, sw, z):
    """Multiplier 1: z[b, i, j, ch] = sum over (a, d) of x[b, i*sh + a, j*sw + d, ch] * k[a, d, ch]."""
    n, oh, ow, c = z.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    hp, wp = xpad.shape[1], xpad.shape[2]
    xf, kf, zf = xpad.reshape(-1), kernel.reshape(-1), z.reshape(-1)
    for b in prange(n):
        for i in range(oh):
            for j in range(ow):
                zo = ((b * oh + i) * ow + j) * c
                for ch in range(c):
                    zf[U(zo + ch)] = 0.0
                for a in range(kh):
                    for d in range(kw):
                        xo = ((b * hp + i * sh + a) * wp + j * sw + d) * c
                        ko = (a * kw + d) * c
                        for ch in range(c):
                            zf[U(zo + ch)] += xf[U(xo + ch)] * kf[U(ko + ch)]


# A 3x3 kernel with one filter per channel (MobileNet's case) runs on the unpadded input: an output
# whose nine taps all fall inside the image sums them in registers, in the (a, d) order of the
# padded loops (one store per output instead of a read-modify-write per tap), and one on the border
# skips the taps outside (what padding adds there is 0). So the results are the bits of the padded
# loops (_depthwise1_forward and _backward; a zero's sign aside), without the padded copy of the
# input (forward and backward) and the padded input gradient's zeroing and cropping (backward).
# 32 images of 28x28x64, 'same', 2 threads of a Zen 3 guest, through the kernel entries, 3
# interleaved rounds against the padded loops: forward 1.84-2.52 -> 0.68-0.79 ms, backward (dx and
# dw) 2.25-3.14 -> 1.53-2.31 ms. (The registers alone, on a padded input: 0.95 -> 0.68 ms; the
# padded copy cost about 0.6 ms more.)
@njit(inline="always")
def _tap_rows(i, sh, top, h):
    """The first and last+1 of the kernel rows a (0..2) whose input row i*sh + a - top is inside."""
    r = i * sh - top
    return max(0, -r), min(3, h - r)


@with_serial_twin
@njit(**_JIT)
def _depthwise3x3_forward(x, kernel, sh, sw, top, left, z):
    n, oh, ow, c = z.shape
    h, w = x.shape[1], x.shape[2]
    xf, kf, zf = x.reshape(-1), kernel.reshape(-1), z.reshape(-1)
    r = w * c  # one input row
    for b in prange(n):
        for i in range(oh):
            a0, a1 = _tap_rows(i, sh, top, h)
            for j in range(ow):
                d0, d1 = _tap_rows(j, sw, left, w)
                zo = ((b * oh + i) * ow + j) * c
                if a0 == 0 and a1 == 3 and d0 == 0 and d1 == 3:
                    x0 = ((b * h + i * sh - top) * w + j * sw - left) * c
                    x1, x2 = x0 + r, x0 + 2 * r
                    for ch in range(c):
                        s = xf[U(x0 + ch)] * kf[U(ch)]
                        s += xf[U(x0 + c + ch)] * kf[U(c + ch)]
                        s += xf[U(x0 + 2 * c + ch)] * kf[U(2 * c + ch)]
                        s += xf[U(x1 + ch)] * kf[U(3 * c + ch)]
                        s += xf[U(x1 + c + ch)] * kf[U(4 * c + ch)]
                        s += xf[U(x1 + 2 * c + ch)] * kf[U(5 * c + ch)]
                        s += xf[U(x2 + ch)] * kf[U(6 * c + ch)]
                        s += xf[U(x2 + c + ch)] * kf[U(7 * c + ch)]
                        s += xf[U(x2 + 2 * c + ch)] * kf[U(8 * c + ch)]
                        zf[U(zo + ch)] = s
                else:
                    for ch in range(c):
                        zf[U(zo + ch)] = 0.0
                    for a in range(a0, a1):
                        for d in range(d0, d1):
                            xo = ((b * h + i * sh + a - top) * w + j * sw + d - left) * c
                            ko = (a * 3 + d) * c
                            for ch in range(c):
                                zf[U(zo + ch)] += xf[U(xo + ch)] * kf[U(ko + ch)]


@with_serial_twin
@njit(**_JIT)
def _depthwise3x3_backward(x, dz, kernel, sh, sw, top, left, need_dx, partial, dx):
    """_depthwise1_backward for a 3x3 kernel on the unpadded input: partial[b] and dx[b] (unpadded).
    Each tap's products stay a loop of their own (two arrays each: it vectorizes; the nine taps in
    one loop body touch 20 arrays that may overlap, and ran scalar, 3.5x slower). At stride 1, dx
    is gathered after the image's kernel gradient, each entry's nine products summed in registers
    and stored once, in the order the scatter adds them (the same bits): 32 images of 28x28x64 on 2
    threads of a Zen 3 guest, 9 alternating pairs, 1.60-2.09 -> 1.46-1.78 ms (8 of 9 faster)."""
    n, oh, ow, c = dz.shape
    h, w = x.shape[1], x.shape[2]
    xf, dzf, kf = x.reshape(-1), dz.reshape(-1), kernel.reshape(-1)
    pf, dxf = partial.reshape(-1), dx.reshape(-1)
    scatter = need_dx and not (sh == 1 and sw == 1)
    for b in prange(n):
        po = b * 9 * c
        for e in range(9 * c):
            pf[U(po + e)] = 0.0
        if scatter:
            for e in range(h * w * c):
                dxf[U(b * h * w * c + e)] = 0.0
        for i in range(oh):
            a0, a1 = _tap_rows(i, sh, top, h)
            for j in range(ow):
                d0, d1 = _tap_rows(j, sw, left, w)
                go = ((b * oh + i) * ow + j) * c
                for a in range(a0, a1):
                    for d in range(d0, d1):
                        xo = ((b * h + i * sh + a - top) * w + j * sw + d - left) * c
                        to = po + (a * 3 + d) * c
                        for ch in range(c):
                            pf[U(to + ch)] += xf[U(xo + ch)] * dzf[U(go + ch)]
                        if scatter:
                            ko = (a * 3 + d) * c
                            for ch in range(c):
                                dxf[U(xo + ch)] += dzf[U(go + ch)] * kf[U(ko + ch)]
        if need_dx and not scatter:
            _depthwise3x3_gather_dx(dzf, kf, b, h, w, oh, ow, c, top, left, dxf)


@njit(inline="always")
def _depthwise3x3_gather_dx(dzf, kf, b, h, w, oh, ow, c, top, left, dxf):
    """Image b's input gradient at stride 1: dx[y, x] sums dz[y + top - a, x + left - d] * k[a, d]
    over the taps inside, in the scatter's order (a, then d, from 2 down to 0)."""
    r = ow * c  # one output-gradient row
    for y in range(h):
        for xx in range(w):
            o = ((b * h + y) * w + xx) * c
            i0, j0 = y + top - 2, xx + left - 2  # the output-gradient pixel of tap (2, 2)
            if i0 >= 0 and i0 + 2 < oh and j0 >= 0 and j0 + 2 < ow:
                g0 = ((b * oh + i0) * ow + j0) * c
                g1, g2 = g0 + r, g0 + 2 * r
                for ch in range(c):
                    s = dzf[U(g0 + ch)] * kf[U(8 * c + ch)]
                    s += dzf[U(g0 + c + ch)] * kf[U(7 * c + ch)]
                    s += dzf[U(g0 + 2 * c + ch)] * kf[U(6 * c + ch)]
                    s += dzf[U(g1 + ch)] * kf[U(5 * c + ch)]
                    s += dzf[U(g1 + c + ch)] * kf[U(4 * c + ch)]
                    s += dzf[U(g1 + 2 * c + ch)] * kf[U(3 * c + ch)]
                    s += dzf[U(g2 + ch)] * kf[U(2 * c + ch)]
                    s += dzf[U(g2 + c + ch)] * kf[U(c + ch)]
                    s += dzf[U(g2 + 2 * c + ch)] * kf[U(ch)]
                    dxf[U(o + ch)] = s
            else:
                for ch in range(c):
                    dxf[U(o + ch)] = 0.0
                for a in range(2, -1, -1):
                    i = y + top - a
                    if 0 <= i < oh:
                        for d in range(2, -1, -1):
                            j = xx + left - d
                            if 0 <= j < ow:
                                go = ((b * oh + i) * ow + j) * c
                                ko = (a * 3 + d) * c
                                for ch in range(c):
                                    dxf[U(o + ch)] += dzf[U(go + ch)] * kf[U(ko + ch)]


@with_serial_twin
@njit(**_JIT)
def _depthwise1_backward(xpad, dz, kernel, sh, sw, need_dx, partial, dxpad):
    """Multiplier 1: partial[b], image b's share of the kernel gradient (summed by the caller in a
    fixed order); dxpad[b], image b's input gradient, padded."""
    n, oh, ow, c = dz.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    hp, wp = xpad.shape[1], xpad.shape[2]
    xf, dzf, kf = xpad.reshape(-1), dz.reshape(-1), kernel.reshape(-1)
    pf, dxf = partial.reshape(-1), dxpad.reshape(-1)
    for b in prange(n):
        po = b * kh * kw * c
        for e in range(kh * kw * c):
            pf[U(po + e)] = 0.0
        if need_dx:
            for e in range(hp * wp * c):
                dxf[U(b * hp * wp * c + e)] = 0.0
        for i in range(oh):
            for j in range(ow):
                go = ((b * oh + i) * ow + j) * c
                for a in range(kh):
                    for d in range(kw):
                        xo = ((b * hp + i * sh + a) * wp + j * sw + d) * c
                        to = po + (a * kw + d) * c
                        for ch in range(c):
                            pf[U(to + ch)] += xf[U(xo + ch)] * dzf[U(go + ch)]
                        if need_dx:
                            ko = (a * kw + d) * c
                            for ch in range(c):
                                dxf[U(xo + ch)] += dzf[U(go + ch)] * kf[U(ko + ch)]


@with_serial_twin
@njit(**_JIT)
def _depthwise_forward(xpad, kernel, sh, sw, z):
    """Multiplier m > 1: output channel ch * m + q is channel ch convolved with filter q."""
    n, oh, ow, cm = z.shape
    kh, kw, c, m = kernel.shape
    for b in prange(n):
        z[b] = 0.0
        for i in range(oh):
            for j in range(ow):
                for a in range(kh):
                    for d in range(kw):
                        for ch in range(c):
                            v = xpad[b, i * sh + a, j * sw + d, ch]
                            for q in range(m):
                                z[b, i, j, ch * m + q] += v * kernel[a, d, ch, q]


@with_serial_twin
@njit(**_JIT)
def _depthwise_backward(xpad, dz, kernel, sh, sw, need_dx, partial, dxpad):
    """Multiplier m > 1; as _depthwise1_backward."""
    n, oh, ow, cm = dz.shape
    kh, kw, c, m = kernel.shape
    for b in prange(n):
        partial[b] = 0.0
        if need_dx:
            dxpad[b] = 0.0
        for i in range(oh):
            for j in range(ow):
                for a in range(kh):
                    for d in range(kw):
                        for ch in range(c):
                            v = xpad[b, i * sh + a, j * sw + d, ch]
                            g = 0.0
                            for q in range(m):
                                dzq = dz[b, i, j, ch * m + q]
                                partial[b, a, d, ch, q] += v * dzq
                                g += dzq * kernel[a, d, ch, q]
                            if need_dx:
                                dxpad[b, i * sh + a, j * sw + d, ch] += g


# -- ReLU, BatchNormalization, Dropout -----------------------------------------------------------------
@with_serial_twin
@njit(**_JIT)
def _relu_backward(dy, y, dx):
    fdy, fy, fdx = dy.reshape(-1), y.reshape(-1), dx.reshape(-1)
    for i in prange(fdy.size):
        fdx[i] = fdy[i] if fy[i] > 0 else 0.0


# BatchNormalization over the rows of (M, C), optionally fused with the Dropout after it.
# Statistics: one pass, float64 sums of x - shift (shift = the first row, so the variance does not
# cancel); each of _BLOCKS row blocks sums into its own partial row and the partials are added in a
# fixed order, so results do not depend on the thread count. Backward recomputes xhat from x instead
# of storing it: forward writes one tensor (y), not two. The loops index flat arrays with unsigned
# offsets, as the convolutions do (a 2-D index x2d[r, ch] pays a negative-index check on each load):
# the same bits, and on one Zen 3 thread over 64 images of Week2's conv2 (36864 x 16) the backward's
# sums 0.40 -> 0.24 ms, the statistics 0.20 -> 0.17; at conv4's 6400 x 10, 0.135 -> 0.054 and the
# backward's dx 0.159 -> 0.069.
_BLOCKS = 64


@intrinsic
def _keep_from_hash_input(typingctx, h, threshold):
    """The dropout decision for h = index ^ key, in 32-bit integers: (lowbias32(h) >> 8) >= threshold.

    Why an intrinsic: the hash's last steps are 32-bit (every product is masked to 32 bits, and
    only h's low 32 bits and the 32 above them shifted by 16 reach the first product), but numba
    widens integer arithmetic to 64 bits, and AVX2 has no 64-bit multiply: LLVM vectorized the
    numba-typed hash 4 lanes at a time with emulated products. Written in i32 here, it runs 8 lanes
    with vpmulld: Week2 conv2's mask over 64 images (590K entries) on one Zen 3 thread, 0.47 -> 0.19 ms.
    The same bits as the reference's lowbias32 (tests compare every mask)."""
    sig = types.boolean(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        h, limit = args
        i32 = ir.IntType(32)

        def shifted(a, n):
            return builder.xor(a, builder.lshr(a, ir.Constant(i32, n)))

        # low32(h ^ (h >> 16)): the 64-bit shift brings bits 16..47 down
        a = builder.xor(builder.trunc(h, i32), builder.trunc(builder.lshr(h, ir.Constant(h.type, 16)), i32))
        a = shifted(builder.mul(a, ir.Constant(i32, 0x7FEB352D)), 15)
        a = shifted(builder.mul(a, ir.Constant(i32, 0x846CA68B)), 16)
        # the threshold is below 2**24 (dropout_keep_threshold): truncating it loses nothing
        return builder.icmp_unsigned(">=", builder.lshr(a, ir.Constant(i32, 8)), builder.trunc(limit, i32))

    return sig, codegen


@njit(cache=True, inline="always")
def _hash_keep(i, key, threshold):
    """The counter-based dropout decision of the reference set, for element index i."""
    return _keep_from_hash_input(np.uint64(i) ^ key, threshold)


@njit(cache=True, inline="always")
def _raised(v, floor):
    """max(v, floor) as the direct convolution stores a ReLU (NaN and -0.0 stay): a select, no branch."""
    return floor if v < floor else v


@njit(cache=True, inline="always")
def _blocks_added(partial):
    """(blocks, 2, c) partial sums -> (2, c), added in block order (no dependence on the threads)."""
    c = partial.shape[2]
    total = np.zeros((2, c), dtype=np.float64)
    for blk in range(partial.shape[0]):
        for ch in range(c):
            total[0, ch] += partial[blk, 0, ch]
            total[1, ch] += partial[blk, 1, ch]
    return total


@with_serial_twin
@njit(**_JIT)
def _bn_block_sums(x2d, floor, shift):
    """Float64 sums of (x - shift) and (x - shift)^2 per column, (2, c) (x raised to `floor`: 0 for a
    ReLU read inside, -inf for none): one partial row pair per block of rows (the blocks run in
    parallel), then added in block order."""
    m, c = x2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, 2, c), dtype=np.float64)
    xf, pf = x2d.reshape(-1), partial.reshape(-1)
    for blk in prange(_BLOCKS):
        po = blk * 2 * c
        for r in range(blk * step, min(m, (blk + 1) * step)):
            ro = r * c
            for ch in range(c):
                v = np.float64(_raised(xf[U(ro + ch)], floor)) - shift[U(ch)]
                pf[U(po + ch)] += v
                pf[U(po + c + ch)] += v * v
    return _blocks_added(partial)


@njit(cache=True, nogil=True)
def _bn_moments(sums, shift, m, eps, mean, var, inv_std):
    """mean, var and 1 / sqrt(var + eps) per column, in the arrays' dtype, from the float64 sums of
    x - shift and (x - shift)^2 over m rows. One call instead of ten NumPy operations on arrays of c
    values (36 us a layer, a Week2 step pays 7)."""
    for ch in range(shift.shape[0]):
        d = sums[0, ch] / m
        v = sums[1, ch] / m - d * d
        if v < 0.0:  # np.maximum(v, 0): a NaN stays
            v = 0.0
        mean[ch] = shift[ch] + d
        var[ch] = v
        inv_std[ch] = 1.0 / np.sqrt(v + eps)


def _bn_stats(x2d, floor, eps):
    """Mean, biased variance and 1 / sqrt(variance + eps) per column, in x2d's dtype, of x2d raised
    to `floor` (cpu_conv.relu_floor), from float64 sums shifted by the first row (less cancellation)."""
    m, c = x2d.shape
    shift = x2d[0].astype(np.float64)
    shift = np.where(shift < floor, floor, shift)  # the first row as the kernels read it (_raised)
    mean, var, inv_std = (np.empty(c, dtype=x2d.dtype) for _ in range(3))
    _bn_moments(_bn_block_sums(x2d, floor, shift), shift, m, eps, mean, var, inv_std)
    return mean, var, inv_std


@with_serial_twin
@njit(**_JIT)
def _bn_normalize(x2d, floor, mean, inv_std, gamma, beta, key, threshold, scale, use_dropout, offset, y, keep):
    m, c = x2d.shape
    xf, yf, kf = x2d.reshape(-1), y.reshape(-1), keep.reshape(-1)
    step = (m + _BLOCKS - 1) // _BLOCKS
    for blk in prange(_BLOCKS):
        r0, r1 = blk * step, min(m, (blk + 1) * step)
        if use_dropout:  # the block's mask first, in one long loop (a row's c entries vectorize badly: c = 10)
            for e in range(r0 * c, r1 * c):
                kf[U(e)] = _hash_keep(offset + e, key, threshold)
        for r in range(r0, r1):
            ro = r * c
            for ch in range(c):
                i = U(ro + ch)
                v = (_raised(xf[i], floor) - mean[U(ch)]) * inv_std[U(ch)] * gamma[U(ch)] + beta[U(ch)]
                if use_dropout:
                    v = v * scale if kf[i] else 0.0
                yf[i] = v


@with_serial_twin
@njit(**_JIT)
def _bn_backward_sums(dy2d, x2d, floor, mean, inv_std, keep, scale, use_mask):
    m, c = dy2d.shape
    step = (m + _BLOCKS - 1) // _BLOCKS
    partial = np.zeros((_BLOCKS, 2, c), dtype=np.float64)
    dyf, xf, kf, pf = dy2d.reshape(-1), x2d.reshape(-1), keep.reshape(-1), partial.reshape(-1)
    for blk in prange(_BLOCKS):
        po = blk * 2 * c
        for r in range(blk * step, min(m, (blk + 1) * step)):
            ro = r * c
            for ch in range(c):
                i = U(ro + ch)
                g = dyf[i]
                if use_mask:
                    g = g * scale if kf[i] else 0.0
                pf[U(po + ch)] += g
                pf[U(po + c + ch)] += g * ((_raised(xf[i], floor) - mean[U(ch)]) * inv_std[U(ch)])
    return _blocks_added(partial)


@with_serial_twin
@njit(**_JIT)
def _bn_backward_dx(dy2d, x2d, floor, mean, inv_std, keep, scale, use_mask, k, dbeta_m, dgamma_m, dx):
    """dx; with floor 0 (a ReLU read inside), the gradient through the ReLU too: dx where x > 0, else
    0. `| no_relu`, not `or`: no branch in the loop, which LLVM then vectorizes."""
    m, c = dy2d.shape
    no_relu = floor < 0
    zero = x2d.dtype.type(0)
    dyf, xf, kf, dxf = dy2d.reshape(-1), x2d.reshape(-1), keep.reshape(-1), dx.reshape(-1)
    for r in prange(m):
        ro = r * c
        for ch in range(c):
            i = U(ro + ch)
            g = dyf[i]
            if use_mask:
                g = g * scale if kf[i] else 0.0
            v = xf[i]
            xhat = (_raised(v, floor) - mean[U(ch)]) * inv_std[U(ch)]
            d = k[U(ch)] * (g - dbeta_m[U(ch)] - xhat * dgamma_m[U(ch)])
            dxf[i] = d if (v > zero) | no_relu else zero


@with_serial_twin
@njit(**_JIT)
def _bn_affine(x2d, gamma, beta, moving_mean, moving_var, eps, scale, y):
    """Inference: scale = gamma / sqrt(var + eps) and shift = beta - mean * scale in the parameters'
    dtype (the reference's NumPy expressions, in the same order), then y = x * scale + shift. The
    per-channel part in here, not in NumPy: five NumPy calls a layer were a tenth of predict on one
    image."""
    m, c = x2d.shape
    shift = np.empty(c, dtype=y.dtype)
    for ch in range(c):
        scale[ch] = gamma[ch] / np.sqrt(moving_var[ch] + eps)
        shift[ch] = beta[ch] - moving_mean[ch] * scale[ch]
    for r in prange(m):
        for ch in range(c):
            y[r, ch] = x2d[r, ch] * scale[ch] + shift[ch]


# Dropout alone (when no BatchNormalization precedes it): the same counter-based mask, stored as 0/1
# bytes; backward applies mask and scale in one pass.
@with_serial_twin
@njit(**_JIT)
def _dropout_forward(x, key, threshold, scale, offset, y, keep):
    flat_x, flat_y, flat_k = x.reshape(-1), y.reshape(-1), keep.reshape(-1)
    for i in prange(flat_x.size):
        k = _hash_keep(offset + i, key, threshold)
        flat_k[i] = k
        flat_y[i] = flat_x[i] * scale if k else 0.0


@with_serial_twin
@njit(**_JIT)
def _dropout_backward(dy, keep, scale, dx):
    flat_dy, flat_dx, flat_k = dy.reshape(-1), dx.reshape(-1), keep.reshape(-1)
    for i in prange(flat_dy.size):
        flat_dx[i] = flat_dy[i] * scale if flat_k[i] else 0.0


class CPUKernels(ReferenceKernels):
    """numba overrides of the reference set. `conv` chooses the convolution algorithm: 'direct'
    (register-blocked loops, cpu_conv) where it applies, 'gemm' (chunked im2col + OpenBLAS), or
    'auto': the GEMM for wide layers, the direct loops for the rest (see WIDE_CHANNELS)."""

    name = "cpu"
    # The BatchNorm kernels read a ReLU's output as max(z, 0) and apply its gradient as they write
    # dx: a training plan then runs Conv(relu) -> BatchNorm (-> Dropout) as one step (tinycnn.plan),
    # without the ReLU backward's pass over the activations.
    fuses_relu_batchnorm = True
    overrides = (
        "im2col", "col2im", "conv2d_forward", "conv2d_relu_forward", "conv2d_backward",
        "depthwise_conv2d_forward", "depthwise_conv2d_backward",
        "maxpool_forward", "maxpool_backward", "avgpool_forward", "avgpool_backward",
        "relu_backward",
        "batchnorm_forward_train", "batchnorm_backward_train", "batchnorm_forward_infer",
        "batchnorm_dropout_forward_train", "batchnorm_dropout_backward_train",
        "relu_batchnorm_forward_train", "relu_batchnorm_backward_train", "dropout_forward", "dropout_backward",
    )

    def __init__(self, conv="auto"):
        self.conv = conv

    def describe(self):
        detail = f" (direct; im2col + GEMM from {WIDE_CHANNELS} channels in and out)" if self.conv == "auto" else ""
        return f"cpu (numba; convolutions: {self.conv}{detail})"

    # -- convolution ----------------------------------------------------------------------------
    def im2col(self, x, kh, kw, stride, pads):
        n, h, w, c, oh, ow = _conv_sizes(x.shape, kh, kw, stride, pads)
        out = np.empty((n * oh * ow, kh * kw * c), dtype=x.dtype)
        _im2col(np.ascontiguousarray(x), kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, out)
        return out

    def col2im(self, cols, x_shape, kh, kw, stride, pads):
        _, _, _, _, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
        dx = np.empty(x_shape, dtype=cols.dtype)
        _col2im(np.ascontiguousarray(cols), kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx)
        return dx

    def _conv_algorithm(self, x, kernel2d):
        """'direct' or 'gemm': the convolution algorithm this set uses for x and kernel2d. 'auto'
        takes the GEMM for wide layers (WIDE_CHANNELS in and out), the direct loops elsewhere."""
        if self.conv == "gemm" or x.dtype not in (np.float32, np.float64):
            return "gemm"
        wide = x.shape[3] >= WIDE_CHANNELS and kernel2d.shape[1] >= WIDE_CHANNELS
        return "gemm" if self.conv == "auto" and wide else "direct"

    def conv2d_forward(self, x, kernel2d, kh, kw, stride, pads):
        """As the reference; `saved` is (algorithm, input), the algorithm that ran first."""
        return self._conv2d_forward(x, kernel2d, kh, kw, stride, pads, relu=False)

    def conv2d_relu_forward(self, x, kernel2d, kh, kw, stride, pads):
        """The direct convolution applies ReLU to each value as it leaves the registers (max(v, 0),
        one vmaxps): no second pass over z. Week2 predict over 10,000 images, 8 interleaved rounds
        on a noisy Xeon KVM, when it was a loop over each stored block: medians 0.56-0.67 s unfused,
        0.46-0.61 fused; as max on the registers, Week2 conv2's forward with ReLU costs what it
        costs without (Zen 3; cpu_conv_codegen says more)."""
        return self._conv2d_forward(x, kernel2d, kh, kw, stride, pads, relu=True)

    def _conv2d_forward(self, x, kernel2d, kh, kw, stride, pads, relu):
        x = np.ascontiguousarray(x)
        n, h, w, c, oh, ow = _conv_sizes(x.shape, kh, kw, stride, pads)
        algorithm = self._conv_algorithm(x, kernel2d)
        if algorithm == "direct":
            xpad = np.ascontiguousarray(pad_nhwc(x, pads))
            z = cpu_conv.forward(xpad, np.ascontiguousarray(kernel2d), kh, kw, stride, oh, ow, relu=relu)
            return z, (algorithm, xpad)
        chunk = _chunk(oh * ow * kh * kw * c * x.itemsize, n)
        z = np.empty((n * oh * ow, kernel2d.shape[1]), dtype=x.dtype)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            cols = _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow)
            np.matmul(cols, kernel2d, out=z[start * oh * ow : stop * oh * ow])
        if relu:
            np.maximum(z, 0, out=z)
        return z, (algorithm, x)

    def conv2d_backward(self, dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
        algorithm, x = saved
        dz = np.ascontiguousarray(dz)
        n, h, w, c, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
        if algorithm == "direct":
            cpu_conv.filter_grad(x, dz, kh, kw, stride, oh, ow, dkernel2d)
            if not need_dx:
                return None
            # The direct input gradient needs stride 1 and pads below the kernel size; with few input
            # channels its output (padded to 16 channels) wastes more than the GEMM + col2im costs.
            # It gathers, or scatters where the gather would multiply many of its padding's zeros.
            if stride == (1, 1) and max(pads[:2]) < kh and max(pads[2:]) < kw and c >= cpu_conv.LANES // 2:
                kernel2d = np.ascontiguousarray(kernel2d)
                if cpu_conv.scatter_beats_gather(c, h, w, oh, ow):
                    return cpu_conv.input_grad_scatter(dz, x_shape, kernel2d, kh, kw, stride, pads, oh, ow)
                return cpu_conv.input_grad(dz, x_shape, kernel2d, kh, kw, pads, oh, ow)
            return self._gemm_input_grad(dz, x_shape, kernel2d, kh, kw, stride, pads)
        rows = oh * ow
        chunk = _chunk(rows * kh * kw * c * x.itemsize, n)
        dkernel2d[...] = 0
        part = np.empty_like(dkernel2d)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            cols = _chunk_cols(x, start, stop, kh, kw, stride, pads, oh, ow)
            np.matmul(cols.T, dz[start * rows : stop * rows], out=part)
            dkernel2d += part
        return self._gemm_input_grad(dz, x_shape, kernel2d, kh, kw, stride, pads) if need_dx else None

    def _gemm_input_grad(self, dz, x_shape, kernel2d, kh, kw, stride, pads):
        """dx = col2im(dz @ kernel^T), a chunk of images at a time (the chunk's dcols stay in cache)."""
        n, h, w, c, oh, ow = _conv_sizes(x_shape, kh, kw, stride, pads)
        rows = oh * ow
        chunk = _chunk(rows * kh * kw * c * dz.itemsize, n)
        dx = np.empty(x_shape, dtype=dz.dtype)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            dcols = scratch_buffer("dcols", ((stop - start) * rows, kh * kw * c), dz.dtype)
            np.matmul(dz[start * rows : stop * rows], kernel2d.T, out=dcols)
            _col2im(dcols, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow, dx[start:stop])
        return dx

    def depthwise_conv2d_forward(self, x, kernel, stride, pads):
        """`saved` is (input, padded?): a 3x3 kernel with one filter per channel runs on the input
        as it is (the borders skip the taps outside), other kernels on a padded copy."""
        n, h, w, c = x.shape
        kh, kw, _, m = kernel.shape
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        z = np.empty((n, oh, ow, c * m), dtype=x.dtype)
        if (kh, kw, m) == (3, 3, 1):
            x = np.ascontiguousarray(x)
            _depthwise3x3_forward(x, np.ascontiguousarray(kernel), stride[0], stride[1], pads[0], pads[2], z)
            return z, (x, False)
        xpad = np.ascontiguousarray(pad_nhwc(x, pads))
        forward = _depthwise1_forward if m == 1 else _depthwise_forward
        forward(xpad, np.ascontiguousarray(kernel), stride[0], stride[1], z)
        return z, (xpad, True)

    def depthwise_conv2d_backward(self, dz, saved, x_shape, kernel, stride, pads, dkernel, need_dx):
        xpad, padded = saved
        n, h, w, c = x_shape
        top, _, left, _ = pads
        partial = np.empty((n,) + kernel.shape, dtype=dz.dtype)
        if not padded:
            dx = np.empty(x_shape if need_dx else (1, 1, 1, 1), dtype=dz.dtype)
            _depthwise3x3_backward(xpad, np.ascontiguousarray(dz), np.ascontiguousarray(kernel), stride[0], stride[1],
                                   top, left, need_dx, partial, dx)
            dkernel[...] = partial.sum(axis=0)  # a fixed order: no dependence on the thread count
            return dx if need_dx else None
        dxpad = np.empty(xpad.shape if need_dx else (1, 1, 1, 1), dtype=dz.dtype)
        backward = _depthwise1_backward if kernel.shape[3] == 1 else _depthwise_backward
        backward(xpad, np.ascontiguousarray(dz), np.ascontiguousarray(kernel), stride[0], stride[1], need_dx, partial,
                 dxpad)
        dkernel[...] = partial.sum(axis=0)  # a fixed order: no dependence on the thread count
        if not need_dx:
            return None
        return np.ascontiguousarray(dxpad[:, top : top + h, left : left + w, :])

    # -- pooling ------------------------------------------------------------------------------------
    def maxpool_forward(self, x, pool, stride, pads):
        n, h, w, c = x.shape
        oh, ow = output_hw(h, w, pool[0], pool[1], stride, pads)
        y = np.empty((n, oh, ow, c), dtype=x.dtype)
        argmax = np.empty((n, oh, ow, c), dtype=np.int32)
        if tuple(pool) == (2, 2) and tuple(stride) == (2, 2) and not any(pads):
            _maxpool2x2_forward(np.ascontiguousarray(x), y, argmax)
        else:
            _maxpool_forward(np.ascontiguousarray(x), pool[0], pool[1], stride[0], stride[1], pads[0], pads[2], y, argmax)
        return y, argmax

    def maxpool_backward(self, dy, argmax, x_shape, pool, stride, pads):
        dx = np.empty(x_shape, dtype=dy.dtype)
        if tuple(pool) == (2, 2) and tuple(stride) == (2, 2) and not any(pads):
            _maxpool2x2_backward(np.ascontiguousarray(dy), np.ascontiguousarray(argmax), dx)
        else:
            _maxpool_backward(np.ascontiguousarray(dy), argmax, pool[1], stride[0], stride[1], pads[0], pads[2], dx)
        return dx

    def avgpool_forward(self, x, pool, stride, pads):
        n, h, w, c = x.shape
        oh, ow = output_hw(h, w, pool[0], pool[1], stride, pads)
        y = np.empty((n, oh, ow, c), dtype=x.dtype)
        _avgpool_forward(np.ascontiguousarray(x), pool[0], pool[1], stride[0], stride[1], pads[0], pads[2], y)
        return y

    def avgpool_backward(self, dy, x_shape, pool, stride, pads):
        dx = np.empty(x_shape, dtype=dy.dtype)
        _avgpool_backward(np.ascontiguousarray(dy), pool[0], pool[1], stride[0], stride[1], pads[0], pads[2], dx)
        return dx

    # -- ReLU -----------------------------------------------------------------------------------------
    @_reference_when_empty
    def relu_backward(self, dy, y):
        """One pass instead of NumPy's two (a boolean temporary, then the product)."""
        dx = np.empty(dy.shape, dtype=dy.dtype)
        _relu_backward(np.ascontiguousarray(dy), np.ascontiguousarray(y), dx)
        return dx

    # -- BatchNormalization (empty inputs take the reference path, forward and backward alike) ----------
    def _bn_forward(self, x2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None, relu=False):
        """BatchNorm of x2d (of max(x2d, 0), read as each kernel reads x2d, when `relu`), then the
        dropout mask when rate > 0."""
        x2d = np.ascontiguousarray(x2d)
        floor = cpu_conv.relu_floor(x2d.dtype, relu)
        dtype = x2d.dtype
        if reduce is None:
            mean, var, inv_std = _bn_stats(x2d, floor, eps)
        else:  # the whole batch's moments, from every rank's sums (as the reference's global_moments)
            c = x2d.shape[1]
            shift = np.zeros(c)  # unshifted: the ranks' sums must add up
            sums = _bn_block_sums(x2d, floor, shift)
            totals = reduce(np.concatenate([sums.reshape(-1), [float(x2d.shape[0])]]))
            mean, var, inv_std = (np.empty(c, dtype=dtype) for _ in range(3))
            _bn_moments(totals[: 2 * c].reshape(2, c), shift, totals[2 * c], eps, mean, var, inv_std)
        y = np.empty_like(x2d)
        use_dropout = rate > 0.0
        keep = np.empty(x2d.shape if use_dropout else (1, 1), dtype=np.uint8)
        scale = dtype.type(1.0 / (1.0 - rate))
        key = np.uint64(mask_key(seed) if use_dropout else 0)
        _bn_normalize(x2d, floor, mean, inv_std, gamma, beta, key,
                      np.uint64(dropout_keep_threshold(rate)), scale, use_dropout, np.int64(offset), y, keep)
        saved = (x2d, floor, mean, keep if use_dropout else None, scale)
        if moving is not None:
            self.batchnorm_moving_update(moving[0], moving[1], mean, var, moving[2])
        return y, saved, mean, var, inv_std

    def _bn_backward(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        x2d, floor, mean, keep, scale = saved
        dy2d = np.ascontiguousarray(dy2d)
        m = dy2d.shape[0]
        use_mask = keep is not None
        keep = keep if use_mask else np.empty((1, 1), dtype=np.uint8)
        sums = _bn_backward_sums(dy2d, x2d, floor, mean, inv_std, keep, scale, use_mask)
        dtype = dy2d.dtype
        # this rank's, under data parallelism
        dgamma, dbeta = written_into(out, sums[1].astype(dtype), sums[0].astype(dtype))
        if reduce is not None:  # dx needs the sums and the row count of the whole batch
            total_beta, total_gamma, m = global_gradient_sums(sums[0], sums[1], m, reduce)
            sums = (total_beta, total_gamma)
        dx = np.empty_like(dy2d)
        # dx = gamma * inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = dy after the dropout mask
        _bn_backward_dx(dy2d, x2d, floor, mean, inv_std, keep, scale, use_mask,
                        (gamma * inv_std).astype(dtype), (sums[0] / m).astype(dtype), (sums[1] / m).astype(dtype), dx)
        return dx, dgamma, dbeta

    @_reference_when_empty
    def batchnorm_forward_train(self, x2d, gamma, beta, eps, reduce=None, moving=None):
        return self._bn_forward(x2d, gamma, beta, eps, 0.0, 0, 0, reduce, moving)

    @_reference_when_empty
    def batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    @_reference_when_empty
    def batchnorm_dropout_forward_train(self, x2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        return self._bn_forward(x2d, gamma, beta, eps, rate, seed, offset, reduce, moving)

    @_reference_when_empty
    def batchnorm_dropout_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    @_reference_when_empty
    def relu_batchnorm_forward_train(self, z2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        return self._bn_forward(z2d, gamma, beta, eps, rate, seed, offset, reduce, moving, relu=True)

    @_reference_when_empty
    def relu_batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        return self._bn_backward(dy2d, saved, gamma, inv_std, reduce, out)

    @_reference_when_empty
    def batchnorm_forward_infer(self, x2d, gamma, beta, moving_mean, moving_var, eps):
        """Inference: one pass of x * scale + shift (NumPy's version makes two, with a temporary)."""
        scale = np.empty(x2d.shape[1], dtype=x2d.dtype)
        y = np.empty(x2d.shape, dtype=x2d.dtype)
        _bn_affine(np.ascontiguousarray(x2d), gamma, beta, moving_mean, moving_var, moving_var.dtype.type(eps), scale, y)
        return y, scale

    # -- Dropout ---------------------------------------------------------------------------------------
    @_reference_when_empty
    def dropout_forward(self, x, rate, seed, offset=0):
        x = np.ascontiguousarray(x)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        y = np.empty_like(x)
        keep = np.empty(x.shape, dtype=np.uint8)
        _dropout_forward(x, np.uint64(mask_key(seed)), np.uint64(dropout_keep_threshold(rate)), scale,
                         np.int64(offset), y, keep)
        return y, (keep, scale)

    @_reference_when_empty
    def dropout_backward(self, dy, saved):
        keep, scale = saved
        dy = np.ascontiguousarray(dy)
        dx = np.empty_like(dy)
        _dropout_backward(dy, keep, scale, dx)
        return dx
