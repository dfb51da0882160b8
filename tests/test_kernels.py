"""Every fast kernel (numba on the CPU, CuPy on the GPU) against the plain reference set, and the
rules of kernel sets: each backend's overrides are pinned here, and a set that defines a kernel
the reference lacks (a misspelt override) cannot be created."""
import numpy as np
import pytest

import tinycnn as tc
from tinycnn import backend as B
from tinycnn.kernels.reference import ReferenceKernels, kernel_names, pad_nhwc

R = ReferenceKernels()

RTOL = {np.float32: 2e-5, np.float64: 1e-12}  # float32: GEMM/summation order differs


def fast_kernels(device):
    return B.get_backend(device).kernels


def _same(a, b, dtype):
    """Equal up to round-off: elementwise rtol, and an atol relative to the tensor's largest entry
    (a sum of thousands of products that nearly cancels carries the round-off of its terms)."""
    a, b = B.to_numpy(a), B.to_numpy(b)
    np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * max(1.0, float(np.abs(b).max(initial=0))))


CONVS = [  # (input shape, kh, kw, stride, pads): the Week2 shapes and the awkward ones
    ((4, 28, 28, 1), 3, 3, (1, 1), (0, 0, 0, 0)),
    ((4, 26, 26, 16), 3, 3, (1, 1), (0, 0, 0, 0)),
    ((3, 4, 4, 16), 4, 4, (1, 1), (0, 0, 0, 0)),
    ((2, 7, 8, 3), 3, 3, (2, 2), (1, 1, 1, 1)),
    ((2, 7, 7, 2), 4, 4, (2, 2), (1, 2, 1, 2)),
    ((2, 9, 8, 2), 3, 2, (2, 1), (0, 0, 0, 0)),
    ((2, 11, 11, 10), 3, 3, (1, 1), (0, 0, 0, 0)),  # Week2 conv4: 81 output pixels, 10 channels
    ((2, 9, 11, 10), 3, 3, (1, 1), (1, 1, 1, 1)),  # 'same': the direct input gradient with pads
    ((3, 7, 5, 12), 2, 3, (1, 1), (0, 1, 1, 1)),  # even kernel height, asymmetric pads
    ((3, 6, 5, 16), 1, 1, (1, 1), (0, 0, 0, 0)),  # 1x1 (Week2 conv3): the input gradient without a border
]


