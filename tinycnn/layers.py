"""Layers with Keras names, defaults and NHWC layout, each with its own backward pass.

A layer is built for one input shape on one backend. Its weights live in `self.weights`
(name -> device array, in Keras order) and the gradients of its trainable weights in
`self.grads`; `backward` writes those gradients in place, so a model can make both views
of one flat buffer and update every parameter with one fused optimizer kernel.

Layer math is written once against `self.xp` (NumPy or CuPy); the hot loops go through
`self.kernels`, the backend's kernel table.
"""
import collections
import inspect
import math

import numpy as np

from . import activations
from .backend import get_backend, to_numpy
from .kernels_reference import output_hw


class ShapeError(ValueError):
    """An array's shape does not fit the layer or model it is given to."""


_name_counts = collections.Counter()


def _auto_name(base):
    """Keras 2 names: per-process counters per layer kind, counted from 1."""
    _name_counts[base] += 1
    return f"{base}_{_name_counts[base]}"


def _pair(value, what):
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return value


def _glorot_uniform(rng, shape, fan_in, fan_out, dtype):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Layer:
    """Base class: naming, building, weights, input checks."""

    base_name = "layer"

    def __init__(self, name=None, input_shape=None, **unknown):
        if unknown:
            accepted = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")]
            accepted += ["name", "input_shape"]
            raise TypeError(
                f"{type(self).__name__} got unknown argument(s) {', '.join(map(repr, sorted(unknown)))}; "
                f"it accepts: {', '.join(dict.fromkeys(accepted))}"
            )
        self.name = name or _auto_name(self.base_name)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.output_shape = None
        self.built = False
        self.weights = {}  # name -> device array, Keras order
        self.trainable_names = []
        self.grads = {}  # trainable name -> device array, written in place by backward
        self.needs_input_grad = True  # the model clears it on its first layer
        self.output_logits = False  # set by a model that fuses this layer's softmax into its loss

    # -- building -------------------------------------------------------------------------
    def build(self, input_shape, backend=None, dtype="float32", seed=None):
        """Create the weights for inputs of shape `input_shape` (without the batch axis)."""
        input_shape = tuple(int(d) for d in input_shape)
        if self.input_shape is not None and self.input_shape != input_shape:
            raise ShapeError(f"layer {self.name} was declared with input_shape {self.input_shape}, got {input_shape}")
        self.input_shape = input_shape
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.kernels = self.backend.kernels
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"layers compute in float32 or float64, not {self.dtype}")
        self.output_shape = self.compute_output_shape(input_shape)
        self.weights, self.trainable_names, self.grads = {}, [], {}
        self._create_weights(input_shape, np.random.default_rng(seed))
        self.built = True
        return self.output_shape

    def _create_weights(self, input_shape, rng):
        """Subclasses with weights call `_add_weight` here (host-side init, so CPU and GPU agree)."""

    def _add_weight(self, name, value, trainable):
        self.weights[name] = self.backend.asarray(np.asarray(value, dtype=self.dtype))
        if trainable:
            self.trainable_names.append(name)
            self.grads[name] = self.xp.zeros_like(self.weights[name])

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- weights ----------------------------------------------------------------------------
    def count_params(self):
        return int(sum(w.size for w in self.weights.values()))

    def count_trainable_params(self):
        return int(sum(self.weights[n].size for n in self.trainable_names))

    def get_weights(self):
        """NumPy copies in Keras order (kernel, bias; gamma, beta, moving_mean, moving_variance)."""
        return [np.array(to_numpy(w), copy=True) for w in self.weights.values()]

    def set_weights(self, values):
        """Assign in place (views into a model's flat buffers stay valid); shapes must match."""
        values = list(values)
        if len(values) != len(self.weights):
            raise ValueError(f"layer {self.name} has {len(self.weights)} weights, got {len(values)}")
        for (name, current), value in zip(self.weights.items(), values):
            value = np.asarray(to_numpy(value))
            if value.shape != current.shape:
                raise ShapeError(f"layer {self.name} weight {name!r}: expected shape {current.shape}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"layer {self.name} weight {name!r} contains NaN or inf")
            current[...] = self.xp.asarray(value, dtype=self.dtype)

    # -- computing --------------------------------------------------------------------------
    def forward(self, x, training=False):
        if not self.built:
            raise RuntimeError(f"layer {self.name} is not built; call build(input_shape) or put it in a model")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"layer {self.name} expects inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return self.call(x, training)

    def call(self, x, training):
        raise NotImplementedError

    def backward(self, dy):
        """Gradient w.r.t. the input of the last forward (None when not needed); fills self.grads."""
        raise NotImplementedError

    def reseed(self, seed):
        """Layers that draw random numbers during training restart their stream from `seed`."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class _ActivationMixin:
    """The activation at the end of Conv2D and Dense (and the Activation layer itself)."""

    def _init_activation(self, activation):
        activations.get(activation)  # validates the name now, not at build time
        self.activation = activation or "linear"

    def _bind_activation(self):
        self._act_forward, self._act_backward = activations.get(self.activation, self.kernels)

    # Conv2D and Dense activate a product they just computed, so ReLU may overwrite it;
    # the Activation layer's input belongs to the layer before and must not change.
    _owns_input = True

    def _activate(self, z):
        if self.activation == "softmax" and self.output_logits:
            return z  # the model's loss applies the softmax, fused with cross-entropy
        if self.activation == "relu" and self._owns_input:
            return self.xp.maximum(z, 0, out=z)
        return self._act_forward(z)

    def _activation_grad(self, dy, y):
        if self.activation == "softmax" and self.output_logits:
            return dy
        return self._act_backward(dy, y)


class Conv2D(_ActivationMixin, Layer):
    """2-D convolution as im2col + one GEMM. Kernel (kh, kw, c_in, c_out) as in Keras."""

    base_name = "conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1:
            raise ValueError(f"Conv2D filters must be positive, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "Conv2D kernel_size")
        self.strides = _pair(strides, "Conv2D strides")
        self.padding = str(padding).lower()
        if self.padding not in ("valid", "same"):
            raise ValueError(f"Conv2D padding must be 'valid' or 'same', got {padding!r}")
        self.use_bias = bool(use_bias)
        self._init_activation(activation)

    def _pads(self, h, w):
        """(top, bottom, left, right); 'same' puts the odd pixel at the bottom/right as Keras does."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for size, k, s in zip((h, w), self.kernel_size, self.strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"Conv2D {self.name} needs (height, width, channels) inputs, got shape {input_shape}")
        h, w, _ = input_shape
        oh, ow = output_hw(h, w, *self.kernel_size, self.strides, self._pads(h, w))
        if oh < 1 or ow < 1:
            raise ShapeError(f"Conv2D {self.name}: kernel {self.kernel_size} does not fit input {input_shape}")
        return (oh, ow, self.filters)

    def _create_weights(self, input_shape, rng):
        kh, kw = self.kernel_size
        c_in = input_shape[2]
        shape = (kh, kw, c_in, self.filters)
        self._add_weight("kernel", _glorot_uniform(rng, shape, kh * kw * c_in, kh * kw * self.filters, self.dtype), True)
        if self.use_bias:
            self._add_weight("bias", np.zeros(self.filters), True)
        self._bind_activation()
        h, w, _ = input_shape
        self._pad_tuple = self._pads(h, w)

    def call(self, x, training):
        kh, kw = self.kernel_size
        n = x.shape[0]
        kernel2d = self.weights["kernel"].reshape(-1, self.filters)
        z, saved = self.kernels.conv2d_forward(x, kernel2d, kh, kw, self.strides, self._pad_tuple)
        if self.use_bias:
            z += self.weights["bias"]
        y = self._activate(z.reshape((n,) + self.output_shape))
        self._cache = (saved, y, x.shape)
        return y

    def backward(self, dy):
        saved, y, x_shape = self._cache
        dz = self._activation_grad(dy, y).reshape(-1, self.filters)
        kernel2d = self.weights["kernel"].reshape(-1, self.filters)
        dkernel2d = self.grads["kernel"].reshape(kernel2d.shape)
        if self.use_bias:
            dz.sum(axis=0, out=self.grads["bias"])
        kh, kw = self.kernel_size
        return self.kernels.conv2d_backward(dz, saved, x_shape, kernel2d, kh, kw, self.strides, self._pad_tuple,
                                            dkernel2d, self.needs_input_grad)


class Dense(_ActivationMixin, Layer):
    """Fully connected layer on (batch, features) inputs; kernel (in, units) as in Keras."""

    base_name = "dense"

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"Dense units must be positive, got {units!r}")
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self._init_activation(activation)

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ShapeError(f"Dense {self.name} needs flat (features,) inputs, got shape {input_shape}; add Flatten()")
        return (self.units,)

    def _create_weights(self, input_shape, rng):
        fan_in = input_shape[0]
        self._add_weight("kernel", _glorot_uniform(rng, (fan_in, self.units), fan_in, self.units, self.dtype), True)
        if self.use_bias:
            self._add_weight("bias", np.zeros(self.units), True)
        self._bind_activation()

    def call(self, x, training):
        z = x @ self.weights["kernel"]
        if self.use_bias:
            z += self.weights["bias"]
        y = self._activate(z)
        self._cache = (x, y)
        return y

    def backward(self, dy):
        x, y = self._cache
        dz = self._activation_grad(dy, y)
        self.xp.matmul(x.T, dz, out=self.grads["kernel"])
        if self.use_bias:
            dz.sum(axis=0, out=self.grads["bias"])
        return dz @ self.weights["kernel"].T if self.needs_input_grad else None


