"""The hot kernels, written once against the array module of their inputs (NumPy or CuPy).

These are the definition of each kernel: the numba (kernels_cpu) and CuPy (kernels_gpu)
versions must agree with them, and tests check that they do. All images are NHWC.

Conventions shared by every implementation:
- `pads` is (top, bottom, left, right); `stride` is (sh, sw).
- im2col rows are output pixels in (n, oh, ow) order and columns are (kh, kw, c), so a Keras
  kernel of shape (kh, kw, c_in, c_out) reshaped to (kh*kw*c_in, c_out) multiplies it directly.
"""
from .backend import get_array_module

KERNELS = (
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward",
    "maxpool_forward",
    "maxpool_backward",
    "relu_forward",
    "relu_backward",
    "batchnorm_forward_train",
    "batchnorm_forward_infer",
    "batchnorm_backward_train",
    "batchnorm_dropout_forward_train",
    "batchnorm_dropout_backward_train",
    "dropout_forward",
    "dropout_backward",
    "softmax_cross_entropy",
    "adam_update",
)


def output_hw(h, w, kh, kw, stride, pads=(0, 0, 0, 0)):
    """(OH, OW) of a kh x kw window moving by `stride` over an h x w image padded by `pads`."""
    return (h + pads[0] + pads[1] - kh) // stride[0] + 1, (w + pads[2] + pads[3] - kw) // stride[1] + 1