def _conv3x3_case(seed, shape, filters):
    """(rng, a float32 NHWC input of `shape`, a 3x3 kernel of `filters` as (9 * C, filters))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return rng, x, rng.standard_normal((9 * shape[3], filters)).astype(np.float32)


@pytest.mark.parametrize("c, filters", [(72, 80), (20, 130)])
def test_direct_convolution_of_wide_layers_matches_the_reference(c, filters, monkeypatch):
    """The direct loops on layers over 64 channels (several 16-filter blocks, long reductions:
    TINYCNN_CONV=direct; 'auto' gives the first of these the GEMM). With the partials' budget cut
    to nothing, the filter gradient sums more images per partial (8 partials of 5 images here
    instead of 10 of 4)."""
    from tinycnn.kernels import cpu_conv

    with tc.config.using(conv="direct"):
        k = fast_kernels("cpu")
    shape, pads = (40, 6, 7, c), (1, 1, 1, 1)
    rng, x, kernel2d = _conv3x3_case(0, shape, filters)
    z_ref, saved_ref = R.conv2d_forward(x, kernel2d, 3, 3, (1, 1), pads)
    z, saved = k.conv2d_forward(x, kernel2d, 3, 3, (1, 1), pads)
    assert saved[0] == "direct"
    _same(z, z_ref, np.float32)
    dz = rng.standard_normal(z_ref.shape).astype(np.float32)
    dk_ref = np.empty_like(kernel2d)
    dx_ref = R.conv2d_backward(dz, saved_ref, shape, kernel2d, 3, 3, (1, 1), pads, dk_ref, True)
    for budget in (cpu_conv.PARTIALS_BYTES, 1):
        monkeypatch.setattr(cpu_conv, "PARTIALS_BYTES", budget)
        dk = np.empty_like(kernel2d)
        _same(k.conv2d_backward(dz, saved, shape, kernel2d, 3, 3, (1, 1), pads, dk, True), dx_ref, np.float32)
        _same(dk, dk_ref, np.float32)
    assert cpu_conv.images_per_partial(40, 10) == 5  # the budget is 1 byte here
    monkeypatch.undo()
    assert cpu_conv.images_per_partial(40, 10) == 4 and cpu_conv.images_per_partial(400, 2 << 20) == 50


@pytest.mark.parametrize("c, filters, algorithm", [(16, 16, "direct"), (63, 256, "direct"), (256, 63, "direct"),
                                                    (64, 64, "gemm"), (72, 80, "gemm"), (256, 256, "gemm")])
def test_auto_takes_the_gemm_for_wide_layers_only(c, filters, algorithm):
    """TINYCNN_CONV=auto (the default): im2col + GEMM where the layer has 64 channels or more in
    and out, the direct loops elsewhere (Week2's layers); the results are the reference's."""
    with tc.config.using(conv="auto"):
        k = fast_kernels("cpu")
    shape, pads = (3, 5, 4, c), (1, 1, 1, 1)
    rng, x, kernel2d = _conv3x3_case(1, shape, filters)
    z, saved = k.conv2d_forward(x, kernel2d, 3, 3, (1, 1), pads)
    assert saved[0] == algorithm
    z_ref, saved_ref = R.conv2d_forward(x, kernel2d, 3, 3, (1, 1), pads)
    _same(z, z_ref, np.float32)
    dz = rng.standard_normal(z_ref.shape).astype(np.float32)
    dk, dk_ref = np.empty_like(kernel2d), np.empty_like(kernel2d)
    _same(k.conv2d_backward(dz, saved, shape, kernel2d, 3, 3, (1, 1), pads, dk, True),
          R.conv2d_backward(dz, saved_ref, shape, kernel2d, 3, 3, (1, 1), pads, dk_ref, True), np.float32)
    _same(dk, dk_ref, np.float32)


@pytest.mark.parametrize("filters", [1, 5, 10, 15, 16, 21])
def test_a_forward_task_writes_its_own_pixels_and_nothing_else(filters):
    """With one block of filters (F < 16) the direct forward's rows are F long and each pixel's 16
    stores spill into the next pixels' rows, which are stored after it. One task (a range of output
    pixels, as the parallel loop hands out) must then still write exactly its pixels, every lane of
    them, and nothing before or after: the next task's pixels, or past the array's end. Every height,
    on task ranges that leave every remainder."""
    from tinycnn.kernels import cpu_conv, cpu_conv_generated

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    kernel2d = rng.standard_normal((2 * 2 * 3, filters)).astype(np.float32)
    oh, ow = 4, 5
    expected = R.im2col(x, 2, 2, (1, 1), (0, 0, 0, 0)) @ kernel2d  # (40 pixels, filters)
    nb = -(-filters // 16)
    fo = filters if nb == 1 else nb * 16
    for height in cpu_conv_generated.HEIGHTS:
        for p0, p1 in [(0, 40), (0, 1), (3, 4), (5, 12), (1, 39), (33, 40), (7, 26)]:
            out = np.full((40 * fo + 64,), 7.5, np.float32)  # 64 floats past the end: none may change
            cpu_conv.forward_task(x, kernel2d, 2, 2, (1, 1), oh, ow, p0, p1, out, fo, height=height)
            rows = out[: 40 * fo].reshape(40, fo)[:, :filters]
            np.testing.assert_allclose(rows[p0:p1], expected[p0:p1], rtol=1e-5, atol=1e-5)
            untouched = np.ones(40 * fo + 64, bool)
            untouched[p0 * fo : p1 * fo] = False
            assert (out[untouched] == 7.5).all(), (height, p0, p1)


@pytest.mark.parametrize("images", [0, 1, 4, 9, 13])  # none (a rank's empty share), one partial sum, one full, several
@pytest.mark.parametrize("filters", [1, 10, 15])
def test_filter_gradient_from_rows_shorter_than_a_block(filters, images):
    """With F < 16 filters the filter gradient reads the output gradient's own F-long rows (a pixel's
    16 loads reach into the next rows; the last partial sum's rows are copied with room after them).
    The same bits as from rows padded to 16 with zeros, and the reference's values."""
    from tinycnn.kernels import cpu_conv

    rng = np.random.default_rng(6)
    x = rng.standard_normal((images, 6, 7, 3)).astype(np.float32)
    oh, ow = 4, 5
    dz = rng.standard_normal((images * oh * ow, filters)).astype(np.float32)
    dk = np.empty((3 * 3 * 3, filters), np.float32)
    cpu_conv.filter_grad(x, dz, 3, 3, (1, 1), oh, ow, dk)
    _same(dk, R.im2col(x, 3, 3, (1, 1), (0, 0, 0, 0)).T @ dz, np.float32)
    padded = np.empty_like(dk)
    cpu_conv.filter_grad(x, dz, 3, 3, (1, 1), oh, ow, padded, own_rows=False)
    np.testing.assert_array_equal(dk, padded)


