"""Direct convolution on the CPU: register-blocked numba loops instead of im2col + GEMM.

Why: a small-channel convolution (the Week2 model's 16->16 3x3) is a GEMM with only 16 columns,
where OpenBLAS reaches 60-90 GFLOP/s and the patch matrix costs a write and a read of 9x the
input. Here each output pixel block is computed straight from the input: 8 pixels x 16 filters
of accumulators (4 x 16 without AVX-512) live in vector registers through the whole (kh, kw, c)
reduction, each step one broadcast input value times one row of 16 filter weights. Measured on a
2-core Zen 5 machine, Week2 conv2 at batch 128 (340 MFLOP per pass): forward 1.0-1.6 ms, filter gradient 1.2-1.4 ms,
input gradient 1.3-1.5 ms, against 3.1-3.7 / 3.5 / 3.1 ms with im2col + GEMM.

The loops themselves are in cpu_conv_generated.py, written by cpu_conv_codegen.py (read it for
why they are generated). numba ships with LLVM's SLP vectorizer off (numba#8852: miscompilations
seen elsewhere), so it is switched on only while these kernels compile; tests compare every one
of them with the reference kernels on awkward shapes.

Layouts: filters are used in blocks of LANES; a layer with F % LANES != 0 gets zero columns, and
its outputs are written with the padded width, then sliced.
"""
import functools
import threading

import numba
import numpy as np
from numba.core import config as numba_config

from . import cpu_conv_generated as generated
from . import precompile
from .scratch import scratch_buffer
from .serial_twin import with_serial_twin

LANES = generated.LANES
IMAGES_PER_PARTIAL = 4  # filter-gradient partial sums: one per 4 images, summed in a fixed order
PARTIALS_BYTES = 16 << 20  # ...unless that many partials of a wide layer would pass this: then fewer
TASKS = 64  # parallel tasks per forward call (a few per thread on any core count here)
L1_BYTES = 16 << 10  # working set of one filter-gradient strip (a third of Zen 5's 48 KiB L1d)


class _SLPKernel:
    """A generated parallel kernel, compiled (or loaded from numba's disk cache) with the SLP
    vectorizer on, the first time it meets each dtype."""

    _lock = threading.Lock()

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._ready = set()

    def __call__(self, *args):
        dtype = args[0].dtype
        if dtype in self._ready:
            return self.dispatcher(*args)
        with self._lock:
            saved = numba_config.SLP_VECTORIZE
            numba_config.SLP_VECTORIZE = 1
            try:
                result = self.dispatcher(*args)
            finally:
                numba_config.SLP_VECTORIZE = saved
            self._ready.add(dtype)
        return result


# each with its serial twin (tinycnn.kernels.serial_twin), both compiled with SLP on
_direct_forward = {h: with_serial_twin(getattr(generated, f"direct_forward_{h}"), _SLPKernel)
                   for h in generated.HEIGHTS}
_direct_filter_grad = {h: with_serial_twin(getattr(generated, f"direct_filter_grad_{h}"), _SLPKernel)
                       for h in generated.HEIGHTS}
_input_grad_scatter = {h: with_serial_twin(getattr(generated, f"input_grad_scatter_{h}"), _SLPKernel)
                       for h in generated.HEIGHTS}


def _host_height():
    """The register block's height for this machine's vector registers. 8 x 16 float32 accumulators
    take 8 of AVX-512's 32 registers; in AVX2's 16 registers of 8 floats they take all 16 and spill,
    so other machines get 4 x 16. Measured on a 2-core Zen 3 (AVX2), Week2 conv2 over 64 images on
    one thread, 8 -> 4: forward 4.98 -> 3.05 ms, filter gradient 6.67 -> 3.50 ms (the same bits)."""
    from llvmlite import binding  # numba's own LLVM binding: the CPU numba compiles for

    return 8 if binding.get_host_cpu_features().get("avx512f") else 4


HEIGHT = _host_height()


def _blocks(filters):
    return -(-filters // LANES)


@functools.lru_cache(maxsize=256)
def _offsets(kh, kw, w, c):
    """xoff for an input row of width w: kernel element (i, j, ch) -> i*w*c + j*c + ch. Cached: a
    step asks for the same few (15 calls per Week2 step, 2 ms of meshgrid before the cache); the
    kernels only read it."""
    i, j, ch = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(c), indexing="ij")
    return np.ascontiguousarray((i * w * c + j * c + ch).reshape(-1), dtype=np.uint64)


