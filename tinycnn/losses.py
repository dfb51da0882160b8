"""Losses, as Keras 3 defines them: categorical and sparse categorical cross-entropy, binary
cross-entropy and mean squared error, each with `from_logits` where it applies.

A loss turns the model's output and the targets into a per-sample loss and its gradient. It
also checks and prepares the targets (`prepare_targets`): a clear error for the wrong shape or
values, and integer labels turned into one-hot rows for the sparse loss.

When a model ends in the activation a loss can apply itself (softmax for cross-entropy, sigmoid
for binary cross-entropy) and the loss is not told `from_logits=True`, the model's execution plan
leaves that activation out in training and evaluation and hands the loss the logits: the fused
kernel is numerically stable and its gradient is p - t, with no division by a probability that
may underflow. `predict` still returns probabilities. With `from_logits=True` the model's output
is taken to be logits, as in Keras.
"""
import numpy as np

from .arrays import get_array_module, to_numpy
from .errors import ShapeError
from .kernels.reference import ReferenceKernels

__all__ = ["Loss", "CategoricalCrossentropy", "SparseCategoricalCrossentropy", "BinaryCrossentropy",
           "MeanSquaredError", "categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy",
           "mean_squared_error", "mse", "get"]

EPSILON = 1e-7  # Keras's clipping of probabilities in cross-entropies
_REFERENCE = ReferenceKernels()


def _sigmoid(x):
    return 0.5 * (get_array_module(x).tanh(0.5 * x) + 1)


class Loss:
    """Base class. `compute(output, targets, logits, kernels)` returns (predictions, per-sample loss,
    d(per-sample loss)/d(output)); `logits` says whether `output` holds logits."""

    name = "loss"
    sparse = False  # targets are class indices
    fuses_activation = None  # "softmax" or "sigmoid": the activation this loss can apply to logits itself

    def __init__(self, from_logits=False, name=None):
        self.from_logits = bool(from_logits)
        if name is not None:
            self.name = name

    def prepare_targets(self, y, output_shape, backend, dtype, what="y"):
        """`y` checked against the model's per-sample output shape, on the device in `dtype`."""
        y = y if hasattr(y, "shape") else np.asarray(y)
        expected = tuple(output_shape)
        if tuple(y.shape[1:]) != expected:
            if expected == (1,) and y.ndim == 1:
                y = y.reshape(-1, 1)
            else:
                raise ShapeError(f"{what} must have shape (batch, {', '.join(map(str, expected))}) for {self.name}, "
                                 f"got {tuple(y.shape)}")
        if np.dtype(y.dtype).kind not in "biuf":
            raise TypeError(f"{what} must hold numbers for {self.name}, got dtype {y.dtype}")
        y = backend.asarray(y, dtype=dtype)
        if not bool(backend.xp.isfinite(y).all()):
            raise ValueError(f"{what} contains NaN or infinite values")
        return y

    def compute(self, output, targets, logits, kernels=None):
        raise NotImplementedError

    def compute_scaled(self, output, targets, logits, kernels, scale):
        """What an unweighted training step needs: (predictions, the per-sample losses' sum, the
        gradient times `scale`). From compute(); a loss whose kernel does the scaling and the sum in
        its own pass overrides this (on the GPU: two launches fewer per step)."""
        predictions, per_sample, grad = self.compute(output, targets, logits, kernels)
        grad *= grad.dtype.type(scale)
        return predictions, per_sample.sum(), grad

    def __call__(self, y_true, y_pred, sample_weight=None):
        """The batch loss as Keras computes it (sum of weighted per-sample losses over the batch size),
        as a Python float. For users; training uses `compute`."""
        y_pred = np.asarray(to_numpy(y_pred), dtype=np.float64)
        xp = get_array_module(y_pred)
        targets = self.dense_targets(np.asarray(to_numpy(y_true)), y_pred)
        _, per_sample, _ = self.compute(y_pred, targets, self.from_logits)
        if sample_weight is not None:
            per_sample = per_sample * xp.asarray(sample_weight, dtype=per_sample.dtype).reshape(-1)
        return float(per_sample.sum() / per_sample.shape[0])

    def dense_targets(self, y_true, y_pred):
        """Targets in the layout `compute` takes (one-hot rows for the sparse loss)."""
        return np.asarray(y_true, dtype=y_pred.dtype).reshape(y_pred.shape)

    def get_config(self):
        return {"name": self.name, "from_logits": self.from_logits}

    def __repr__(self):
        return f"{type(self).__name__}(from_logits={self.from_logits})"