@pytest.mark.parametrize("shape, kh, kw, pads, filters", [
    ((3, 12, 12, 10), 3, 3, (0, 0, 0, 0), 10),  # Week2's conv4: rows of 10 output pixels (blocks of 4, 4 and 2)
    ((2, 6, 7, 16), 3, 3, (0, 0, 0, 0), 16),  # conv7-like, 5 output columns (4 and 1)
    ((2, 9, 11, 21), 3, 3, (1, 1, 1, 1), 5),  # 'same': the border's kernel elements skipped; 2 channel blocks
    ((2, 4, 4, 16), 4, 4, (0, 0, 0, 0), 10),  # Week2's conv8: one output pixel
    ((2, 7, 9, 16), 2, 3, (0, 1, 1, 1), 12),  # even kernel height, asymmetric pads
])
def test_the_scattered_input_gradient_gives_the_gathered_bits(shape, kh, kw, pads, filters):
    """The scatter form of the input gradient adds each entry's terms in the gather's order, so at
    stride 1 it gives the gather's bits (which form runs is a speed choice, cpu_conv.scatter_beats_gather),
    at every register block height; and at stride 2, which the gather cannot do, the reference's values."""
    from tinycnn.kernels import cpu_conv, cpu_conv_generated

    rng = np.random.default_rng(11)
    n, h, w, c = shape
    kernel2d = rng.standard_normal((kh * kw * c, filters)).astype(np.float32)
    for stride in [(1, 1), (2, 2), (2, 1)]:
        oh = (h + pads[0] + pads[1] - kh) // stride[0] + 1
        ow = (w + pads[2] + pads[3] - kw) // stride[1] + 1
        dz = rng.standard_normal((n * oh * ow, filters)).astype(np.float32)
        reference = R.col2im(dz @ kernel2d.T, shape, kh, kw, stride, pads)
        for height in cpu_conv_generated.HEIGHTS:
            dx = cpu_conv.input_grad_scatter(dz, shape, kernel2d, kh, kw, stride, pads, oh, ow, height=height)
            if stride == (1, 1):
                np.testing.assert_array_equal(dx, cpu_conv.input_grad(dz, shape, kernel2d, kh, kw, pads, oh, ow))
            _same(dx, reference, np.float32)


def test_week2s_small_late_convolutions_take_the_scatter():
    """The input gradient's form by shape: the gather where it multiplies few zeros, the scatter
    where the padded output gradient is mostly zeros (Week2's conv5 to conv8) or has whole channel
    blocks and 10 % of waste (conv2)."""
    from tinycnn.kernels import cpu_conv

    week2 = {"conv2": (16, 26, 26, 24, 24), "conv4": (10, 12, 12, 10, 10), "conv5": (10, 10, 10, 8, 8),
             "conv6": (16, 8, 8, 6, 6), "conv7": (16, 6, 6, 4, 4), "conv8": (16, 4, 4, 1, 1),
             "same": (16, 14, 14, 14, 14)}
    chosen = {name: cpu_conv.scatter_beats_gather(*sizes) for name, sizes in week2.items()}
    assert chosen == {"conv2": True, "conv4": False, "conv5": True, "conv6": True, "conv7": True, "conv8": True,
                      "same": False}


@pytest.mark.parametrize("dtype", [np.float32])  # float64 compiles every height again (a minute of CI) for the same loops
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS)
def test_every_register_block_height_gives_the_same_bits(dtype, shape, kh, kw, stride, pads):
    """The direct convolution's loops come in block heights for different vector registers
    (cpu_conv.HEIGHT picks this machine's); each accumulator sums in the same order in all of them,
    so a model trains to the same bits on an AVX2 and an AVX-512 machine. Both heights run here,
    whatever this machine is, on shapes whose pixel and kernel-element counts leave remainders."""
    from tinycnn.kernels import cpu_conv, cpu_conv_generated

    rng = np.random.default_rng(3)
    x = pad_nhwc(rng.standard_normal(shape).astype(dtype), pads)
    n, c, filters = shape[0], shape[3], 21  # two filter blocks, the second partly padding
    oh = (x.shape[1] - kh) // stride[0] + 1
    ow = (x.shape[2] - kw) // stride[1] + 1
    kernel2d = rng.standard_normal((kh * kw * c, filters)).astype(dtype)
    dz = rng.standard_normal((n * oh * ow, filters)).astype(dtype)
    outputs = {}
    for height in cpu_conv_generated.HEIGHTS:
        dk = np.empty_like(kernel2d)
        cpu_conv.filter_grad(x, dz, kh, kw, stride, oh, ow, dk, height=height)
        outputs[height] = (cpu_conv.forward(x, kernel2d, kh, kw, stride, oh, ow, relu=True, height=height), dk)
    first, *others = outputs.values()
    for other in others:
        np.testing.assert_array_equal(other[0], first[0])
        np.testing.assert_array_equal(other[1], first[1])
    cols = R.im2col(x, kh, kw, stride, (0, 0, 0, 0))
    _same(first[0], np.maximum(cols @ kernel2d, 0), dtype)  # and they are the convolution
    _same(first[1], cols.T @ dz, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS)