def _pack_weights(kernel2d):
    """(K, F) -> (blocks, K, LANES), zero columns past F."""
    k, f = kernel2d.shape
    nb = _blocks(f)
    if f == LANES:  # one whole block: the layout as it is (a copy cost 5 us a call, 8 a Week2 forward)
        return np.ascontiguousarray(kernel2d).reshape(1, k, LANES)
    padded = np.zeros((k, nb * LANES), dtype=kernel2d.dtype)
    padded[:, :f] = kernel2d
    return np.ascontiguousarray(padded.reshape(k, nb, LANES).transpose(1, 0, 2))


def _strides(x, stride):
    """Element strides between images, output rows and output columns of a padded NHWC input."""
    _, hp, wp, c = x.shape
    return hp * wp * c, stride[0] * wp * c, stride[1] * c


def _pixel_chunk(total, height):
    """Output pixels per parallel task: a multiple of the block's height (one partial block per
    batch, at the end), about TASKS tasks so threads balance."""
    return max(height, -(-total // (TASKS * height)) * height)


def relu_floor(dtype, relu):
    """What the kernels raise a value to as they store or read it: 0 applies a ReLU (max(v, 0)),
    -inf changes nothing (the direct forward's stores here; the BatchNorm kernels' reads in
    tinycnn.kernels.cpu)."""
    return np.dtype(dtype).type(0 if relu else -np.inf)


def _forward_operands(xpad, kernel2d, kh, kw, stride):
    """The generated forward's leading and trailing operands: (xf, xoff, wf, zero) and the strides."""
    _, _, wp, c = xpad.shape
    return ((xpad.reshape(-1), _offsets(kh, kw, wp, c), _pack_weights(kernel2d).reshape(-1), xpad.dtype.type(0)),
            _strides(xpad, stride))


def forward(xpad, kernel2d, kh, kw, stride, oh, ow, relu=False, height=None):
    """Convolution of an already padded NHWC input: (N*OH*OW, F); relu: max(., 0) of it (NaN stays
    NaN, -0.0 stays -0.0), applied to each value as it is stored (no second pass over the output).
    height: the register block's (None: this machine's, HEIGHT)."""
    height = height or HEIGHT
    n = xpad.shape[0]
    f = kernel2d.shape[1]
    nb = _blocks(f)
    # Rows of f values where one block holds every filter (the loops' stores spill into the next
    # row and are overwritten: Week2's 1x1 16 -> 10 convolution over 64 images on a Zen 3, 0.60 ->
    # 0.30 ms), else of nb * LANES, whose padding columns are then dropped by a copy.
    fo = f if nb == 1 else nb * LANES
    out = np.empty((n * oh * ow, fo), dtype=xpad.dtype)
    (xf, xoff, wf, zero), strides = _forward_operands(xpad, kernel2d, kh, kw, stride)
    _direct_forward[height](xf, xoff, wf, out.reshape(-1), zero, relu_floor(xpad.dtype, relu), n, oh, ow, nb, fo,
                            *strides, _pixel_chunk(n * oh * ow, height))
    return out if f == fo else np.ascontiguousarray(out[:, :f])


def forward_task(xpad, kernel2d, kh, kw, stride, oh, ow, p0, p1, out, fo, height=None):
    """One task of forward's parallel loop on its own: output pixels p0..p1-1 of the (unrelu'd)
    convolution into the flat array `out`, whose rows are `fo` long (forward's choice: F, or whole
    blocks of LANES). A task must write its pixels and nothing else; the tests hold it to that."""
    task = getattr(generated, f"forward_pixels_{height or HEIGHT}")
    (xf, xoff, wf, zero), strides = _forward_operands(xpad, kernel2d, kh, kw, stride)
    task(xf, xoff, wf, out, zero, relu_floor(xpad.dtype, False), p0, p1, oh, ow, _blocks(kernel2d.shape[1]), fo,
         *strides)


def _padded_filters(dz2d):
    """(rows, F) -> (rows, blocks*LANES) with zero columns: the layout the kernels read."""
    f = dz2d.shape[1]
    fp = _blocks(f) * LANES
    if f == fp:
        return np.ascontiguousarray(dz2d)
    out = np.zeros((dz2d.shape[0], fp), dtype=dz2d.dtype)
    out[:, :f] = dz2d
    return out


def _strip_rows(ow, nb, wp, c, kh, itemsize):
    """Output rows per strip: the strip's output gradient and input rows fit in L1_BYTES."""
    per_row = (ow * nb * LANES + wp * c) * itemsize
    return max(1, L1_BYTES // per_row - (kh - 1))


def _await_compile_helper(dtype):
    """Before a kernel that a first run's helper process compiles (kernels.precompile): on one numba
    thread the serial twin runs, which the helper may be writing into the cache; wait for it."""
    if numba.get_num_threads() == 1:
        precompile.wait_for_helper(dtype)


def filter_grad(xpad, dz2d, kh, kw, stride, oh, ow, dkernel2d, height=None, own_rows=True):
    """dkernel2d[k, f] = sum over output pixels of patch[k] * dz[f], from the padded input; height
    as forward's. own_rows=False: dz2d's rows padded to LANES by a copy even where F < LANES (what
    wider layers take; the tests compare the two)."""
    height = height or HEIGHT
    _await_compile_helper(xpad.dtype)
    n, _, wp, c = xpad.shape
    f = dz2d.shape[1]
    nb = _blocks(f)
    k = kh * kw * c
    group = images_per_partial(n, nb * k * LANES * xpad.itemsize)
    groups = -(-n // group)
    partial = np.zeros((groups, nb, k, LANES), dtype=xpad.dtype)
    kernel = _direct_filter_grad[height]
    xoff = _offsets(kh, kw, wp, c)
    strips = (*_strides(xpad, stride), group, _strip_rows(ow, nb, wp, c, kh, xpad.itemsize))
    if own_rows and nb == 1 and f < LANES and n:  # (no images: the general call, which sums nothing)
        # The output gradient's own rows, f long (no copy padded to LANES: Week2's 1x1 16 -> 10
        # convolution over 64 images on a Zen 3, 0.60 -> 0.30 ms). A pixel's LANES loads reach into
        # the next rows, so the last group's rows alone are copied, with LANES readable values after
        # them. Each group sums as before: the same bits.
        head = (groups - 1) * group  # images whose loads stay inside dz2d
        rows = oh * ow
        if head:
            kernel(xpad.reshape(-1), xoff, dz2d.reshape(-1), partial.reshape(-1), head, oh, ow, nb, f, *strips)
        tail = np.zeros((n - head) * rows * f + LANES, dtype=dz2d.dtype)
        tail[:-LANES] = dz2d[head * rows :].reshape(-1)
        kernel(xpad[head:].reshape(-1), xoff, tail, partial[groups - 1 :].reshape(-1), n - head, oh, ow, nb, f,
               *strips)
    else:
        kernel(xpad.reshape(-1), xoff, _padded_filters(dz2d).reshape(-1), partial.reshape(-1), n, oh, ow, nb,
               nb * LANES, *strips)
    total = partial.sum(axis=0)  # (nb, K, LANES): fixed order, so no dependence on the thread count
    dkernel2d[...] = total.transpose(1, 0, 2).reshape(k, nb * LANES)[:, :f]


def filter_grad_dispatchers(height=None):
    """The numba dispatchers of the filter gradient's loops, (parallel, serial twin), for a block
    height (None: this machine's): their `stats` say what was compiled and what came from the cache."""
    kernel = _direct_filter_grad[height or HEIGHT]
    return kernel.parallel.dispatcher, kernel.serial.dispatcher


def compile_filter_grad():
    """One small float32 filter gradient on one thread: compiles the kernels a split training
    batch's shares run (the serial twins) into numba's disk cache (what the first training run's
    helper process does, tinycnn.kernels.precompile, and a part of tinycnn.precompile)."""
    numba.set_num_threads(1)
    x = np.zeros((1, 6, 6, 2), dtype=np.float32)
    filter_grad(x, np.zeros((16, 16), dtype=np.float32), 3, 3, (1, 1), 4, 4, np.zeros((18, 16), dtype=np.float32))


def compile_input_grad_scatter():
    """As compile_filter_grad, for the input gradient by scatter (the first run's helper compiles both)."""
    numba.set_num_threads(1)
    input_grad_scatter(np.zeros((16, 16), dtype=np.float32), (1, 6, 6, 16), np.zeros((144, 16), dtype=np.float32),
                       3, 3, (1, 1), (0, 0, 0, 0), 4, 4)


def images_per_partial(n, partial_bytes):
    """Images per filter-gradient partial sum: IMAGES_PER_PARTIAL, or more where the partials of a
    wide layer (256->256 3x3: 2.4 MB each) would pass PARTIALS_BYTES, keeping at least 8 partials
    for the threads. A function of the shapes alone, so the sum's order is the same on any machine."""
    groups = -(-n // IMAGES_PER_PARTIAL)
    most = max(8, PARTIALS_BYTES // partial_bytes)
    return IMAGES_PER_PARTIAL if groups <= most else -(-n // most)


def input_grad(dz2d, x_shape, kernel2d, kh, kw, pads, oh, ow):
    """Input gradient of a stride-1 convolution: the output gradient, padded by (k-1-pad), convolved
    with the kernel flipped in space and with c_in and c_out swapped. A gather, no scatter-add."""
    n, h, w, c = x_shape
    f = kernel2d.shape[1]
    top, bottom, left, right = pads
    pt, pl = kh - 1 - top, kw - 1 - left  # the output gradient's padding before the image
    shape = (n, oh + pt + kh - 1 - bottom, ow + pl + kw - 1 - right, f)
    if shape == (n, oh, ow, f):  # no border (a 1x1 kernel): the output gradient as it is
        dzp = dz2d.reshape(shape)
    else:  # a reused buffer whose border stays zero: only the interior is ever written, and the
        # key holds everything that places it
        dzp = scratch_buffer(("dz_padded", pt, pl, f), shape, dz2d.dtype, zeroed=True)
        dzp[:, pt : pt + oh, pl : pl + ow, :] = dz2d.reshape(n, oh, ow, f)
    flipped = np.ascontiguousarray(kernel2d.reshape(kh, kw, c, f)[::-1, ::-1].transpose(0, 1, 3, 2))
    return forward(dzp, flipped.reshape(kh * kw * f, c), kh, kw, (1, 1), h, w).reshape(x_shape)


def scatter_beats_gather(c, h, w, oh, ow):
    """Whether input_grad_scatter is the faster input gradient at stride 1. The gather (input_grad)
    multiplies the zeros around the output gradient too: h*w / (oh*ow) - 1 of its work is waste
    (0 with 'same' padding). The scatter pays a read-modify-write of its accumulators per kernel
    element and output pixel block, and with channels not a multiple of LANES a padded result to
    copy. One thread of a Zen 3 guest, 32-64 images, scatter / gather time: with whole channel
    blocks, 0.91 at Week2's conv2 (26x26x16, 17 % waste), 0.83 at 12x12x16, 0.58 at 8x8x64 (78 %),
    1.01-1.03 with 'same' padding at 16 channels (0.90-0.95 at 32-64); with 10 channels, 1.11 at
    24x24 (19 % waste), 1.14-1.25 at Week2's conv4 (12x12, 44 %), 0.88 at its conv5 (10x10, 56 %),
    0.57-0.60 at conv7 (125 %). Hence: 10 % of waste with whole blocks, 50 % otherwise."""
    waste = h * w / (oh * ow) - 1
    return waste >= (0.1 if c % LANES == 0 else 0.5)


def input_grad_scatter(dz2d, x_shape, kernel2d, kh, kw, stride, pads, oh, ow, height=None):
    """Input gradient of a convolution by scatter: each output pixel's products added into the input
    pixels it read, and nothing else (the generated loops' docstring says why; at stride 1 the bits
    of input_grad). height as forward's."""
    _await_compile_helper(dz2d.dtype)
    n, h, w, c = x_shape
    f = kernel2d.shape[1]
    cp = _blocks(c) * LANES
    wt = np.zeros((kh, kw, f, cp), dtype=dz2d.dtype)  # (a, d, f, channel): a row of weights per f
    wt[..., :c] = kernel2d.reshape(kh, kw, c, f).transpose(0, 1, 3, 2)
    dx = np.empty((n, h, w, cp), dtype=dz2d.dtype)
    _input_grad_scatter[height or HEIGHT](np.ascontiguousarray(dz2d).reshape(-1), wt.reshape(-1), dx.reshape(-1),
                                          dz2d.dtype.type(0), n, oh, ow, f, h, w, cp, kh, kw, stride[0], stride[1],
                                          pads[0], pads[2])
    return dx if c == cp else np.ascontiguousarray(dx[..., :c])
