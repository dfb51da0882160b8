"""Keras's utilities that CNN scripts use: one-hot labels and one seed for everything."""
import random

import numpy as np

from . import naming, randomness

__all__ = ["to_categorical", "set_random_seed", "clear_session"]

clear_session = naming.clear_session


def to_categorical(y, num_classes=None, dtype="float32"):
    """Integer class labels (any shape; a trailing axis of 1 is dropped) as one-hot rows."""
    y = np.asarray(y)
    if y.ndim and y.shape[-1] == 1 and y.ndim > 1:
        y = y.reshape(y.shape[:-1])
    if y.size and (np.dtype(y.dtype).kind not in "iub" and not np.all(y == np.floor(y))):
        raise ValueError("to_categorical needs integer class labels")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"to_categorical needs labels >= 0, found {int(labels.min())}")
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.size and labels.max() >= classes:
        raise ValueError(f"label {int(labels.max())} does not fit num_classes={classes}")
    out = np.zeros(labels.shape + (classes,), dtype=dtype)
    np.put_along_axis(out, labels[..., None], 1, axis=-1)
    return out


def set_random_seed(seed):
    """Seed Python's `random`, NumPy's global generator and tinycnn: models built without a `seed`
    then draw theirs from a stream started at `seed`, so a script runs the same twice."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    randomness.set_global_seed(seed)