def test_im2col_col2im(device, dtype, shape, kh, kw, stride, pads):
    k = fast_kernels(device)
    be = B.get_backend(device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    cols_ref = R.im2col(x, kh, kw, stride, pads)
    assert np.array_equal(B.to_numpy(k.im2col(be.asarray(x), kh, kw, stride, pads)), cols_ref)  # a copy: exact
    dcols = rng.standard_normal(cols_ref.shape).astype(dtype)
    _same(k.col2im(be.asarray(dcols), shape, kh, kw, stride, pads), R.col2im(dcols, shape, kh, kw, stride, pads), dtype)


def _backend_with_conv(device, algorithm):
    """The device's backend with that convolution algorithm (the GPU has only its own)."""
    if device == "gpu" and algorithm == "gemm":
        pytest.skip("the GPU has one convolution algorithm")
    with tc.config.using(conv=algorithm):
        return B.get_backend(device)


@pytest.mark.parametrize("algorithm", ["direct", "gemm"])
@pytest.mark.parametrize("filters", [5, 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS)
def test_conv_relu_is_the_convolution_then_maximum_to_the_bit(device, dtype, filters, algorithm, shape, kh, kw,
                                                              stride, pads):
    """The fused ReLU (applied as the direct loops store each block) gives np.maximum(z, 0) of the
    set's own convolution exactly: NaN stays NaN, -0.0 stays -0.0, and the same `saved`."""
    be = _backend_with_conv(device, algorithm)
    k = be.kernels
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 0, 0, 0] = np.nan  # NaN reaches the outputs whose windows hold it
    kernel2d = rng.standard_normal((kh * kw * shape[3], filters)).astype(dtype)
    kernel2d[:, 0] = -0.0  # filter 0's outputs are (-0.0 * x) sums: -0.0 or 0.0
    z, saved = k.conv2d_forward(be.asarray(x), be.asarray(kernel2d), kh, kw, stride, pads)
    y, saved_relu = k.conv2d_relu_forward(be.asarray(x), be.asarray(kernel2d), kh, kw, stride, pads)
    expected = np.maximum(B.to_numpy(z), 0)
    got = B.to_numpy(y)
    assert np.isnan(expected).any() and (expected == 0).any()
    np.testing.assert_array_equal(got, expected)  # NaN where NaN
    assert np.array_equal(np.signbit(got), np.signbit(expected))
    assert saved_relu[0] == saved[0] if device == "cpu" else True


@pytest.mark.parametrize("algorithm", ["direct", "gemm"])
@pytest.mark.parametrize("filters", [5, 16, 20])  # part of one 16-filter block, one block, two blocks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS)
def test_conv(device, dtype, filters, algorithm, shape, kh, kw, stride, pads):
    be = _backend_with_conv(device, algorithm)
    k = be.kernels
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    kernel2d = rng.standard_normal((kh * kw * shape[3], filters)).astype(dtype)
    z_ref, saved_ref = R.conv2d_forward(x, kernel2d, kh, kw, stride, pads)
    z, saved = k.conv2d_forward(be.asarray(x), be.asarray(kernel2d), kh, kw, stride, pads)
    if device == "cpu":
        assert saved[0] == algorithm  # the path under test is the one that ran
    _same(z, z_ref, dtype)
    dz = rng.standard_normal(z_ref.shape).astype(dtype)
    dk_ref, dk = np.empty_like(kernel2d), be.xp.empty(kernel2d.shape, dtype=dtype)
    dx_ref = R.conv2d_backward(dz, saved_ref, shape, kernel2d, kh, kw, stride, pads, dk_ref, True)
    dx = k.conv2d_backward(be.asarray(dz), saved, shape, be.asarray(kernel2d), kh, kw, stride, pads, dk, True)
    _same(dx, dx_ref, dtype)
    _same(dk, dk_ref, dtype)
    dk[...] = np.nan
    assert k.conv2d_backward(be.asarray(dz), saved, shape, be.asarray(kernel2d), kh, kw, stride, pads, dk, False) is None
    _same(dk, dk_ref, dtype)
    # Twice more: reused buffers (the zero-bordered padded gradient) must not carry anything over.
    dx2 = k.conv2d_backward(be.asarray(2 * dz), saved, shape, be.asarray(kernel2d), kh, kw, stride, pads, dk, True)
    _same(dx2, 2 * dx_ref, dtype)


POOLS = [  # (input shape, pool, stride, pads): valid, overlapping, uneven, and 'same' paddings
    ((4, 24, 24, 10), (2, 2), (2, 2), (0, 0, 0, 0)),  # the CPU set's unrolled 2x2 kernel, as the next
    ((2, 7, 9, 3), (2, 2), (2, 2), (0, 0, 0, 0)),  # odd sizes: the last row and column are in no window
    ((2, 7, 9, 8), (2, 2), (2, 2), (0, 0, 0, 0)),  # ... with whole groups of 4 channels (the gathering backward)
    ((3, 6, 4, 16), (2, 2), (2, 2), (0, 0, 0, 0)),
    ((2, 7, 7, 3), (3, 3), (2, 2), (0, 0, 0, 0)),
    ((2, 5, 7, 2), (2, 3), (1, 2), (0, 0, 0, 0)),
    ((2, 7, 7, 3), (2, 2), (2, 2), (0, 1, 0, 1)),  # 'same' on an odd size: the padding is after
    ((2, 6, 5, 3), (3, 3), (1, 1), (1, 1, 1, 1)),  # 'same', stride 1
    ((1, 5, 5, 2), (3, 3), (2, 2), (1, 1, 1, 1)),
]


@pytest.mark.parametrize("shape, pool, stride, pads", POOLS)
def test_maxpool(device, shape, pool, stride, pads):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :2, :2, 0] = 1.5  # a tie: both must pick the first maximum
    y_ref, arg_ref = R.maxpool_forward(x, pool, stride, pads)
    y, arg = k.maxpool_forward(be.asarray(x), pool, stride, pads)
    dy_sized_garbage = np.full(shape, np.nan, dtype=np.float32)  # an entry the backward skips reads NaN...
    assert arg_ref.dtype == np.int32 and B.to_numpy(arg).dtype == np.int32
    assert np.array_equal(B.to_numpy(y), y_ref) and np.array_equal(B.to_numpy(arg), arg_ref)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    del dy_sized_garbage  # ... freed just before: the kernel's np.empty output most likely reuses it
    _same(k.maxpool_backward(be.asarray(dy), arg, shape, pool, stride, pads),
          R.maxpool_backward(dy, arg_ref, shape, pool, stride, pads), np.float32)


