"""The reference kernel set: the definition of every kernel, written once against the array
module of its inputs (NumPy on the CPU, CuPy on the GPU).

A backend's kernel set is a subclass that overrides some entries with faster code (numba on the
CPU, CUDA on the GPU) and declares them in `overrides`; the class refuses to exist if the two
disagree or if it defines a public method the reference set does not have (a misspelt
override would otherwise fall back to the reference silently). Composite kernels here call the
primitives through `self`, so an override of a primitive changes every composite that uses it.
Tests compare every override with the reference on awkward shapes.

Conventions shared by every implementation (all images NHWC):
- `pads` is (top, bottom, left, right); `stride` is (sh, sw); `pool` is (ph, pw).
- im2col rows are output pixels in (n, oh, ow) order and columns are (kh, kw, c), so a Keras
  kernel of shape (kh, kw, c_in, c_out) reshaped to (kh*kw*c_in, c_out) multiplies it directly.
- Max-pool argmax is the int32 offset i*pw + j of the first maximum in its window.
- A dropout `seed` is an int, or a tinycnn.randomness.DeviceKey (a key in device memory, from a
  static step's `dropout_keys`).
- Kernels return new arrays and never modify their inputs unless a name says so (`*_update`).
"""
import numpy as np

from ..arrays import get_array_module
from ..randomness import GOLDEN_GAMMA, HASH_MASK, MIX_1, MIX_2, dropout_keep_threshold, index_hashes, lowbias32


def output_hw(h, w, kh, kw, stride, pads=(0, 0, 0, 0)):
    """(OH, OW) of a kh x kw window moving by `stride` over an h x w image padded by `pads`."""
    return (h + pads[0] + pads[1] - kh) // stride[0] + 1, (w + pads[2] + pads[3] - kw) // stride[1] + 1


def pad_nhwc(x, pads, value=0.0):
    """x with `pads` rows and columns of `value` around each image (x itself when pads are 0)."""
    if not any(pads):
        return x
    xp = get_array_module(x)
    top, bottom, left, right = pads
    return xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _window_slice(i, j, stride, oh, ow):
    """The (rows, cols) slices of a padded image that window offset (i, j) visits."""
    sh, sw = stride
    return slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)


def global_moments(x2d, reduce):
    """The mean and biased variance per column of rows spread over ranks: `reduce` sums the float64
    [sum of x, sum of x^2, row count] over them in place. float64 keeps E[x^2] - E[x]^2 exact to
    far below float32's resolution for activations of any sensible scale."""
    xp = get_array_module(x2d)
    c = x2d.shape[1]
    x64 = x2d.astype(xp.float64)
    totals = reduce(xp.concatenate([x64.sum(axis=0), (x64 * x64).sum(axis=0), xp.array([x2d.shape[0]], xp.float64)]))
    return moments_from_sums(totals, c, x2d.dtype)


def moments_from_sums(totals, c, dtype):
    """(mean, biased variance) in `dtype` from [sum of x (c), sum of x^2 (c), count]."""
    xp = get_array_module(totals)
    count = totals[2 * c]
    mean = totals[:c] / count
    var = xp.maximum(totals[c : 2 * c] / count - mean * mean, 0.0)
    return mean.astype(dtype), var.astype(dtype)


def written_into(out, *values):
    """`values`, each copied into its array of `out` where `out` gives one (a BatchNorm backward's
    dgamma and dbeta into the model's gradient buffer: tinycnn.parameters.gradient_target)."""
    written = []
    for target, value in zip(out, values):
        if target is not None:
            target[...] = value
            value = target
        written.append(value)
    return written


def global_gradient_sums(dbeta, dgamma, rows, reduce):
    """Batch normalization's two gradient sums and the row count, summed over the ranks by `reduce`.
    Returns them in float64 (the count too: a 0-d array, which stays on the device)."""
    xp = get_array_module(dbeta)
    c = dbeta.shape[0]
    totals = reduce(xp.concatenate([dbeta.astype(xp.float64), dgamma.astype(xp.float64),
                                    xp.array([rows], xp.float64)]))
    return totals[:c], totals[c : 2 * c], totals[2 * c]


