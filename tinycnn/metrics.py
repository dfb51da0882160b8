"""Metrics, as Keras 3 names and computes them: accuracy (resolved for the output, as Keras does),
categorical, sparse categorical, binary and top-k accuracy.

A metric gives one value per sample (`values`); the training loop keeps the sums on the device
(weighted by sample weights only for compile's weighted_metrics, as in Keras 3) and reads them
once per epoch. The history keys carry the name the user gave (`metrics=["accuracy"]` logs
`accuracy` and `val_accuracy`; `["acc"]` logs `acc`). The `update_state` / `result` /
`reset_state` methods serve users who call a metric directly.

Inside training, targets arrive as the loss prepared them (one-hot rows for both cross-entropies),
so the sparse and dense forms of a metric compute the same thing there.
"""
import numpy as np

from .arrays import get_array_module, to_numpy

__all__ = ["Metric", "Accuracy", "CategoricalAccuracy", "SparseCategoricalAccuracy", "BinaryAccuracy",
           "TopKCategoricalAccuracy", "SparseTopKCategoricalAccuracy", "categorical_accuracy",
           "sparse_categorical_accuracy", "binary_accuracy", "top_k_categorical_accuracy",
           "sparse_top_k_categorical_accuracy", "get"]


class Metric:
    """Subclasses implement `values(predictions, targets)`: one value per sample, on the device."""

    name = "metric"
    sparse = False  # update_state takes integer labels
    direction = "up"  # better is higher (every metric here is an accuracy); callbacks' mode="auto" reads it

    def __init__(self, name=None):
        if name is not None:
            self.name = name
        self.reset_state()

    def values(self, predictions, targets):
        raise NotImplementedError

    def total(self, predictions, targets, kernels=None):
        """The sum of `values` over the batch, on the device; a metric with a kernel of its own
        (`kernels`: the model's kernel set) overrides this."""
        return self.values(predictions, targets).sum()

    def accumulate(self, running, predictions, targets, kernels=None):
        """An epoch's running sum with this batch's total added: in place where `running` is a 0-d
        array (a device sum the loop owns), else as a new value (host scalars; after the first
        batch's 0, the batch's total itself, which on a GPU the next batches then add into).
        A metric whose kernel can add into the sum itself overrides this (one launch, not two)."""
        total = self.total(predictions, targets, kernels)
        if _is_scalar_array(running, predictions):
            running += total
            return running
        if type(running) is int and running == 0:  # the epoch's first batch: its total is the sum
            return total
        return running + total

    # -- Keras's stateful API, for direct use -------------------------------------------------
    def reset_state(self):
        self._total, self._count = 0.0, 0.0

    def dense_targets(self, y_true, y_pred):
        """NumPy targets in the layout `values` takes (one-hot rows for a sparse metric)."""
        targets = np.asarray(to_numpy(y_true))
        if not self.sparse:
            return targets.reshape(y_pred.shape)
        dense = np.zeros(y_pred.shape, dtype=y_pred.dtype)
        dense[np.arange(y_pred.shape[0]), targets.reshape(-1).astype(np.int64)] = 1
        return dense

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(to_numpy(y_pred))
        values = np.asarray(self.values(y_pred, self.dense_targets(y_true, y_pred)), dtype=np.float64)
        weights = np.ones_like(values) if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)
        self._total += float((values * weights).sum())
        self._count += float(weights.sum())

    def result(self):
        return self._total / self._count if self._count else 0.0

    def get_config(self):
        return {"name": self.name}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def _is_scalar_array(value, like):
    """Whether `value` is a 0-d array of `like`'s array module (NumPy's 0-d results are scalars)."""
    return isinstance(value, get_array_module(like).ndarray) and value.ndim == 0


class CategoricalAccuracy(Metric):
    """1 where the prediction's largest entry is the target's largest entry."""

    name = "categorical_accuracy"

    def values(self, predictions, targets):
        xp = get_array_module(predictions)
        return xp.argmax(predictions, axis=-1) == xp.argmax(targets, axis=-1)

    def total(self, predictions, targets, kernels=None):
        """The kernel set's count (one launch on the GPU instead of four), for (rows, classes) arrays;
        a subclass that redefines `values` is summed from its values."""
        if not self._counted_by(kernels, predictions):
            return super().total(predictions, targets)
        return kernels.categorical_matches(predictions, targets)

    def accumulate(self, running, predictions, targets, kernels=None):
        """The kernel counts straight into a device running sum (no add after it)."""
        if not (self._counted_by(kernels, predictions) and _is_scalar_array(running, predictions)):
            return super().accumulate(running, predictions, targets, kernels)
        return kernels.categorical_matches(predictions, targets, running)

    def _counted_by(self, kernels, predictions):
        return kernels is not None and predictions.ndim == 2 and type(self).values is CategoricalAccuracy.values