def test_maxpool_window_over_127_elements_keeps_its_gradient(device):
    """The argmax is int32: a 12 x 12 window (144 offsets) would wrap in int8 and lose its gradient."""
    k, be = fast_kernels(device), B.get_backend(device)
    x = np.zeros((1, 12, 12, 1), np.float32)
    x[0, 11, 11, 0] = 1.0  # the maximum at offset 143
    y, arg = k.maxpool_forward(be.asarray(x), (12, 12), (12, 12), (0, 0, 0, 0))
    assert int(B.to_numpy(arg)[0, 0, 0, 0]) == 143
    dx = B.to_numpy(k.maxpool_backward(be.asarray(np.ones((1, 1, 1, 1), np.float32)), arg, x.shape, (12, 12),
                                       (12, 12), (0, 0, 0, 0)))
    assert dx[0, 11, 11, 0] == 1.0 and dx.sum() == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, pool, stride, pads", POOLS)
def test_avgpool(device, dtype, shape, pool, stride, pads):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(dtype)
    y_ref = R.avgpool_forward(x, pool, stride, pads)
    _same(k.avgpool_forward(be.asarray(x), pool, stride, pads), y_ref, dtype)
    if pads == (0, 0, 0, 0) and pool == stride:  # non-overlapping valid windows: the plain mean
        n, h, w, c = shape
        oh, ow = h // pool[0], w // pool[1]
        mean = x[:, : oh * pool[0], : ow * pool[1]].reshape(n, oh, pool[0], ow, pool[1], c).mean(axis=(2, 4))
        np.testing.assert_allclose(y_ref, mean, rtol=1e-6)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    _same(k.avgpool_backward(be.asarray(dy), shape, pool, stride, pads),
          R.avgpool_backward(dy, shape, pool, stride, pads), dtype)


def test_avgpool_same_padding_averages_real_pixels_only():
    x = np.arange(9, dtype=np.float64).reshape(1, 3, 3, 1)
    y = R.avgpool_forward(x, (2, 2), (2, 2), (0, 1, 0, 1))  # 'same' on 3x3: windows of 4, 2, 2 and 1 pixels
    assert y[0, :, :, 0].tolist() == [[2.0, 3.5], [6.5, 8.0]]


DEPTHWISE = [  # (input shape, kernel (kh, kw, c, m), stride, pads)
    ((2, 8, 8, 3), (3, 3, 3, 1), (1, 1), (0, 0, 0, 0)),
    ((2, 8, 7, 4), (3, 3, 4, 2), (1, 1), (1, 1, 1, 1)),
    ((3, 9, 9, 5), (3, 3, 5, 1), (2, 2), (0, 1, 0, 1)),
    ((2, 6, 7, 2), (2, 3, 2, 3), (2, 1), (0, 0, 0, 0)),
    ((2, 7, 6, 20), (3, 3, 20, 1), (1, 1), (1, 1, 1, 1)),  # 3x3, one filter a channel: the unpadded loops
    ((2, 9, 8, 3), (3, 3, 3, 1), (2, 2), (1, 1, 1, 1)),
]


@pytest.mark.parametrize("shape, stride, pads", [((3, 9, 8, 20), (1, 1), (1, 1, 1, 1)),
                                                 ((2, 9, 9, 5), (2, 2), (0, 1, 0, 1)),
                                                 ((2, 11, 7, 16), (2, 1), (1, 1, 0, 1)),
                                                 ((2, 10, 6, 24), (1, 1), (0, 0, 0, 0))])