class CategoricalCrossentropy(Loss):
    """-sum(t * log p) per sample, on one-hot (or soft) targets."""

    name = "categorical_crossentropy"
    fuses_activation = "softmax"

    def prepare_targets(self, y, output_shape, backend, dtype, what="y"):
        if len(output_shape) != 1:
            raise ShapeError(f"{self.name} needs a model output of shape (batch, classes); this model's is "
                             f"(None, {', '.join(map(str, output_shape))}): add Flatten() or "
                             "GlobalAveragePooling2D() before the last layer")
        classes = output_shape[0]
        y = y if hasattr(y, "shape") else np.asarray(y)
        if y.ndim != 2 or y.shape[1] != classes:
            hint = (" (integer labels? one-hot encode them with tinycnn.utils.to_categorical, or use "
                    "loss='sparse_categorical_crossentropy')") if y.ndim == 1 else ""
            raise ShapeError(f"{what} must have shape (n, {classes}) for {self.name}, got {tuple(y.shape)}{hint}")
        y = super().prepare_targets(y, output_shape, backend, dtype, what)
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise ValueError(f"{what} must hold probabilities in [0, 1] (one-hot rows); found values outside")
        return y

    def compute_scaled(self, output, targets, logits, kernels, scale):
        if not logits:
            return super().compute_scaled(output, targets, logits, kernels, scale)
        total = get_array_module(output).empty((), dtype=output.dtype)
        probs, _, grad = (kernels or _REFERENCE).softmax_cross_entropy(output, targets, self._clip(), scale, total)
        return probs, total, grad

    def _clip(self):
        # Logits the model's softmax was stripped from (from_logits=False) get Keras's clip of the
        # probabilities in the loss; logits the user declared get none, as in Keras.
        return None if self.from_logits else EPSILON

    def compute(self, output, targets, logits, kernels=None):
        if logits:
            return (kernels or _REFERENCE).softmax_cross_entropy(output, targets, self._clip())
        xp = get_array_module(output)
        eps = output.dtype.type(EPSILON)
        total = output.sum(axis=1, keepdims=True)
        probs = output / total  # Keras normalizes rows that do not sum to 1
        clipped = xp.clip(probs, eps, 1 - eps)
        per_sample = -(targets * xp.log(clipped)).sum(axis=1)
        inside = (probs >= eps) & (probs <= 1 - eps)  # the clip passes no gradient outside
        g = -targets / clipped * inside  # d/d(probs); then through the normalization
        grad = (g - (g * probs).sum(axis=1, keepdims=True)) / total
        return probs, per_sample, grad


class SparseCategoricalCrossentropy(CategoricalCrossentropy):
    """The same loss on integer class labels (shape (n,) or (n, 1))."""

    name = "sparse_categorical_crossentropy"
    sparse = True

    def prepare_targets(self, y, output_shape, backend, dtype, what="y"):
        if len(output_shape) != 1:
            return super().prepare_targets(y, output_shape, backend, dtype, what)  # names the output problem
        classes = output_shape[0]
        y = y if hasattr(y, "shape") else np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.ndim != 1 or np.dtype(y.dtype).kind not in "iuf":
            raise ShapeError(f"{what} must be integer class labels of shape (n,) for {self.name}, got shape "
                             f"{tuple(y.shape)} and dtype {y.dtype}")
        labels = backend.asarray(y)
        if labels.size and not bool(backend.xp.isfinite(labels.astype(np.float64)).all()):
            raise ValueError(f"{what} contains NaN or infinite values")
        lo, hi = float(labels.min()), float(labels.max())
        if lo < 0 or hi >= classes or bool((labels != backend.xp.floor(labels)).any()):
            raise ValueError(f"{what} has labels outside 0..{classes - 1} (found min {lo:g}, max {hi:g})")
        return one_hot(labels, classes, backend.xp).astype(dtype)

    def dense_targets(self, y_true, y_pred):
        return one_hot(np.asarray(y_true).reshape(-1), y_pred.shape[-1], np).astype(y_pred.dtype)


def one_hot(labels, classes, xp):
    labels = labels.reshape(-1).astype(xp.int64)
    dense = xp.zeros((labels.shape[0], classes), dtype=xp.float32)
    dense[xp.arange(labels.shape[0]), labels] = 1.0
    return dense