class SparseCategoricalAccuracy(CategoricalAccuracy):
    name = "sparse_categorical_accuracy"
    sparse = True


class BinaryAccuracy(Metric):
    """The fraction of a sample's outputs on the target's side of `threshold` (targets 0 or 1)."""

    name = "binary_accuracy"

    def __init__(self, name=None, threshold=0.5):
        self.threshold = float(threshold)
        super().__init__(name)

    def get_config(self):
        return {"name": self.name, "threshold": self.threshold}

    def values(self, predictions, targets):
        hits = (predictions > predictions.dtype.type(self.threshold)) == (targets > 0.5)
        return hits.reshape(hits.shape[0], -1).mean(axis=1)


class Accuracy(Metric):
    """The fraction of a sample's outputs exactly equal to the targets (Keras's plain Accuracy)."""

    name = "accuracy"

    def values(self, predictions, targets):
        hits = predictions == targets
        return hits.reshape(hits.shape[0], -1).mean(axis=1)


class TopKCategoricalAccuracy(Metric):
    """1 where the target class is among the k largest predictions (ties at the boundary count)."""

    name = "top_k_categorical_accuracy"

    def __init__(self, k=5, name=None):
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        super().__init__(name)

    def get_config(self):
        return {"name": self.name, "k": self.k}

    def values(self, predictions, targets):
        xp = get_array_module(predictions)
        label = xp.argmax(targets, axis=-1)
        target_score = xp.take_along_axis(predictions, label[:, None], axis=-1)
        return (predictions > target_score).sum(axis=-1) < self.k


class SparseTopKCategoricalAccuracy(TopKCategoricalAccuracy):
    name = "sparse_top_k_categorical_accuracy"
    sparse = True


def _function(cls):
    def metric(y_true, y_pred):
        instance = cls()
        y_pred = np.asarray(to_numpy(y_pred))
        return np.asarray(instance.values(y_pred, instance.dense_targets(y_true, y_pred)), dtype=np.float32)

    metric.__name__ = cls.name
    metric.metric_class = cls
    return metric


categorical_accuracy = _function(CategoricalAccuracy)
sparse_categorical_accuracy = _function(SparseCategoricalAccuracy)
binary_accuracy = _function(BinaryAccuracy)
top_k_categorical_accuracy = _function(TopKCategoricalAccuracy)
sparse_top_k_categorical_accuracy = _function(SparseTopKCategoricalAccuracy)

_BY_NAME = {
    "categorical_accuracy": CategoricalAccuracy,
    "sparse_categorical_accuracy": SparseCategoricalAccuracy,
    "binary_accuracy": BinaryAccuracy,
    "top_k_categorical_accuracy": TopKCategoricalAccuracy,
    "sparse_top_k_categorical_accuracy": SparseTopKCategoricalAccuracy,
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in list(_BY_NAME.values()) + [Accuracy]}  # how Keras files name them
_BY_NAME.update(_BY_CLASS_NAME)


def class_named(name):
    """The metric class called `name` ("CategoricalAccuracy", as a Keras file names it), or None."""
    return _BY_CLASS_NAME.get(name)


def accuracy_for(loss, output_shape):
    """The accuracy Keras 3 means by "accuracy": binary for a model with one output unit, else
    categorical (sparse when the targets are labels, i.e. with the sparse loss). As in Keras, a
    multi-label model (binary cross-entropy over several sigmoid units) gets categorical accuracy:
    pass "binary_accuracy" for the per-unit kind."""
    if tuple(output_shape)[-1:] == (1,):
        return BinaryAccuracy
    if getattr(loss, "sparse", False):
        return SparseCategoricalAccuracy
    return CategoricalAccuracy


def get(identifier, loss=None, output_shape=()):
    """A Metric from a name ("accuracy", "acc", "top_k_categorical_accuracy", ...), a Metric (class
    or instance) or one of this module's functions. "accuracy" and "acc" are resolved for the loss
    and keep the name the user gave."""
    if isinstance(identifier, Metric):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Metric):
        return identifier()
    if callable(identifier) and hasattr(identifier, "metric_class"):
        return identifier.metric_class()
    if isinstance(identifier, str) and identifier.lower() in ("accuracy", "acc"):
        return accuracy_for(loss, output_shape)(name=identifier)
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(f"unknown metric {identifier!r}: choose accuracy (acc), "
                     f"{', '.join(sorted(k for k in _BY_NAME if k.islower()))}, or pass a tinycnn.metrics.Metric")