class BatchNormalization(Layer):
    """Normalizes the last axis: batch statistics in training, moving ones in inference."""

    base_name = "batch_normalization"

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNormalization momentum must be in [0, 1], got {momentum!r}")
        if float(epsilon) <= 0:
            raise ValueError(f"BatchNormalization epsilon must be positive, got {epsilon!r}")
        if not (center and scale):
            raise ValueError("BatchNormalization supports center=True and scale=True only")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self._fused_dropout = None

    def _create_weights(self, input_shape, rng):
        c = input_shape[-1]
        self._add_weight("gamma", np.ones(c), True)
        self._add_weight("beta", np.zeros(c), True)
        self._add_weight("moving_mean", np.zeros(c), False)
        self._add_weight("moving_variance", np.ones(c), False)

    def call(self, x, training):
        w = self.weights
        c = x.shape[-1]
        x2d = x.reshape(-1, c)
        if training:
            drop = self._fused_dropout
            if drop is not None and drop.rate > 0.0:
                y2d, saved, mean, var, inv_std = self.kernels.batchnorm_dropout_forward_train(
                    x2d, w["gamma"], w["beta"], self.epsilon, drop.rate, drop.next_seed())
                mode = "train+dropout"
            else:
                y2d, saved, mean, var, inv_std = self.kernels.batchnorm_forward_train(
                    x2d, w["gamma"], w["beta"], self.epsilon)
                mode = "train"
            # Keras 3 update (moving = moving * momentum + batch * (1 - momentum)), biased variance.
            w["moving_mean"] *= self.momentum
            w["moving_mean"] += (1.0 - self.momentum) * mean
            w["moving_variance"] *= self.momentum
            w["moving_variance"] += (1.0 - self.momentum) * var
            self._cache = (mode, saved, inv_std)
        else:
            y2d, scale = self.kernels.batchnorm_forward_infer(
                x2d, w["gamma"], w["beta"], w["moving_mean"], w["moving_variance"], self.epsilon
            )
            self._cache = ("infer", x2d, scale)
        return y2d.reshape(x.shape)

    def backward(self, dy):
        mode, a, b = self._cache
        c = dy.shape[-1]
        dy2d = dy.reshape(-1, c)
        if mode == "train":
            dx, dgamma, dbeta = self.kernels.batchnorm_backward_train(dy2d, a, self.weights["gamma"], b)
        elif mode == "train+dropout":
            dx, dgamma, dbeta = self.kernels.batchnorm_dropout_backward_train(dy2d, a, self.weights["gamma"], b)
        else:
            # Inference mode is an affine map with constant statistics.
            x2d, scale = a, b
            w = self.weights
            xhat = (x2d - w["moving_mean"]) / self.xp.sqrt(w["moving_variance"] + self.epsilon)
            dgamma, dbeta = (dy2d * xhat).sum(axis=0), dy2d.sum(axis=0)
            dx = dy2d * scale
        self.grads["gamma"][...] = dgamma
        self.grads["beta"][...] = dbeta
        return dx.reshape(dy.shape) if self.needs_input_grad else None

    def fuse_dropout(self, dropout):
        """Apply `dropout`'s training-mode mask inside this layer's kernel (one pass over the
        activations instead of two, forward and backward); the Dropout layer then passes through."""
        self._fused_dropout = dropout
        dropout._absorbed = True