class BinaryCrossentropy(Loss):
    """-(t log p + (1 - t) log(1 - p)), averaged over each sample's outputs; targets in [0, 1]."""

    name = "binary_crossentropy"
    fuses_activation = "sigmoid"

    def prepare_targets(self, y, output_shape, backend, dtype, what="y"):
        y = super().prepare_targets(y, output_shape, backend, dtype, what)
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise ValueError(f"{what} must hold values in [0, 1] for {self.name}; found values outside")
        return y

    def compute(self, output, targets, logits, kernels=None):
        xp = get_array_module(output)
        n = output.shape[0]
        per_element = output[0].size
        if logits:  # the stable form: max(z, 0) - z t + log(1 + exp(-|z|)); gradient sigmoid(z) - t
            probs = _sigmoid(output)
            elementwise = xp.maximum(output, 0) - output * targets + xp.log1p(xp.exp(-xp.abs(output)))
            grad = (probs - targets) / per_element
        else:
            probs = output
            # Keras 3 on probabilities (every backend): p clipped to [eps, 1 - eps], then the logs.
            # (Keras 2 added eps inside the logs; Keras 3 does not.)
            eps = output.dtype.type(EPSILON)
            clipped = xp.clip(output, eps, 1 - eps)
            elementwise = -(targets * xp.log(clipped) + (1 - targets) * xp.log1p(-clipped))
            inside = (output >= eps) & (output <= 1 - eps)  # the clip passes no gradient outside
            grad = (clipped - targets) / (clipped * (1 - clipped)) * inside / per_element
        return probs, elementwise.reshape(n, -1).mean(axis=1), grad


class MeanSquaredError(Loss):
    """mean((p - t)^2) over each sample's outputs."""

    name = "mean_squared_error"

    def __init__(self, name=None):
        super().__init__(False, name)

    def compute(self, output, targets, logits, kernels=None):
        n = output.shape[0]
        diff = output - targets
        return output, (diff * diff).reshape(n, -1).mean(axis=1), diff * diff.dtype.type(2.0 / output[0].size)

    def get_config(self):
        return {"name": self.name}


def _function(cls, doc):
    def loss(y_true, y_pred, from_logits=False):
        instance = cls(from_logits) if cls is not MeanSquaredError else cls()
        y_pred = np.asarray(to_numpy(y_pred), dtype=np.float64)
        _, per_sample, _ = instance.compute(y_pred, instance.dense_targets(np.asarray(to_numpy(y_true)), y_pred),
                                            instance.from_logits)
        return per_sample

    loss.__name__ = cls.name
    loss.__doc__ = doc
    loss.loss_class = cls
    return loss


categorical_crossentropy = _function(CategoricalCrossentropy, "Per-sample categorical cross-entropy (NumPy).")
sparse_categorical_crossentropy = _function(SparseCategoricalCrossentropy,
                                            "Per-sample sparse categorical cross-entropy (NumPy).")
binary_crossentropy = _function(BinaryCrossentropy, "Per-sample binary cross-entropy (NumPy).")
mean_squared_error = _function(MeanSquaredError, "Per-sample mean squared error (NumPy).")
mse = mean_squared_error

_LOSSES = {
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "binary_crossentropy": BinaryCrossentropy,
    "mean_squared_error": MeanSquaredError,
    "mse": MeanSquaredError,
    "MSE": MeanSquaredError,
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in set(_LOSSES.values())}  # how Keras files name them
_LOSSES.update(_BY_CLASS_NAME)


def class_named(name):
    """The loss class called `name` ("MeanSquaredError", as a Keras file names it), or None."""
    return _BY_CLASS_NAME.get(name)


def get(loss):
    """A Loss from a name, a Loss (class or instance), or one of this module's loss functions."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type) and issubclass(loss, Loss):
        return loss()
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]()
    if callable(loss) and hasattr(loss, "loss_class"):
        return loss.loss_class()
    if callable(loss):
        raise ValueError(f"tinycnn cannot train with the custom loss function {getattr(loss, '__name__', loss)!r}: "
                         "it has no backward pass. Subclass tinycnn.losses.Loss and implement compute() "
                         "(the per-sample loss and its gradient)")
    raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(sorted(k for k in _LOSSES if k.islower()))} "
                     "or pass a tinycnn.losses.Loss")