def test_the_unpadded_3x3_depthwise_loops_give_the_padded_loops_bits(shape, stride, pads):
    """The 3x3 multiplier-1 kernels skip the taps outside the image where a padded input adds a
    zero: the same sums in the same order as on the explicitly padded input (random inputs: no
    zero whose sign could differ). The shapes take the input gradient's gather at stride 1 with
    and without padding and its scatter at strides 2 and (2, 1)."""
    from tinycnn.kernels.cpu import CPUKernels

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, shape[3], 1)).astype(np.float32)
    k, none = CPUKernels(), (0, 0, 0, 0)
    xpad = np.ascontiguousarray(pad_nhwc(x, pads))
    z, saved = k.depthwise_conv2d_forward(x, kernel, stride, pads)
    z_padded, saved_padded = k.depthwise_conv2d_forward(xpad, kernel, stride, none)
    np.testing.assert_array_equal(z, z_padded)
    dz = rng.standard_normal(z.shape).astype(np.float32)
    dk, dk_padded = np.empty_like(kernel), np.empty_like(kernel)
    dx = k.depthwise_conv2d_backward(dz, saved, x.shape, kernel, stride, pads, dk, True)
    dxpad = k.depthwise_conv2d_backward(dz, saved_padded, xpad.shape, kernel, stride, none, dk_padded, True)
    np.testing.assert_array_equal(dk, dk_padded)
    np.testing.assert_array_equal(dx, dxpad[:, pads[0] : pads[0] + shape[1], pads[2] : pads[2] + shape[2]])
    # ... and the padded loops' order, spelled out: each output pixel adds its nine products into the
    # padded input gradient, tap (a, d) by tap (where stride 1 gathers, it must sum in this order)
    scattered = np.zeros(xpad.shape, np.float32)
    for i in range(z.shape[1]):
        for j in range(z.shape[2]):
            for a in range(3):
                for d in range(3):
                    scattered[:, i * stride[0] + a, j * stride[1] + d] += dz[:, i, j] * kernel[a, d, :, 0]
    np.testing.assert_array_equal(dx, scattered[:, pads[0] : pads[0] + shape[1], pads[2] : pads[2] + shape[2]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kshape, stride, pads", DEPTHWISE)
def test_depthwise_conv(device, dtype, shape, kshape, stride, pads):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype)
    kernel = rng.standard_normal(kshape).astype(dtype)
    z_ref, saved_ref = R.depthwise_conv2d_forward(x, kernel, stride, pads)
    # The definition, channel by channel: output channel c*m + q is input channel c convolved with kernel[..., c, q]
    kh, kw, c, m = kshape
    xpad = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    for ch, q in [(0, 0), (c - 1, m - 1)]:
        expect = sum(xpad[:, a : a + stride[0] * (z_ref.shape[1] - 1) + 1 : stride[0],
                          d : d + stride[1] * (z_ref.shape[2] - 1) + 1 : stride[1], ch] * kernel[a, d, ch, q]
                     for a in range(kh) for d in range(kw))
        np.testing.assert_allclose(z_ref[..., ch * m + q], expect, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)
    z, saved = k.depthwise_conv2d_forward(be.asarray(x), be.asarray(kernel), stride, pads)
    _same(z, z_ref, dtype)
    dz = rng.standard_normal(z_ref.shape).astype(dtype)
    dk_ref, dk = np.empty_like(kernel), be.xp.empty(kernel.shape, dtype=dtype)
    dx_ref = R.depthwise_conv2d_backward(dz, saved_ref, shape, kernel, stride, pads, dk_ref, True)
    dx = k.depthwise_conv2d_backward(be.asarray(dz), saved, shape, be.asarray(kernel), stride, pads, dk, True)
    _same(dx, dx_ref, dtype)
    _same(dk, dk_ref, dtype)
    assert k.depthwise_conv2d_backward(be.asarray(dz), saved, shape, be.asarray(kernel), stride, pads, dk, False) is None
    _same(dk, dk_ref, dtype)


@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("rows", [40, 128 * 26 * 26])  # a few rows (the reference ran these until 2026-12-06), Week2's
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_alone_and_fused_with_dropout(device, rows, dtype, rate):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((rows, 16)) * 3 + 2).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(dtype), rng.standard_normal(16).astype(dtype)
    args = (be.asarray(x), be.asarray(gamma), be.asarray(beta), 1e-3)
    if rate:
        ref = R.batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, rate, 99)
        out = k.batchnorm_dropout_forward_train(*args, rate, 99)
    else:
        ref = R.batchnorm_forward_train(x, gamma, beta, 1e-3)
        out = k.batchnorm_forward_train(*args)
    # `saved` (index 1) is each implementation's own business; the rest must agree. The fast
    # kernels sum in float64, NumPy in float32: normalized values agree to ~1e-5.
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for i in (0, 2, 3, 4):
        np.testing.assert_allclose(B.to_numpy(out[i]), ref[i], rtol=tol, atol=tol)
    if rate:  # the same dropout mask
        assert np.array_equal(B.to_numpy(out[0]) == 0, ref[0] == 0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if rate:
        back_ref = R.batchnorm_dropout_backward_train(dy, ref[1], gamma, ref[4])
        back = k.batchnorm_dropout_backward_train(be.asarray(dy), out[1], be.asarray(gamma), out[4])
    else:
        back_ref = R.batchnorm_backward_train(dy, ref[1], gamma, ref[4])
        back = k.batchnorm_backward_train(be.asarray(dy), out[1], be.asarray(gamma), out[4])
    np.testing.assert_allclose(B.to_numpy(back[0]), back_ref[0], rtol=tol, atol=tol)
    # dgamma, dbeta: sums over all rows with cancellation; NumPy's float32 sum carries an
    # error of order 1e-7 per row of |terms|, the fast kernels' float64 sum almost none.
    sum_tol = 1e-7 * rows if dtype == np.float32 else 1e-10
    for a, b in zip(back[1:], back_ref[1:]):
        np.testing.assert_allclose(B.to_numpy(a), b, rtol=tol, atol=sum_tol)


@pytest.mark.parametrize("reduce", [None, lambda totals: totals])  # alone, and as a share of a split batch
@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("rows", [40, 64 * 24 * 24])  # a few rows, and a Week2 share's
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_read_inside_batchnorm_is_relu_then_batchnorm(device, rows, dtype, rate, reduce):
    """The relu_batchnorm entries (the plan's Conv(relu) -> BatchNorm (-> Dropout) step) against the
    reference composite, ReLU then BatchNorm then Dropout, on inputs half of which are negative: the
    same zeros forward (ReLU's and the mask's), the gradient zero wherever the input is not positive."""
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((rows, 16)) * 3).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(dtype), rng.standard_normal(16).astype(dtype)
    # the reference in float64 (NumPy's float32 variance of 36,864 rows is off by 3e-4 itself)
    f64 = [a.astype(np.float64) for a in (z, gamma, beta)]
    ref = R.relu_batchnorm_forward_train(*f64, 1e-3, rate, 99, 0, reduce)
    out = k.relu_batchnorm_forward_train(be.asarray(z), be.asarray(gamma), be.asarray(beta), 1e-3, rate, 99, 0, reduce)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for i in (0, 2, 3, 4):
        np.testing.assert_allclose(B.to_numpy(out[i]), ref[i], rtol=tol, atol=tol)
    y = B.to_numpy(out[0])
    assert np.array_equal(y == 0, ref[0] == 0)  # the dropped entries, exactly (the mask's zeros)
    for ch in range(16):  # every input the ReLU zeroed normalizes to one value, BatchNorm's of 0
        relu_zeros = y[(z[:, ch] <= 0) & (y[:, ch] != 0), ch]
        assert relu_zeros.size > rows // 4 and (relu_zeros == relu_zeros[0]).all()
    dy = rng.standard_normal(z.shape).astype(dtype)
    back_ref = R.relu_batchnorm_backward_train(dy.astype(np.float64), ref[1], f64[1], ref[4], reduce)
    back = k.relu_batchnorm_backward_train(be.asarray(dy), out[1], be.asarray(gamma), out[4], reduce)
    dz = B.to_numpy(back[0])
    assert (dz[z <= 0] == 0).all() and (dz[z > 0] != 0).mean() > 0.8
    np.testing.assert_allclose(dz, back_ref[0], rtol=tol, atol=tol)
    for a, b in zip(back[1:], back_ref[1:]):
        np.testing.assert_allclose(B.to_numpy(a), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("size", [(3, 5, 5, 2), (128, 26, 26, 16)])
def test_dropout_masks_are_identical_across_implementations(device, size):
    k, be = fast_kernels(device), B.get_backend(device)
    x = np.random.default_rng(3).standard_normal(size).astype(np.float32)
    y_ref, mask_ref = R.dropout_forward(x, 0.1, 2**40 + 17)
    y, mask = k.dropout_forward(be.asarray(x), 0.1, 2**40 + 17)
    assert np.array_equal(B.to_numpy(y), y_ref)
    dy = np.ones(size, np.float32)
    assert np.array_equal(B.to_numpy(k.dropout_backward(be.asarray(dy), mask)), R.dropout_backward(dy, mask_ref))
    drop = (y_ref == 0).mean()
    if x.size > 10**5:
        assert abs(drop - 0.1) < 0.002  # 1.4 M draws: the mask has the right rate
    y2, _ = k.dropout_forward(be.asarray(x), 0.1, 2**40 + 18)
    assert not np.array_equal(B.to_numpy(y2), y_ref)  # another seed, another mask


def test_dropout_keys_on_the_device_are_the_host_seeds_keys(device):
    """A static step's keys (dropout_keys: computed on the device from its step counter) are the
    keys of the seeds an eager step draws on the host, call_seed(base, offset + step * calls)."""
    from tinycnn.randomness import DeviceKey, call_seed, dropout_key

    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(4)
    bases = rng.integers(0, 2**63, 6, dtype=np.uint64)
    offsets, calls = np.array([0, 1, 0, 2, 5, 0], np.uint64), np.array([1, 2, 1, 3, 7, 1], np.uint64)
    for step in (0, 1, 2**40 + 3):
        out = be.xp.zeros(6, dtype=be.xp.uint32)
        k.dropout_keys(*map(be.asarray, (bases, offsets, calls, np.array([step], np.uint64))), out)
        expected = [dropout_key(call_seed(int(b), int(o) + step * int(c))) for b, o, c in zip(bases, offsets, calls)]
        assert B.to_numpy(out).tolist() == expected
    # and a mask drawn from a DeviceKey is the mask of the seed whose key it holds
    x = be.asarray(np.random.default_rng(5).standard_normal((4, 7)).astype(np.float32))
    seed = call_seed(int(bases[1]), 1 + 2)
    y_host, _ = k.dropout_forward(x, 0.5, seed)
    out = be.xp.asarray(np.array([0, dropout_key(seed)], np.uint32))
    y_device, _ = k.dropout_forward(x, 0.5, DeviceKey(out, 1))
    assert np.array_equal(B.to_numpy(y_host), B.to_numpy(y_device))


def test_a_dropout_layer_seeds_call_k_with_call_seed_of_its_epoch_seed():
    """Call k of an epoch masks with call_seed(the layer's seed for the epoch, k): counters, which a
    static step can compute on the device."""
    from tinycnn.randomness import call_seed

    layer = tc.layers.Dropout(0.5)
    layer.reseed(1234)
    assert [layer.next_seed() for _ in range(3)] == [call_seed(1234, k) for k in range(3)]
    assert layer.random_state() == {"base": 1234, "calls": 3}
    layer.reseed(99)
    assert layer.next_seed() == call_seed(99, 0)


@pytest.mark.parametrize("shape", [(3, 4, 5), (128, 24, 24, 16)])
def test_relu_backward(device, shape):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(4)
    y = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)
    dy = rng.standard_normal(shape).astype(np.float32)
    assert np.array_equal(B.to_numpy(k.relu_backward(be.asarray(dy), be.asarray(y))), R.relu_backward(dy, y))


