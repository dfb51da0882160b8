"""Where arrays live: NumPy on the CPU, CuPy on the GPU.

Layer code asks a `Backend` for its array module (`backend.xp`) and writes its math once
against it; only the few hot kernels differ per device (`backend.kernels`).
"""
import os
import types

import numpy as np

try:  # CuPy is optional: the GPU backend registers only if its import succeeds.
    import cupy as _cupy
except Exception as _exc:  # ImportError, or a CuPy build that fails to load its CUDA libraries
    _cupy = None
    _CUPY_IMPORT_ERROR = _exc
else:
    _CUPY_IMPORT_ERROR = None

DEVICES = ("auto", "cpu", "gpu")
GPU_INSTALL_HINT = 'pip install "tinycnn[gpu]"  (CuPy for CUDA 12; use cupy-cuda13x for CUDA 13)'


class DeviceError(RuntimeError):
    """The requested device cannot be used (unknown name, CuPy missing, no CUDA device)."""


def gpu_problem():
    """Why the GPU backend is unavailable, or None if it can be used."""
    if _cupy is None:
        return f"CuPy is not installed or failed to import ({_CUPY_IMPORT_ERROR}); install it with: {GPU_INSTALL_HINT}"
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        return f"CuPy is installed but CUDA is not usable ({exc})"
    if count == 0:
        return "CuPy is installed but no CUDA GPU is visible"
    return None


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the arrays (numpy when CuPy is absent)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def to_numpy(array):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return array.get()
    return np.asarray(array)


class Backend:
    """One device: its array module, its kernels and its random streams."""

    def __init__(self, name, xp, kernels):
        self.name = name
        self.xp = xp
        self.kernels = kernels

    def asarray(self, array, dtype=None):
        """`array` on this device (no copy when it is already there with that dtype)."""
        return self.xp.asarray(array, dtype=dtype)

    def random_generator(self, seed):
        """A device-side generator of this backend's array module."""
        return self.xp.random.default_rng(seed)

    def permutation(self, n, seed):
        """A random permutation of range(n), computed on the device: the order of the
        counter-based hashes of the indices (a bijection, so no ties). The same seed gives
        the same permutation on every backend."""
        from .kernels_reference import _lowbias32, dropout_key

        keys = _lowbias32(self.xp.arange(n, dtype=self.xp.uint64) ^ self.xp.uint64(dropout_key(seed)), self.xp)
        return self.xp.argsort(keys)

    def describe(self):
        if self.name == "gpu":
            dev = self.xp.cuda.Device()
            props = self.xp.cuda.runtime.getDeviceProperties(dev.id)
            gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            return f"gpu:{dev.id} ({gpu}), CuPy {self.xp.__version__}"
        return f"cpu (NumPy {np.__version__}, kernels: {self.kernels.__name__})"

    def __repr__(self):
        return f"Backend({self.name!r})"


def _merge_kernels(name, *modules):
    """Reference kernels overridden, entry by entry, by the faster modules given after it."""
    from . import kernels_reference

    merged = types.SimpleNamespace(__name__=name)
    for entry in kernels_reference.KERNELS:
        setattr(merged, entry, getattr(kernels_reference, entry))
    for module in modules:
        for entry in kernels_reference.KERNELS:
            if hasattr(module, entry):
                setattr(merged, entry, getattr(module, entry))
    return merged


_BACKENDS = {}


def _kernel_choice():
    choice = os.environ.get("TINYCNN_KERNELS", "fast").lower()
    if choice not in ("fast", "reference"):
        raise DeviceError(f"TINYCNN_KERNELS must be 'fast' or 'reference', got {choice!r}")
    return choice


def get_backend(device=None):
    """The backend for `device` ('cpu', 'gpu', 'auto', a Backend, or None for $TINYCNN_DEVICE / auto)."""
    if isinstance(device, Backend):
        return device
    if device is None:
        device = os.environ.get("TINYCNN_DEVICE", "auto")
    device = str(device).lower()
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "gpu" if gpu_problem() is None else "cpu"
    if device == "gpu":
        problem = gpu_problem()
        if problem is not None:
            raise DeviceError(f"device='gpu' is unavailable: {problem}")
    key = (device, _kernel_choice())
    if key not in _BACKENDS:
        if device == "cpu":
            fast = []
            if key[1] == "fast":
                from . import kernels_cpu

                fast.append(kernels_cpu)
            _BACKENDS[key] = Backend("cpu", np, _merge_kernels(f"cpu-{key[1]}", *fast))
        else:
            fast = []
            if key[1] == "fast":
                from . import kernels_gpu

                fast.append(kernels_gpu)
            _BACKENDS[key] = Backend("gpu", _cupy, _merge_kernels(f"gpu-{key[1]}", *fast))
    return _BACKENDS[key]


def reference_backend(device="cpu"):
    """The backend with only the plain array-module kernels: what tests compare fast kernels against."""
    if device == "gpu" and gpu_problem() is not None:
        raise DeviceError(f"device='gpu' is unavailable: {gpu_problem()}")
    xp = np if device == "cpu" else _cupy
    return Backend(device, xp, _merge_kernels(f"{device}-reference"))
