"""The GPU kernel set's CUDA kernels, run on the CPU (issue 13, part 2b): tinycnn/kernels/gpu.py
imported under a stand-in `cupy` whose RawModule compiles the kernels' own CUDA source as C++ and
plays every thread of a small grid (tests/cuda_shim.py), called through GPUKernels exactly as the
GPU backend calls it, against the reference kernels. What this cannot see: the GPU's launch and
memory themselves (tests marked gpu do, where a GPU exists); NVRTC compiles the same source in
tests/test_cuda_compile.py."""

import numpy as np
import pytest

import cuda_shim
from tinycnn.backend import gpu_problem
from tinycnn.kernels.reference import ReferenceKernels

GPU_PROBLEM = gpu_problem()
if GPU_PROBLEM is None:  # the real GPU set, imported before the fixture below swaps CuPy out
    import cupy
    import tinycnn.kernels.gpu as REAL_GPU

pytestmark = pytest.mark.skipif(cuda_shim.CXX is None, reason="needs a C++ compiler (g++) to run CUDA bodies")

R = ReferenceKernels()
DTYPES = [np.float32, np.float64]
CONVS = [  # (input shape, kh, kw, stride, pads): a Week2 shape and awkward ones
    ((2, 8, 8, 3), 3, 3, (1, 1), (0, 0, 0, 0)),
    ((2, 7, 8, 3), 3, 3, (2, 2), (1, 1, 1, 1)),
    ((2, 7, 7, 2), 4, 4, (2, 2), (1, 2, 1, 2)),
    ((2, 9, 8, 2), 3, 2, (2, 1), (0, 0, 0, 0)),
]
POOLS = [  # (input shape, pool, stride, pads)
    ((2, 24, 24, 10), (2, 2), (2, 2), (0, 0, 0, 0)),  # Week2's
    ((2, 7, 9, 3), (3, 3), (2, 2), (1, 1, 1, 1)),  # overlapping windows, 'same'-style padding
    ((1, 5, 6, 2), (2, 3), (1, 2), (0, 1, 1, 1)),
]


@pytest.fixture(scope="module", params=[False, True], ids=["int-index", "64-bit-index"])
def gpu(request):
    """tinycnn.kernels.gpu as imported under the stand-in cupy; the real modules come back after."""
    with cuda_shim.gpu_module() as module:
        if request.param:  # every launch takes the module with 64-bit indices (arrays of 2**31 elements)
            module.WIDE = 0
        yield module


