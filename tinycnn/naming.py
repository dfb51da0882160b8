"""Keras 2 names for layers and models: per-process counters per kind, counted from 1
(`conv2d_1`, `conv2d_2`, `sequential_1`, `model_1`, `input_1`)."""
import collections

_counts = collections.Counter()


def unique_name(base):
    _counts[base] += 1
    return f"{base}_{_counts[base]}"


def clear_session():
    """Restart every name counter, as in a fresh process (Keras's `clear_session`): the next
    Conv2D is `conv2d_1` again. Objects already made keep their names."""
    _counts.clear()