@pytest.mark.parametrize("rows", [40, 128 * 26 * 26])
def test_batchnorm_inference(device, rows):
    k, be = fast_kernels(device), B.get_backend(device)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    params = [rng.uniform(0.5, 2, 16), rng.standard_normal(16), rng.standard_normal(16), rng.uniform(0.5, 2, 16)]
    params = [p.astype(np.float32) for p in params]
    ref = R.batchnorm_forward_infer(x, *params, 1e-3)
    out = k.batchnorm_forward_infer(be.asarray(x), *map(be.asarray, params), 1e-3)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(B.to_numpy(a), b, rtol=1e-5, atol=1e-5)


# -- kernel sets -----------------------------------------------------------------------------------------
OVERRIDES = {  # what each backend's set computes itself; everything else is the reference's
    "cpu": {"im2col", "col2im", "conv2d_forward", "conv2d_relu_forward", "conv2d_backward", "depthwise_conv2d_forward",
            "depthwise_conv2d_backward", "maxpool_forward", "maxpool_backward", "avgpool_forward", "avgpool_backward",
            "relu_backward", "batchnorm_forward_train", "batchnorm_backward_train", "batchnorm_forward_infer",
            "batchnorm_dropout_forward_train", "batchnorm_dropout_backward_train", "relu_batchnorm_forward_train",
            "relu_batchnorm_backward_train", "dropout_forward", "dropout_backward"},
    "gpu": {"im2col", "col2im", "conv2d_forward", "conv2d_backward", "maxpool_forward", "maxpool_backward", "global_avgpool_forward",
            "global_avgpool_backward", "relu_backward", "batchnorm_forward_train",
            "batchnorm_backward_train", "batchnorm_moving_update", "batchnorm_dropout_forward_train",
            "batchnorm_dropout_backward_train", "relu_batchnorm_forward_train", "relu_batchnorm_backward_train",
            "dropout_forward", "dropout_backward", "dropout_keys", "softmax_cross_entropy", "categorical_matches",
            "adam_update"},
}