def _no_ties(shape, dtype, seed):
    """Distinct values (max-pool gradients are defined without ties), shuffled."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape).astype(dtype)


def check_im2col_col2im(k, dtype, shape, kh, kw, stride, pads):
    x = _no_ties(shape, dtype, 0)
    cols = k.im2col(x, kh, kw, stride, pads)
    np.testing.assert_array_equal(cols, R.im2col(x, kh, kw, stride, pads))  # a copy: exact
    dcols = np.random.default_rng(1).standard_normal(cols.shape).astype(dtype)
    np.testing.assert_allclose(k.col2im(dcols, shape, kh, kw, stride, pads), R.col2im(dcols, shape, kh, kw, stride, pads),
                               rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)


def check_maxpool(k, dtype, shape, pool, stride, pads):
    x = _no_ties(shape, dtype, 2)
    y, argmax = k.maxpool_forward(x, pool, stride, pads)
    y_ref, argmax_ref = R.maxpool_forward(x, pool, stride, pads)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    dy = np.random.default_rng(3).standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(k.maxpool_backward(dy, argmax, shape, pool, stride, pads),
                               R.maxpool_backward(dy, argmax_ref, shape, pool, stride, pads), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS)
def test_im2col_and_col2im(gpu, dtype, shape, kh, kw, stride, pads):
    check_im2col_col2im(gpu.GPUKernels(), dtype, shape, kh, kw, stride, pads)


def check_conv(k, dtype, shape, kh, kw, stride, pads, filters=5):
    """The convolution, forward and backward (one kernel each for the output, the kernel gradient
    and the input gradient where the window is larger than a pixel), against the reference's."""
    x = _no_ties(shape, dtype, 4)
    rng = np.random.default_rng(5)
    kernel2d = rng.standard_normal((kh * kw * shape[3], filters)).astype(dtype)
    z, saved = k.conv2d_forward(x, kernel2d, kh, kw, stride, pads)
    z_ref, cols = R.conv2d_forward(x, kernel2d, kh, kw, stride, pads)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z, z_ref, **tol)
    dz = rng.standard_normal(z.shape).astype(dtype)
    dk, dk_ref = np.empty_like(kernel2d), np.empty_like(kernel2d)
    dx = k.conv2d_backward(dz, saved, shape, kernel2d, kh, kw, stride, pads, dk, True)
    dx_ref = R.conv2d_backward(dz, cols, shape, kernel2d, kh, kw, stride, pads, dk_ref, True)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dk, dk_ref, **tol)
    dk_alone = np.empty_like(kernel2d)
    assert k.conv2d_backward(dz, saved, shape, kernel2d, kh, kw, stride, pads, dk_alone, False) is None
    np.testing.assert_array_equal(dk_alone, dk)
    strided = np.empty((kernel2d.shape[1], kernel2d.shape[0]), dtype=dtype).T  # a gradient slot not C-contiguous
    k.conv2d_backward(dz, saved, shape, kernel2d, kh, kw, stride, pads, strided, False)
    np.testing.assert_allclose(strided, dk, **tol)  # a 1x1's GEMM into a strided array may round otherwise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kh, kw, stride, pads", CONVS + [((2, 5, 6, 4), 1, 1, (1, 1), (0, 0, 0, 0)),
                                                                   ((2, 5, 6, 4), 1, 1, (2, 2), (0, 0, 0, 0))])