def _pad(x, pads, value=0.0):
    xp = get_array_module(x)
    top, bottom, left, right = pads
    if not any(pads):
        return x
    return xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def im2col(x, kh, kw, stride, pads):
    """(N, H, W, C) -> (N*OH*OW, kh*kw*C) patch matrix.

    A loop over the kh*kw kernel offsets only; each step copies one strided slice of the whole
    batch, so the Python overhead is kh*kw array operations regardless of the image size.
    """
    xp = get_array_module(x)
    n, h, w, c = x.shape
    sh, sw = stride
    oh, ow = output_hw(h, w, kh, kw, stride, pads)
    xpad = _pad(x, pads)
    cols = xp.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xpad[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
    return cols.reshape(n * oh * ow, kh * kw * c)


def col2im(cols, x_shape, kh, kw, stride, pads):
    """Adjoint of im2col: sums each patch entry back onto the input pixel it was copied from."""
    xp = get_array_module(cols)
    n, h, w, c = x_shape
    sh, sw = stride
    top, bottom, left, right = pads
    oh, ow = output_hw(h, w, kh, kw, stride, pads)
    cols = cols.reshape(n, oh, ow, kh, kw, c)
    dx = xp.zeros((n, h + top + bottom, w + left + right, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :] += cols[:, :, :, i, j, :]
    return dx[:, top : top + h, left : left + w, :]


def conv2d_forward(x, kernel2d, kh, kw, stride, pads):
    """Convolution as im2col + one GEMM. Returns (z as (N*OH*OW, F), what backward needs)."""
    cols = im2col(x, kh, kw, stride, pads)
    return cols @ kernel2d, cols


def conv2d_backward(dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
    """Writes the kernel gradient into dkernel2d (K, F); returns the input gradient (or None)."""
    xp = get_array_module(dz)
    cols = saved
    xp.matmul(cols.T, dz, out=dkernel2d)
    if not need_dx:
        return None
    return col2im(dz @ kernel2d.T, x_shape, kh, kw, stride, pads)


def _windows(x, pool, stride):
    """(N, OH, OW, ph*pw, C) view-copy of every pooling window (valid padding)."""
    xp = get_array_module(x)
    n, h, w, c = x.shape
    (ph, pw), (sh, sw) = pool, stride
    oh, ow = output_hw(h, w, ph, pw, stride)
    win = xp.empty((n, oh, ow, ph * pw, c), dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            win[:, :, :, i * pw + j, :] = x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
    return win


def maxpool_forward(x, pool, stride):
    """Valid max-pooling. Returns (y, argmax) with argmax the window offset i*pw + j of the
    first maximum, as int8 (windows are small); ties go to the first, so the gradient is exact."""
    xp = get_array_module(x)
    win = _windows(x, pool, stride)
    argmax = xp.argmax(win, axis=3).astype(xp.int8)
    y = xp.take_along_axis(win, argmax[:, :, :, None, :].astype(xp.intp), axis=3)[:, :, :, 0, :]
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, pool, stride):
    xp = get_array_module(dy)
    (ph, pw), (sh, sw) = pool, stride
    oh, ow = dy.shape[1], dy.shape[2]
    dx = xp.zeros(x_shape, dtype=dy.dtype)
    for i in range(ph):
        for j in range(pw):
            hit = argmax == (i * pw + j)
            dx[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :] += dy * hit
    return dx


def relu_forward(x):
    xp = get_array_module(x)
    return xp.maximum(x, 0)


def relu_backward(dy, y):
    """Gradient of ReLU given its output y (y > 0 exactly where the input was > 0)."""
    return dy * (y > 0)


def batchnorm_forward_train(x2d, gamma, beta, eps):
    """Batch statistics over rows of (M, C). Returns y, saved, mean, biased var, 1/sqrt(var+eps),
    where `saved` is what batchnorm_backward_train of the same module needs (here: xhat)."""
    xp = get_array_module(x2d)
    mean = x2d.mean(axis=0)
    centered = x2d - mean
    var = (centered * centered).mean(axis=0)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = centered * inv_std
    return xhat * gamma + beta, xhat, mean, var, inv_std


def batchnorm_dropout_forward_train(x2d, gamma, beta, eps, rate, seed):
    """BatchNormalization then Dropout(rate) with the mask of dropout_forward(., rate, seed):
    one kernel where a backend can fuse them. Returns y, saved, mean, var, inv_std."""
    y, xhat, mean, var, inv_std = batchnorm_forward_train(x2d, gamma, beta, eps)
    y, mask = dropout_forward(y, rate, seed)
    return y, (xhat, mask), mean, var, inv_std


def batchnorm_dropout_backward_train(dy2d, saved, gamma, inv_std):
    xhat, mask = saved
    return batchnorm_backward_train(dropout_backward(dy2d, mask), xhat, gamma, inv_std)


def batchnorm_forward_infer(x2d, gamma, beta, moving_mean, moving_var, eps):
    """Inference: an affine map per channel. Returns y and the per-channel scale."""
    scale = gamma / get_array_module(x2d).sqrt(moving_var + eps)
    return x2d * scale + (beta - moving_mean * scale), scale


def batchnorm_backward_train(dy2d, xhat, gamma, inv_std):
    """The full batch-statistics gradient (mean and variance depend on every row).
    Returns dx, dgamma, dbeta."""
    m = dy2d.shape[0]
    dbeta = dy2d.sum(axis=0)
    dgamma = (dy2d * xhat).sum(axis=0)
    dx = (gamma * inv_std / m) * (m * dy2d - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


_HASH_MASK = 0xFFFFFFFF


def _lowbias32(h, xp):
    """A 32-bit integer hash (bijective, good avalanche) on uint64 arrays holding 32-bit values.
    Written with explicit masking so NumPy, numba and CUDA compute the same bits."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _HASH_MASK
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _HASH_MASK
    return h ^ (h >> 16)


def dropout_keep_threshold(rate):
    """Entries whose 24-bit hash is below this are dropped: P(drop) = rate to within 2**-24."""
    return min(int(round(rate * (1 << 24))), (1 << 24) - 1)


def dropout_key(seed):
    """The per-call key mixed into every element's hash (seed: a Python int drawn by the layer)."""
    import numpy

    return int(_lowbias32(numpy.array([seed & _HASH_MASK], dtype=numpy.uint64), numpy)[0]) ^ ((seed >> 32) & _HASH_MASK)


def dropout_forward(x, rate, seed):
    """Inverted dropout with a counter-based mask: element i is kept when
    hash(i ^ key(seed)) >> 8 >= threshold. The mask depends only on (seed, i), so every
    implementation (NumPy, numba, CuPy) draws the same mask for the same seed, in parallel.
    Returns y and the scaled mask (what backward multiplies by)."""
    xp = get_array_module(x)
    index = xp.arange(x.size, dtype=xp.uint64)
    bits = _lowbias32(index ^ xp.uint64(dropout_key(seed)), xp) >> 8
    keep = (bits >= dropout_keep_threshold(rate)).reshape(x.shape)
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - rate))
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


def softmax_cross_entropy(logits, targets, eps=1e-7):
    """Softmax and categorical cross-entropy from logits, numerically stable.

    Returns (probs, per-sample loss, gradient of the per-sample loss w.r.t. the logits).
    The loss clips probabilities to [eps, 1 - eps] as Keras does, so the printed loss matches;
    the gradient is the exact softmax-CE gradient p - t (it differs from Keras's clipped
    gradient only where a target class has p < 1e-7).
    """
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    probs = exp / total
    log_probs = shifted - xp.log(total)
    log_probs = xp.clip(log_probs, xp.log(logits.dtype.type(eps)), xp.log1p(logits.dtype.type(-eps)))
    loss = -(targets * log_probs).sum(axis=1)
    return probs, loss, probs - targets


def adam_update(param, grad, m, v, lr_t, beta_1, beta_2, epsilon):
    """In-place Keras Adam step with the bias correction folded into lr_t (epsilon-hat form):
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); p -= lr_t * m / (sqrt(v) + eps)."""
    xp = get_array_module(param)
    m += (grad - m) * (1 - beta_1)
    v += (grad * grad - v) * (1 - beta_2)
    param -= lr_t * m / (xp.sqrt(v) + epsilon)
