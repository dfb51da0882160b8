"""Reusable work arrays for the CPU kernels, one set per thread.

A kernel that needs a large temporary on every call (the patch matrix of a convolution chunk,
the zero-bordered padded output gradient) takes it from here instead of allocating it each
time. Only for values that die before the kernel returns; per thread, so two models training
in two threads never share one.
"""
import threading

import numpy as np

_local = threading.local()


def scratch_buffer(name, shape, dtype, zeroed=False):
    """The work array for key (`name`, `shape`, `dtype`), made on first use. `zeroed`: zero-filled
    when first made, for buffers whose unwritten parts must stay 0 across calls."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (name, tuple(shape), np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = (np.zeros if zeroed else np.empty)(shape, dtype=dtype)
    return buf