def test_conv(gpu, dtype, shape, kh, kw, stride, pads):
    check_conv(gpu.GPUKernels(), dtype, shape, kh, kw, stride, pads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, pool, stride, pads", POOLS)
def test_maxpool(gpu, dtype, shape, pool, stride, pads):
    check_maxpool(gpu.GPUKernels(), dtype, shape, pool, stride, pads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_draws_the_reference_mask(gpu, dtype):
    k = gpu.GPUKernels()
    x = np.random.default_rng(4).standard_normal((3, 5, 5, 7)).astype(dtype)
    # offsets past 2**32: the kernel once hashed a 32-bit truncated index there (other masks)
    for rate, seed, offset in ((0.1, 12345, 0), (0.5, 2**63 - 1, 1000), (0.9, 7, 2**33), (0.5, 7, 2**32 - 100)):
        y, saved = k.dropout_forward(x, rate, seed, offset)
        y_ref, mask_ref = R.dropout_forward(x, rate, seed, offset)
        np.testing.assert_array_equal(y, y_ref)
        dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
        np.testing.assert_array_equal(k.dropout_backward(dy, saved), R.dropout_backward(dy, mask_ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_is_the_reference_update_to_the_bit(gpu, dtype):
    """With 1 - beta from the host (float64, then rounded) the GPU's update is the CPU's exactly;
    the old kernel's 1 - beta on the device differed (float32: 0.100000024 against 0.1)."""
    k = gpu.GPUKernels()
    rng = np.random.default_rng(6)
    param, grad = (rng.standard_normal(1000).astype(dtype) for _ in range(2))
    m, v = rng.standard_normal(1000).astype(dtype) * 0.1, rng.random(1000).astype(dtype) * 0.01
    ours, ref = [param.copy(), m.copy(), v.copy()], [param.copy(), m.copy(), v.copy()]
    for step in range(3):
        k.adam_update(ours[0], grad, ours[1], ours[2], 0.003 / (step + 1), 0.9, 0.999, 1e-7)
        R.adam_update(ref[0], grad, ref[1], ref[2], 0.003 / (step + 1), 0.9, 0.999, 1e-7)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


BN_SHAPES = [(5, 3), (300, 16), (1031, 7)]  # fewer rows than BN_PARTS, Week2's width, more rows and odd


def check_batchnorm(k, dtype, rows, c, rate, reduce=None, relu=False):
    """GPU BatchNorm (+ Dropout) forward and backward against the reference composite; the dropout
    mask must be the reference's exactly, everything else to float round-off. relu: the ReLU before
    it too (the relu_batchnorm entries), on inputs half of which are negative."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((rows, c)) * 3 + (0 if relu else 5)).astype(dtype)  # an offset mean: cancellation shows
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal((rows, c)).astype(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    moving = [rng.standard_normal(c).astype(dtype), rng.random(c).astype(dtype)]  # updated by the forward
    expected = [a.copy() for a in moving]
    if relu:
        out = k.relu_batchnorm_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce, (*moving, 0.99))
        ref = R.relu_batchnorm_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce)
        np.testing.assert_array_equal(out[0] == 0, ref[0] == 0)  # the same dropped (and ReLU-zeroed) elements
        grads = k.relu_batchnorm_backward_train(dy, out[1], gamma, out[4], reduce)
        grads_ref = R.relu_batchnorm_backward_train(dy, ref[1], gamma, ref[4], reduce)
        assert np.array_equal(grads[0] == 0, grads_ref[0] == 0) and (grads[0][x <= 0] == 0).all()
    elif rate:
        out = k.batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce, (*moving, 0.99))
        ref = R.batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce)
        np.testing.assert_array_equal(out[0] == 0, ref[0] == 0)  # the same dropped elements
        targets = np.full(c, np.nan, dtype), np.full(c, np.nan, dtype)  # dgamma and dbeta written there
        grads = k.batchnorm_dropout_backward_train(dy, out[1], gamma, out[4], reduce, targets)
        assert grads[1] is targets[0] and grads[2] is targets[1]
        grads_ref = R.batchnorm_dropout_backward_train(dy, ref[1], gamma, ref[4], reduce)
    else:
        out = k.batchnorm_forward_train(x, gamma, beta, 1e-3, reduce, (*moving, 0.99))
        ref = R.batchnorm_forward_train(x, gamma, beta, 1e-3, reduce)
        grads = k.batchnorm_backward_train(dy, out[1], gamma, out[4], reduce)
        grads_ref = R.batchnorm_backward_train(dy, ref[1], gamma, ref[4], reduce)
    for a, b in zip((out[0], *out[2:], *grads), (ref[0], *ref[2:], *grads_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)
    R.batchnorm_moving_update(*expected, out[2], out[3], 0.99)  # the update, from the set's own statistics
    for a, b in zip(moving, expected):
        np.testing.assert_array_equal(a, b)
    # The column reductions count arrivals per column; a launch leaves the counts as it found them,
    # so the same forward again finds the same statistics (a leftover count would skip the totals).
    if relu:
        again = k.relu_batchnorm_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce)
    elif rate:
        again = k.batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, rate, 99, 12, reduce)
    else:
        again = k.batchnorm_forward_train(x, gamma, beta, 1e-3, reduce)
    for a, b in zip((out[0], *out[2:]), (again[0], *again[2:])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, c", BN_SHAPES)
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_batchnorm_with_and_without_dropout(gpu, dtype, rows, c, rate):
    check_batchnorm(gpu.GPUKernels(), dtype, rows, c, rate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, c", BN_SHAPES)
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_relu_then_batchnorm_in_the_batchnorm_kernels(gpu, dtype, rows, c, rate):
    check_batchnorm(gpu.GPUKernels(), dtype, rows, c, rate, relu=True)
    check_batchnorm(gpu.GPUKernels(), dtype, rows, c, rate, reduce=lambda totals: totals, relu=True)


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_batchnorm_sums_through_the_data_parallel_reduce(gpu, rate):
    """With `reduce` the moments come from the float64 totals [sum x, sum x^2, rows] it is given:
    a reduce that doubles them (two ranks with the same rows) leaves the statistics unchanged and
    must be called on that layout."""
    seen = []

    def two_ranks(totals):
        seen.append(totals.shape)
        totals *= 2
        return totals

    check_batchnorm(gpu.GPUKernels(), np.float64, 300, 16, rate, reduce=two_ranks)
    assert seen and all(shape == (2 * 16 + 1,) for shape in seen)


def test_batchnorm_matches_the_cpu_set(gpu):
    """The GPU and CPU sets compute BatchNorm the same way (float64 shifted sums): float32 results
    agree far below the reference's tolerance."""
    from tinycnn.kernels.cpu import CPUKernels

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((128 * 13 * 13, 16)) + 2).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    ours = gpu.GPUKernels().batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, 0.1, 5)
    cpu = CPUKernels().batchnorm_dropout_forward_train(x, gamma, beta, 1e-3, 0.1, 5)
    for a, b in zip((ours[0], *ours[2:]), (cpu[0], *cpu[2:])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_1x1_convolution_needs_no_im2col_copy(gpu, dtype):
    k = gpu.GPUKernels()
    x = _no_ties((2, 5, 6, 4), dtype, 9)
    cols = k.im2col(x, 1, 1, (1, 1), (0, 0, 0, 0))
    assert np.shares_memory(cols, x)
    np.testing.assert_array_equal(cols, R.im2col(x, 1, 1, (1, 1), (0, 0, 0, 0)))
    np.testing.assert_array_equal(k.col2im(cols, x.shape, 1, 1, (1, 1), (0, 0, 0, 0)), x)
    check_im2col_col2im(k, dtype, (2, 5, 6, 4), 1, 1, (2, 2), (0, 0, 0, 0))  # strided 1x1: the kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 4, 10), (3, 5, 7, 3), (1, 1, 1, 2)])  # Week2's, odd, one pixel
def test_global_average_pooling(gpu, dtype, shape):
    """Forward against the reference's mean (summed in double here: to float round-off); backward,
    dy / (H*W) at every pixel, to the bit."""
    k = gpu.GPUKernels()
    rng = np.random.default_rng(13)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    y = k.global_avgpool_forward(x)
    assert y.dtype == dtype and y.shape == (shape[0], shape[3])
    np.testing.assert_allclose(y, x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(y, R.global_avgpool_forward(x), rtol=1e-5 if dtype == np.float32 else 1e-13)
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(k.global_avgpool_backward(dy, shape), R.global_avgpool_backward(dy, shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_and_the_moving_statistics(gpu, dtype):
    """Both to the bit: ReLU's gradient (NaN and -0.0 in y pass nothing, as on the CPU) and
    BatchNorm's moving averages (the complement 1 - momentum from the host, as NumPy takes it)."""
    k = gpu.GPUKernels()
    rng = np.random.default_rng(12)
    y = rng.standard_normal((3, 7, 5)).astype(dtype)
    y[0, 0, :3] = [np.nan, -0.0, 0.0]
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(k.relu_backward(dy, y), np.where(y > 0, dy, 0).astype(dtype))
    moving = [rng.standard_normal(16).astype(dtype), rng.random(16).astype(dtype)]
    reference = [m.copy() for m in moving]
    mean, var = rng.standard_normal(16).astype(dtype), rng.random(16).astype(dtype)
    k.batchnorm_moving_update(*moving, mean, var, 0.99)
    R.batchnorm_moving_update(*reference, mean, var, 0.99)
    for a, b in zip(moving, reference):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-7])
def test_softmax_cross_entropy(gpu, dtype, eps):
    """Against the reference to round-off (exp and log are the platform's), with and without the
    clip; extreme logits (probabilities under eps) make the clip matter."""
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal((37, 10)) * 4).astype(dtype)
    logits[0, 3], logits[1, 0] = 60, -60
    targets = np.eye(10, dtype=dtype)[rng.integers(0, 10, 37)]
    targets[1] = np.eye(10, dtype=dtype)[0]  # a target class with p far under eps
    ours = gpu.GPUKernels().softmax_cross_entropy(logits, targets, eps)
    ref = R.softmax_cross_entropy(logits, targets, eps)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)
    # a training step's form: the gradient times 1/batch and the losses' sum, in the kernel's own pass
    k = gpu.GPUKernels()
    for rows in (37, 1, 0):  # twice with the same counters (the last row resets them), and an empty batch
        total, scale = np.full((), np.nan, dtype), dtype(1.0 / 37)
        ours = k.softmax_cross_entropy(logits[:rows], targets[:rows], eps, scale, total)
        ref_total = np.zeros((), dtype)
        ref = R.softmax_cross_entropy(logits[:rows], targets[:rows], eps, scale, ref_total)
        np.testing.assert_allclose(ours[2], ref[2], **tol)
        np.testing.assert_allclose(total, ref_total, **tol)
        assert rows == 0 or total != 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_categorical_matches(gpu, dtype):
    """The accuracy's count against argmax == argmax: ties to the first maximum, NaN as the largest."""
    k = gpu.GPUKernels()
    rng = np.random.default_rng(14)
    predictions = rng.random((41, 10)).astype(dtype)
    targets = np.eye(10, dtype=dtype)[rng.integers(0, 10, 41)]
    predictions[:12] = targets[:12]  # hits
    predictions[12, :] = 0.5  # a tie: the first column wins
    predictions[13, 4] = np.nan  # NaN: column 4 wins
    targets[13] = np.eye(10, dtype=dtype)[4]
    for rows in (41, 41, 1, 0):  # twice with the same counters, one row, none
        count = k.categorical_matches(predictions[:rows], targets[:rows])
        expected = R.categorical_matches(predictions[:rows], targets[:rows])
        assert count.dtype == np.int64 and int(count) == int(expected), (rows, count, expected)
    assert int(R.categorical_matches(predictions, targets)) >= 13
    running = np.array(5, dtype=np.int64)  # an epoch's count: the kernel adds into it and returns it
    assert k.categorical_matches(predictions, targets, running) is running
    assert int(running) == 5 + int(R.categorical_matches(predictions, targets))


def test_dropout_keys_and_masks_from_device_keys(gpu):
    """A static step's keys, computed from its counters on the device, are the reference's; a mask
    drawn from such a key (read from device memory) is the mask of the seed it stands for."""
    from tinycnn.randomness import DeviceKey

    k = gpu.GPUKernels()
    rng = np.random.default_rng(10)
    args = (rng.integers(0, 2**63, 9, dtype=np.uint64), rng.integers(0, 4, 9).astype(np.uint64),
            rng.integers(1, 4, 9).astype(np.uint64), np.array([2**35 + 7], np.uint64))
    ours, ref = np.zeros(9, np.uint32), np.ones(9, np.uint32)
    k.dropout_keys(*args, ours)
    R.dropout_keys(*args, ref)
    np.testing.assert_array_equal(ours, ref)
    x = np.random.default_rng(4).standard_normal((3, 5, 5, 7)).astype(np.float32)
    y, _ = k.dropout_forward(x, 0.3, DeviceKey(ours, 4), 17)
    y_ref, _ = R.dropout_forward(x, 0.3, DeviceKey(ref, 4), 17)
    np.testing.assert_array_equal(y, y_ref)
    x2d = x.reshape(-1, 7)
    ones, zeros = np.ones(7, np.float32), np.zeros(7, np.float32)
    out = k.batchnorm_dropout_forward_train(x2d, ones, zeros, 1e-3, 0.3, DeviceKey(ours, 4), 17)
    out_ref = R.batchnorm_dropout_forward_train(x2d, ones, zeros, 1e-3, 0.3, DeviceKey(ref, 4), 17)
    np.testing.assert_array_equal(out[0] == 0, out_ref[0] == 0)


def test_the_checks_above_cover_every_cuda_kernel(gpu):
    """A kernel added to cuda_source fails this until a check above runs it."""
    from tinycnn.kernels import cuda_source

    assert set(cuda_source.KERNELS) == {
        "tinycnn_im2col", "tinycnn_col2im", "tinycnn_conv_forward", "tinycnn_conv_filter_grad",
        "tinycnn_conv_input_grad", "tinycnn_maxpool_forward",
        "tinycnn_maxpool_backward", "tinycnn_dropout_forward", "tinycnn_dropout_backward", "tinycnn_adam", "tinycnn_bn_forward_partials",
        "tinycnn_bn_backward_partials", "tinycnn_bn_moments", "tinycnn_bn_normalize",
        "tinycnn_bn_backward_dx", "tinycnn_dropout_keys", "tinycnn_bn_moving_update", "tinycnn_relu_backward",
        "tinycnn_softmax_ce", "tinycnn_global_avgpool_forward", "tinycnn_global_avgpool_backward",
        "tinycnn_categorical_matches"}


def mutated(old, new):
    """GPUKernels' source with `old` replaced by `new` (to show that a check catches the bug)."""
    from tinycnn.kernels.cuda_source import module_source

    def source(dtype, wide):
        text = module_source(dtype, wide)
        assert old in text, f"{old!r} is not in the CUDA source"
        return text.replace(old, new)
    return source


def test_an_injected_off_by_one_fails_these_checks(gpu):
    """The checks above would see a wrong index: in im2col, the convolution's three kernels, max-pool
    and BatchNorm's sums."""
    with pytest.raises(AssertionError):
        check_im2col_col2im(gpu.GPUKernels(mutated("oy * sh + a - top", "oy * sh + a - top + 1")), np.float32,
                            *CONVS[1])
    with pytest.raises(AssertionError):  # the input gradient's filter sum one short
        check_conv(gpu.GPUKernels(mutated("for (int q = 0; q < f; ++q)", "for (int q = 1; q < f; ++q)")),
                   np.float32, *CONVS[0])
    with pytest.raises(AssertionError):  # the forward's window one row off
        check_conv(gpu.GPUKernels(mutated("const int y = oy * sh + a - top;\n            if (y < 0 || y >= h)",
                                          "const int y = oy * sh + a - top + 1;\n            if (y < 0 || y >= h)")),
                   np.float32, *CONVS[1])
    with pytest.raises(AssertionError):  # the kernel gradient's last partial sum left out
        check_conv(gpu.GPUKernels(mutated("for (int p = 0; p < parts; ++p) total +=",
                                          "for (int p = 1; p < parts; ++p) total +=")), np.float32,
                   (2, 30, 30, 2), 3, 3, (1, 1), (1, 1, 1, 1))  # 1,800 rows: 2 parts
    with pytest.raises(AssertionError):
        check_maxpool(gpu.GPUKernels(mutated("k = a * pw + d;", "k = a * pw + d + 1;")), np.float32, *POOLS[0])
    with pytest.raises(AssertionError):  # a ReLU that passes negative inputs into the BatchNorm
        check_batchnorm(gpu.GPUKernels(mutated("return (!relu || v >= (T)0 || v != v) ? v : (T)0;",
                                               "return v;")), np.float32, 300, 16, 0, relu=True)
    with pytest.raises(AssertionError):  # a partial sum that skips the last row of its stride
        check_batchnorm(gpu.GPUKernels(mutated("for (I r = part; r < m; r += parts)",
                                               "for (I r = part; r + parts < m; r += parts)")), np.float32, 300, 16, 0)
    check_maxpool(gpu.GPUKernels(), np.float32, *POOLS[0])  # and the real kernels pass


@pytest.mark.gpu
@pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"no GPU backend: {GPU_PROBLEM}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gpu_computes_what_the_cpu_played_kernels_compute_bit_for_bit(gpu, dtype):
    """On a GPU: each kernel gives exactly the results of the same source played on the CPU (no
    fused multiply-adds on either side, every work item's loop in the same order; the inputs hold
    no subnormals, which the GPU flushes)."""
    real, played = REAL_GPU.GPUKernels(), gpu.GPUKernels()
    rng = np.random.default_rng(11)

    def same(name, *args):
        def host(value):
            return cupy.asnumpy(value) if isinstance(value, cupy.ndarray) else value

        def device(value):
            return cupy.asarray(value) if isinstance(value, np.ndarray) else value

        ours = getattr(real, name)(*map(device, args))
        theirs = getattr(played, name)(*args)
        pairs = zip(*(r if isinstance(r, tuple) else (r,) for r in (ours, theirs)))
        for a, b in pairs:
            if isinstance(a, tuple):  # saved state: compared through the backward passes below
                continue
            np.testing.assert_array_equal(host(a), b, err_msg=name)
        return ours, theirs

    shape, kh, kw, stride, pads = CONVS[1]
    x = _no_ties(shape, dtype, 12)
    cols = same("im2col", x, kh, kw, stride, pads)[1]
    same("col2im", cols, shape, kh, kw, stride, pads)
    kernel2d = rng.standard_normal((cols.shape[1], 5)).astype(dtype)
    z, saved = same("conv2d_forward", x, kernel2d, kh, kw, stride, pads)[1]
    dz = rng.standard_normal(z.shape).astype(dtype)
    dk_real, dk_played = cupy.empty(kernel2d.shape, dtype=dtype), np.empty_like(kernel2d)
    dx_real = real.conv2d_backward(cupy.asarray(dz), cupy.asarray(saved), shape, cupy.asarray(kernel2d), kh, kw, stride,
                                   pads, dk_real, True)
    dx_played = played.conv2d_backward(dz, saved, shape, kernel2d, kh, kw, stride, pads, dk_played, True)
    np.testing.assert_array_equal(cupy.asnumpy(dx_real), dx_played)
    np.testing.assert_array_equal(cupy.asnumpy(dk_real), dk_played)
    shape, pool, stride, pads = POOLS[1]
    x = _no_ties(shape, dtype, 13)
    y, argmax = same("maxpool_forward", x, pool, stride, pads)[1]
    same("maxpool_backward", rng.standard_normal(y.shape).astype(dtype), argmax, shape, pool, stride, pads)
    x2d = (rng.standard_normal((1031, 16)) * 3 + 5).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(dtype), rng.standard_normal(16).astype(dtype)
    fwd_real, fwd_played = same("batchnorm_dropout_forward_train", x2d, gamma, beta, 1e-3, 0.25, 99, 12)
    dy = rng.standard_normal(x2d.shape).astype(dtype)
    back_real = real.batchnorm_dropout_backward_train(cupy.asarray(dy), fwd_real[1], cupy.asarray(gamma), fwd_real[4])
    back_played = played.batchnorm_dropout_backward_train(dy, fwd_played[1], gamma, fwd_played[4])
    for a, b in zip(back_real, back_played):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
    y, saved = same("dropout_forward", x2d, 0.3, 2**40 + 5, 2**33)
    keys = (rng.integers(0, 2**63, 5, dtype=np.uint64), np.arange(5, dtype=np.uint64), np.ones(5, np.uint64),
            np.array([12345], np.uint64))
    keys_real, keys_played = cupy.zeros(5, cupy.uint32), np.zeros(5, np.uint32)
    real.dropout_keys(*map(cupy.asarray, keys), keys_real)
    played.dropout_keys(*keys, keys_played)
    np.testing.assert_array_equal(cupy.asnumpy(keys_real), keys_played)
    same("relu_backward", rng.standard_normal((5, 9)).astype(dtype), rng.standard_normal((5, 9)).astype(dtype))
    same("global_avgpool_forward", rng.standard_normal((3, 5, 7, 4)).astype(dtype))
    same("global_avgpool_backward", rng.standard_normal((3, 4)).astype(dtype), (3, 5, 7, 4))
    predictions, targets = rng.random((9, 10)).astype(dtype), np.eye(10, dtype=dtype)[rng.integers(0, 10, 9)]
    same("categorical_matches", predictions, targets)
    moving = [rng.random(16).astype(dtype) for _ in range(2)]
    stats = [rng.random(16).astype(dtype) for _ in range(2)]
    moving_real = [cupy.asarray(a) for a in moving]
    real.batchnorm_moving_update(*moving_real, *map(cupy.asarray, stats), 0.99)
    played.batchnorm_moving_update(*moving, *stats, 0.99)
    for a, b in zip(moving_real, moving):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
    param, grad = rng.standard_normal(1000).astype(dtype), rng.standard_normal(1000).astype(dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    slots = [cupy.asarray(a) for a in (param, m, v)]
    real.adam_update(slots[0], cupy.asarray(grad), slots[1], slots[2], 0.003, 0.9, 0.999, 1e-7)
    played.adam_update(param, grad, m, v, 0.003, 0.9, 0.999, 1e-7)
    for a, b in zip(slots, (param, m, v)):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