def _overridden(kernel_set):
    return {name for name in kernel_names() if getattr(type(kernel_set), name) is not getattr(ReferenceKernels, name)}


def test_cpu_set_overrides_exactly_the_pinned_kernels():
    from tinycnn.kernels.cpu import CPUKernels

    assert _overridden(CPUKernels()) == OVERRIDES["cpu"] == set(CPUKernels.overrides)


@pytest.mark.gpu
@pytest.mark.skipif(B.gpu_problem() is not None, reason=f"no GPU backend: {B.gpu_problem()}")
def test_gpu_set_overrides_exactly_the_pinned_kernels():
    from tinycnn.kernels.gpu import GPUKernels

    assert _overridden(GPUKernels()) == OVERRIDES["gpu"] == set(GPUKernels.overrides)


def test_gpu_set_declares_the_pinned_kernels_without_a_gpu():
    """The GPU module imports CuPy; its declaration can still be checked by reading the class source."""
    import ast
    import os

    import tinycnn.kernels as package

    source = open(os.path.join(os.path.dirname(package.__file__), "gpu.py")).read()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "GPUKernels")
    defined = {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")} - {"describe"}
    assert defined == OVERRIDES["gpu"] and defined <= set(kernel_names())


def test_a_misspelt_override_cannot_exist():
    with pytest.raises(TypeError, match="batchnorm_foward_train, which the reference kernel set does not have"):
        class Misspelt(ReferenceKernels):
            overrides = ("batchnorm_foward_train",)

            def batchnorm_foward_train(self, x2d, gamma, beta, eps):
                return None
    with pytest.raises(TypeError, match="must list exactly the kernels it defines"):
        class Undeclared(ReferenceKernels):
            overrides = ()

            def relu_forward(self, x):
                return x


def test_composites_go_through_the_set():
    """Overriding a primitive changes every composite that uses it (here: the fused BN + Dropout)."""
    calls = []

    class Counting(ReferenceKernels):
        overrides = ("dropout_forward",)

        def dropout_forward(self, x, rate, seed, offset=0):
            calls.append(rate)
            return super().dropout_forward(x, rate, seed, offset)

    x = np.random.default_rng(0).standard_normal((50, 4))
    Counting().batchnorm_dropout_forward_train(x, np.ones(4), np.zeros(4), 1e-3, 0.25, 7)
    assert calls == [0.25]


def test_reference_kernels_by_setting():
    with tc.config.using(kernels="reference"):
        assert type(B.get_backend("cpu").kernels) is ReferenceKernels
    from tinycnn.kernels.cpu import CPUKernels

    assert type(B.get_backend("cpu").kernels) is CPUKernels
