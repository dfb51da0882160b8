"""Which array module holds an array: NumPy, or CuPy when it is installed.

CuPy is optional: importing it is attempted once, here, and every other module asks this one.
"""
import numpy as np

try:
    import cupy
except Exception as exc:  # ImportError, or a CuPy build that fails to load its CUDA libraries
    cupy = None
    CUPY_IMPORT_ERROR = exc
else:
    CUPY_IMPORT_ERROR = None


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the arrays (numpy when CuPy is absent)."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def to_numpy(array):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if cupy is not None and isinstance(array, cupy.ndarray):
        return array.get()
    return np.asarray(array)


def is_array(value):
    """True for a NumPy or CuPy array (not for lists or scalars)."""
    return isinstance(value, np.ndarray) or (cupy is not None and isinstance(value, cupy.ndarray))
