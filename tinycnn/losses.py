"""Cross-entropy losses and the accuracy metric.

When a model ends in a softmax and its loss `fuses_softmax`, the model's execution plan hands
the loss the logits instead (`from_logits=True`) and the loss uses the fused, numerically
stable softmax + cross-entropy kernel: its gradient is p - t, with no division by a probability
that may underflow.
"""
from .arrays import get_array_module
from .kernels.reference import ReferenceKernels

_REFERENCE = ReferenceKernels()

EPSILON = 1e-7  # Keras's clipping of probabilities in cross-entropy


class Loss:
    name = "loss"
    sparse = False
    fuses_softmax = False  # True: given logits, it applies a softmax itself (fused with the loss)

    def targets_to_dense(self, targets, num_classes):
        return targets

    def compute(self, output, targets, from_logits, kernels=None):
        """(probabilities, per-sample loss, d(sum of per-sample losses)/d(output)).

        `output` is logits when `from_logits` else probabilities; `targets` are one-hot rows."""
        raise NotImplementedError

    def __call__(self, y_true, y_pred, from_logits=False):
        """Mean loss over the batch, as a Python float (for users; training uses `compute`)."""
        xp = get_array_module(y_pred)
        targets = self.targets_to_dense(xp.asarray(y_true), y_pred.shape[-1])
        _, per_sample, _ = self.compute(y_pred, targets, from_logits)
        return float(per_sample.mean())


class CategoricalCrossentropy(Loss):
    """-sum(t * log p) per sample, on one-hot (or soft) targets."""

    name = "categorical_crossentropy"
    fuses_softmax = True

    def compute(self, output, targets, from_logits, kernels=None):
        if from_logits:
            softmax_ce = (kernels or _REFERENCE).softmax_cross_entropy
            return softmax_ce(output, targets, EPSILON)
        xp = get_array_module(output)
        eps = output.dtype.type(EPSILON)
        clipped = xp.clip(output, eps, 1 - eps)
        per_sample = -(targets * xp.log(clipped)).sum(axis=1)
        inside = (output >= eps) & (output <= 1 - eps)  # the clip passes no gradient outside
        grad = -targets / clipped * inside
        return output, per_sample, grad


class SparseCategoricalCrossentropy(CategoricalCrossentropy):
    """The same loss on integer class labels."""

    name = "sparse_categorical_crossentropy"
    sparse = True

    def targets_to_dense(self, targets, num_classes):
        xp = get_array_module(targets)
        labels = targets.reshape(-1).astype(xp.int64)
        dense = xp.zeros((labels.shape[0], num_classes), dtype=xp.float32)
        dense[xp.arange(labels.shape[0]), labels] = 1.0
        return dense


_LOSSES = {
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
}


def get(loss):
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]()
    raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(_LOSSES)} or pass a tinycnn.losses.Loss")


def count_correct(output, targets_dense):
    """How many rows have their largest output at the target's largest entry (Keras 'accuracy').
    A device scalar: the training loop sums these without a device-to-host copy per step."""
    xp = get_array_module(output)
    return (xp.argmax(output, axis=1) == xp.argmax(targets_dense, axis=1)).sum()