class Dropout(Layer):
    """Inverted dropout in training, the identity in inference."""

    base_name = "dropout"

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self._absorbed = False  # True when the BatchNormalization before it applies its mask

    def _create_weights(self, input_shape, rng):
        self.reseed(self.seed if self.seed is not None else int(rng.integers(2**31)))

    def reseed(self, seed):
        # Host-side: each training call draws one 63-bit seed from here; the mask itself is a
        # counter-based hash of (seed, element index), computed on the device in parallel.
        self._seeds = np.random.default_rng(int(seed))

    def next_seed(self):
        return int(self._seeds.integers(2**63))

    def call(self, x, training):
        if not training or self.rate == 0.0 or self._absorbed:
            self._cache = None
            return x
        y, self._cache = self.kernels.dropout_forward(x, self.rate, self.next_seed())
        return y

    def backward(self, dy):
        if self._cache is None:
            return dy
        return self.kernels.dropout_backward(dy, self._cache)


class MaxPooling2D(Layer):
    """Max pooling with 'valid' padding; the argmax is kept for an exact backward."""

    base_name = "max_pooling2d"

    def __init__(self, pool_size=2, strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "MaxPooling2D pool_size")
        self.strides = self.pool_size if strides is None else _pair(strides, "MaxPooling2D strides")
        if str(padding).lower() != "valid":
            raise ValueError(f"MaxPooling2D supports padding='valid' only, got {padding!r}")
        self.padding = "valid"

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"MaxPooling2D {self.name} needs (height, width, channels) inputs, got {input_shape}")
        h, w, c = input_shape
        ph, pw = self.pool_size
        if h < ph or w < pw:
            raise ShapeError(f"MaxPooling2D {self.name}: pool {self.pool_size} is larger than input {input_shape}")
        return output_hw(h, w, ph, pw, self.strides) + (c,)

    def call(self, x, training):
        y, argmax = self.kernels.maxpool_forward(x, self.pool_size, self.strides)
        self._cache = (argmax, x.shape)
        return y

    def backward(self, dy):
        argmax, x_shape = self._cache
        return self.kernels.maxpool_backward(dy, argmax, x_shape, self.pool_size, self.strides)