class ReferenceKernels:
    """Plain array-module kernels: what every faster set is tested against."""

    name = "reference"
    overrides = ()  # a subclass lists the entries it defines itself
    # Whether the set's relu_batchnorm_* entries read the ReLU as BatchNorm reads its input (no pass
    # of their own): then an execution plan runs Conv(relu) -> BatchNorm (-> Dropout) through them
    # in training (tinycnn.plan). Here they are the composite, which a plan has no reason to choose.
    fuses_relu_batchnorm = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        defined = {name for name, value in vars(cls).items()
                   if callable(value) and not name.startswith("_") and name != "describe"}
        unknown = defined - set(kernel_names())
        if unknown:
            raise TypeError(f"{cls.__name__} defines {', '.join(sorted(unknown))}, which the reference kernel set "
                            "does not have (a misspelt override?)")
        if defined != set(cls.overrides):
            raise TypeError(f"{cls.__name__}.overrides must list exactly the kernels it defines: declared "
                            f"{sorted(cls.overrides)}, defined {sorted(defined)}")

    def describe(self):
        return self.name

    # -- windows: what convolution and pooling share ------------------------------------------
    def _windows(self, x, window, stride, pads, fill):
        """(N, OH, OW, kh*kw, C): every kh x kw window of x padded with `fill`, entry i*kw + j
        holding window offset (i, j).

        A loop over the kh*kw window offsets only; each step copies one strided slice of the
        whole batch, so the Python overhead is kh*kw array operations whatever the image size."""
        xp = get_array_module(x)
        n, h, w, c = x.shape
        kh, kw = window
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        xpad = pad_nhwc(x, pads, fill)
        win = xp.empty((n, oh, ow, kh * kw, c), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                rows, columns = _window_slice(i, j, stride, oh, ow)
                win[:, :, :, i * kw + j, :] = xpad[:, rows, columns, :]
        return win

    def _scatter_windows(self, entry, x_shape, window, stride, pads, xp, dtype):
        """Adjoint of _windows: the (N, H, W, C) sums, onto each input pixel, of the window entries
        gathered from it, where entry(k) gives the (N, OH, OW, C) values of entry k = i*kw + j
        (what lands on padding is dropped). Entries are made one at a time, so no array of every
        window is needed."""
        n, h, w, c = x_shape
        top, bottom, left, right = pads
        kh, kw = window
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        dx = xp.zeros((n, h + top + bottom, w + left + right, c), dtype=dtype)
        for i in range(kh):
            for j in range(kw):
                rows, columns = _window_slice(i, j, stride, oh, ow)
                dx[:, rows, columns, :] += entry(i * kw + j)
        return dx[:, top : top + h, left : left + w, :]

    # -- convolution ------------------------------------------------------------------------
    def im2col(self, x, kh, kw, stride, pads):
        """(N, H, W, C) -> (N*OH*OW, kh*kw*C) patch matrix: the zero-padded windows, one row each."""
        n, h, w, c = x.shape
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        return self._windows(x, (kh, kw), stride, pads, 0.0).reshape(n * oh * ow, kh * kw * c)

    def col2im(self, cols, x_shape, kh, kw, stride, pads):
        """Adjoint of im2col: sums each patch entry back onto the input pixel it was copied from."""
        n, h, w, c = x_shape
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        win = cols.reshape(n, oh, ow, kh * kw, c)
        return self._scatter_windows(lambda k: win[:, :, :, k, :], x_shape, (kh, kw), stride, pads,
                                     get_array_module(cols), cols.dtype)

    def conv2d_forward(self, x, kernel2d, kh, kw, stride, pads):
        """Convolution as im2col + one GEMM. Returns (z as (N*OH*OW, F), what backward needs)."""
        cols = self.im2col(x, kh, kw, stride, pads)
        return cols @ kernel2d, cols

    def conv2d_relu_forward(self, x, kernel2d, kh, kw, stride, pads):
        """conv2d_forward followed by ReLU (np.maximum(z, 0), in place): a set may fuse the two.
        Returns (y, what conv2d_backward needs)."""
        z, saved = self.conv2d_forward(x, kernel2d, kh, kw, stride, pads)
        return get_array_module(z).maximum(z, 0, out=z), saved

    def conv2d_backward(self, dz, saved, x_shape, kernel2d, kh, kw, stride, pads, dkernel2d, need_dx):
        """Writes the kernel gradient into dkernel2d (K, F); returns the input gradient (or None)."""
        xp = get_array_module(dz)
        cols = saved
        xp.matmul(cols.T, dz, out=dkernel2d)
        if not need_dx:
            return None
        return self.col2im(dz @ kernel2d.T, x_shape, kh, kw, stride, pads)

    def depthwise_conv2d_forward(self, x, kernel, stride, pads):
        """Each input channel c convolved with its own M filters kernel[:, :, c, :] (Keras layout
        (kh, kw, C, M)); output channel c*M + m. Returns (z as (N, OH, OW, C*M), saved)."""
        xp = get_array_module(x)
        n, h, w, c = x.shape
        kh, kw, _, m = kernel.shape
        oh, ow = output_hw(h, w, kh, kw, stride, pads)
        cols = self.im2col(x, kh, kw, stride, pads).reshape(-1, kh * kw, c)
        z = xp.einsum("pkc,kcm->pcm", cols, kernel.reshape(kh * kw, c, m))
        return z.reshape(n, oh, ow, c * m), cols

    def depthwise_conv2d_backward(self, dz, saved, x_shape, kernel, stride, pads, dkernel, need_dx):
        """Writes the kernel gradient into dkernel (kh, kw, C, M); returns the input gradient (or None)."""
        xp = get_array_module(dz)
        kh, kw, c, m = kernel.shape
        cols = saved
        dz3 = dz.reshape(-1, c, m)
        dkernel[...] = xp.einsum("pkc,pcm->kcm", cols, dz3).reshape(dkernel.shape)
        if not need_dx:
            return None
        dcols = xp.einsum("pcm,kcm->pkc", dz3, kernel.reshape(kh * kw, c, m))
        return self.col2im(dcols.reshape(cols.shape[0], kh * kw * c), x_shape, kh, kw, stride, pads)

    # -- pooling ----------------------------------------------------------------------------
    def maxpool_forward(self, x, pool, stride, pads):
        """Max-pooling (padding never wins: it is -inf). Returns (y, argmax); ties go to the first
        maximum, so the gradient is exact."""
        xp = get_array_module(x)
        win = self._windows(x, pool, stride, pads, -xp.inf)
        argmax = xp.argmax(win, axis=3).astype(xp.int32)
        y = xp.take_along_axis(win, argmax[:, :, :, None, :].astype(xp.intp), axis=3)[:, :, :, 0, :]
        return y, argmax

    def maxpool_backward(self, dy, argmax, x_shape, pool, stride, pads):
        """Each window's gradient goes to its argmax entry; the other entries get zero."""
        return self._scatter_windows(lambda k: dy * (argmax == k), x_shape, pool, stride, pads,
                                     get_array_module(dy), dy.dtype)

    def _window_counts(self, x_shape, pool, stride, pads, xp, dtype):
        """(1, OH, OW, 1): how many real (unpadded) pixels each window covers."""
        _, h, w, _ = x_shape
        ones = xp.ones((1, h, w, 1), dtype=dtype)
        return self._windows(ones, pool, stride, pads, 0.0).sum(axis=3)

    def avgpool_forward(self, x, pool, stride, pads):
        """Average pooling over the real pixels of each window (padding is not counted, as in Keras)."""
        xp = get_array_module(x)
        win = self._windows(x, pool, stride, pads, 0.0)
        return win.sum(axis=3) / self._window_counts(x.shape, pool, stride, pads, xp, x.dtype)

    def avgpool_backward(self, dy, x_shape, pool, stride, pads):
        """Every entry of a window gets an equal share of its gradient (padding counts for none)."""
        xp = get_array_module(dy)
        share = dy / self._window_counts(x_shape, pool, stride, pads, xp, dy.dtype)
        return self._scatter_windows(lambda k: share, x_shape, pool, stride, pads, xp, dy.dtype)

    def global_avgpool_forward(self, x):
        """Mean over height and width: (N, H, W, C) -> (N, C)."""
        return x.mean(axis=(1, 2))

    def global_avgpool_backward(self, dy, x_shape):
        """Each of an image's H*W pixels gets dy / (H*W)."""
        n, h, w, c = x_shape
        dx = get_array_module(dy).empty(x_shape, dtype=dy.dtype)
        dx[...] = (dy / (h * w))[:, None, None, :]
        return dx

    # -- activations --------------------------------------------------------------------------
    def relu_forward(self, x):
        return get_array_module(x).maximum(x, 0)

    def relu_backward(self, dy, y):
        """Gradient of ReLU given its output y (y > 0 exactly where the input was > 0)."""
        return dy * (y > 0)

    # -- batch normalization ------------------------------------------------------------------
    def batchnorm_forward_train(self, x2d, gamma, beta, eps, reduce=None, moving=None):
        """Batch statistics over rows of (M, C). Returns y, saved, mean, biased var, 1/sqrt(var+eps),
        where `saved` is what batchnorm_backward_train of the same set needs (here: xhat).
        `moving`: (moving_mean, moving_var, momentum), updated in place with the batch's statistics
        as batchnorm_moving_update does (a set may fold that into its own passes), or None.

        `reduce` (data parallelism): an in-place sum over the ranks, each holding some of the
        batch's rows; the statistics are then the whole batch's, from the float64 sums of x and
        x^2 and the row count (one reduce)."""
        xp = get_array_module(x2d)
        if reduce is None:
            mean = x2d.mean(axis=0)
            centered = x2d - mean
            var = (centered * centered).mean(axis=0)
        else:
            mean, var = global_moments(x2d, reduce)
            centered = x2d - mean
        inv_std = 1.0 / xp.sqrt(var + eps)
        xhat = centered * inv_std
        if moving is not None:
            self.batchnorm_moving_update(moving[0], moving[1], mean, var, moving[2])
        return xhat * gamma + beta, xhat, mean, var, inv_std

    def batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        """The full batch-statistics gradient (mean and variance depend on every row).
        Returns dx, dgamma, dbeta. With `reduce` (see forward), dx uses the sums over the whole
        batch, while dgamma and dbeta stay this rank's (the gradient sum over the ranks adds them).
        `out`: (dgamma, dbeta) arrays to write them into, each or both None (new arrays)."""
        xhat = saved
        m = dy2d.shape[0]
        dbeta = dy2d.sum(axis=0)
        dgamma = (dy2d * xhat).sum(axis=0)
        if reduce is None:
            dx = (gamma * inv_std / m) * (m * dy2d - dbeta - xhat * dgamma)
        else:
            sums = global_gradient_sums(dbeta, dgamma, m, reduce)
            total_beta, total_gamma, count = (total.astype(dy2d.dtype) for total in sums)
            dx = (gamma * inv_std / count) * (count * dy2d - total_beta - xhat * total_gamma)
        return (dx, *written_into(out, dgamma, dbeta))

    def batchnorm_moving_update(self, moving_mean, moving_var, mean, var, momentum):
        """In place: moving = moving * momentum + batch * (1 - momentum), mean and variance alike
        (Keras 3; `momentum` a float, the complement taken in float64 as Python does)."""
        moving_mean *= momentum
        moving_mean += (1.0 - momentum) * mean
        moving_var *= momentum
        moving_var += (1.0 - momentum) * var

    def batchnorm_forward_infer(self, x2d, gamma, beta, moving_mean, moving_var, eps):
        """Inference: an affine map per channel. Returns y and the per-channel scale."""
        scale = gamma / get_array_module(x2d).sqrt(moving_var + eps)
        return x2d * scale + (beta - moving_mean * scale), scale

    def batchnorm_dropout_forward_train(self, x2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        """BatchNormalization then Dropout(rate) with the mask of dropout_forward(., rate, seed, offset):
        one kernel where a set can fuse them. Returns y, saved, mean, var, inv_std."""
        y, saved, mean, var, inv_std = self.batchnorm_forward_train(x2d, gamma, beta, eps, reduce, moving)
        y, mask = self.dropout_forward(y, rate, seed, offset)
        return y, (saved, mask), mean, var, inv_std

    def batchnorm_dropout_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        bn_saved, mask = saved
        return self.batchnorm_backward_train(self.dropout_backward(dy2d, mask), bn_saved, gamma, inv_std, reduce, out)

    def relu_batchnorm_forward_train(self, z2d, gamma, beta, eps, rate, seed, offset=0, reduce=None, moving=None):
        """ReLU, then BatchNormalization, then (rate > 0) Dropout: batchnorm_dropout_forward_train
        (batchnorm_forward_train at rate 0) of max(z, 0). Returns y, saved, mean, var, inv_std."""
        x2d = get_array_module(z2d).maximum(z2d, 0)
        if rate > 0.0:
            y, saved, mean, var, inv_std = self.batchnorm_dropout_forward_train(x2d, gamma, beta, eps, rate, seed,
                                                                                offset, reduce, moving)
        else:
            y, saved, mean, var, inv_std = self.batchnorm_forward_train(x2d, gamma, beta, eps, reduce, moving)
        return y, (saved, rate > 0.0, x2d), mean, var, inv_std

    def relu_batchnorm_backward_train(self, dy2d, saved, gamma, inv_std, reduce=None, out=(None, None)):
        """The gradient of relu_batchnorm_forward_train: dz, dgamma, dbeta (`out` as batchnorm_backward_train's)."""
        inner, dropped, x2d = saved
        backward = self.batchnorm_dropout_backward_train if dropped else self.batchnorm_backward_train
        dx, dgamma, dbeta = backward(dy2d, inner, gamma, inv_std, reduce, out)
        return self.relu_backward(dx, x2d), dgamma, dbeta

    # -- dropout --------------------------------------------------------------------------------
    def dropout_forward(self, x, rate, seed, offset=0):
        """Inverted dropout with a counter-based mask: element i is kept when
        hash(i ^ key(seed)) >> 8 >= threshold. The mask depends only on (seed, i), so every
        implementation (NumPy, numba, CuPy) draws the same mask for the same seed, in parallel.
        `offset`: the index of x's first element (a share of a larger batch draws that batch's mask).
        Returns y and what backward needs (here the scaled mask)."""
        bits = index_hashes(get_array_module(x), x.size, seed, offset) >> 8
        keep = (bits >= dropout_keep_threshold(rate)).reshape(x.shape)
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - rate))
        return x * mask, mask

    def dropout_backward(self, dy, saved):
        return dy * saved

    def dropout_keys(self, bases, offsets, calls, step, out):
        """The mask keys of a static step, on the device: out[k] (uint32) = dropout_key(call_seed(
        bases[k], offsets[k] + step * calls[k])) for uint64 arrays bases, offsets, calls and the
        1-element uint64 step counter `step` (tinycnn.randomness; uint64 arithmetic wraps)."""
        xp = get_array_module(bases)
        u = xp.uint64
        z = bases + (offsets + step * calls + u(1)) * u(GOLDEN_GAMMA)
        z = (z ^ (z >> u(30))) * u(MIX_1)
        z = (z ^ (z >> u(27))) * u(MIX_2)
        seed = (z ^ (z >> u(31))) >> u(1)
        out[...] = (lowbias32(seed & u(HASH_MASK)) ^ (seed >> u(32))).astype(xp.uint32)

    # -- loss and optimizer ----------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, targets, eps=None, scale=None, loss_sum=None):
        """Softmax and categorical cross-entropy from logits, numerically stable.

        Returns (probs, per-sample loss, gradient of the per-sample loss w.r.t. the logits).
        With `eps` the loss clips probabilities to [eps, 1 - eps] as Keras does on a softmax
        output, so the printed loss matches; the gradient is the exact softmax-CE gradient p - t
        either way (it differs from Keras's clipped gradient only where a target class has p < eps).
        `scale`: the gradient times it (a training step's 1 / batch); `loss_sum`: a 0-d array that
        receives the per-sample losses' sum (a set may compute both in its own pass)."""
        xp = get_array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = xp.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        probs = exp / total
        log_probs = shifted - xp.log(total)
        if eps is not None:
            # the bounds computed on the host, in logits' dtype: scalars for the device (no transfer)
            t = logits.dtype.type
            log_probs = xp.clip(log_probs, np.log(t(eps)), np.log1p(t(-eps)))
        loss = -(targets * log_probs).sum(axis=1)
        grad = probs - targets
        if scale is not None:
            grad *= grad.dtype.type(scale)
        if loss_sum is not None:
            loss_sum[...] = loss.sum()
        return probs, loss, grad

    def categorical_matches(self, predictions, targets, into=None):
        """How many rows' largest prediction is their target's largest entry (first maxima, NaN
        counting as largest, as argmax has it): the categorical accuracy's sum, a 0-d int64, or
        added into `into` (a 0-d int64 array: an epoch's running count), which is returned."""
        xp = get_array_module(predictions)
        count = (xp.argmax(predictions, axis=-1) == xp.argmax(targets, axis=-1)).sum()
        if into is None:
            return count
        into += count
        return into

    def adam_update(self, param, grad, m, v, lr_t, beta_1, beta_2, epsilon):
        """In-place Keras Adam step with the bias correction folded into lr_t (epsilon-hat form):
        m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); p -= lr_t * m / (sqrt(v) + eps). `lr_t`: a float,
        or a 1-element float64 device array (a static step computes it on the device)."""
        xp = get_array_module(param)
        if hasattr(lr_t, "dtype"):  # a static step's (1,) float64 device buffer: rounded as a float would be
            lr_t = lr_t.astype(param.dtype)
        m += (grad - m) * (1 - beta_1)
        v += (grad * grad - v) * (1 - beta_2)
        param -= lr_t * m / (xp.sqrt(v) + epsilon)


def kernel_names():
    """Every kernel of the reference set: its public methods, in definition order."""
    return tuple(name for name, value in vars(ReferenceKernels).items()
                 if callable(value) and not name.startswith("_") and name != "describe")