class GlobalAveragePooling2D(Layer):
    """Mean over height and width: (N, H, W, C) -> (N, C)."""

    base_name = "global_average_pooling2d"

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"GlobalAveragePooling2D {self.name} needs (h, w, c) inputs, got {input_shape}")
        return (input_shape[2],)

    def call(self, x, training):
        self._hw = x.shape[1:3]
        return x.mean(axis=(1, 2))

    def backward(self, dy):
        h, w = self._hw
        dx = self.xp.empty((dy.shape[0], h, w, dy.shape[1]), dtype=dy.dtype)
        dx[...] = (dy / (h * w))[:, None, None, :]
        return dx


class Flatten(Layer):
    base_name = "flatten"

    def compute_output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def call(self, x, training):
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape((dy.shape[0],) + self.input_shape)


class Activation(_ActivationMixin, Layer):
    """An elementwise (or softmax over the last axis) activation by name."""

    base_name = "activation"
    _owns_input = False

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self._init_activation(activation)

    def _create_weights(self, input_shape, rng):
        self._bind_activation()

    def call(self, x, training):
        y = self._activate(x)
        self._y = y
        return y

    def backward(self, dy):
        return self._activation_grad(dy, self._y)


class ReLU(Activation):
    base_name = "re_lu"

    def __init__(self, **kwargs):
        super().__init__("relu", **kwargs)


class Softmax(Activation):
    base_name = "softmax"

    def __init__(self, **kwargs):
        super().__init__("softmax", **kwargs)
