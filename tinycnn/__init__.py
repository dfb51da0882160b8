"""tinycnn: a from-scratch CNN framework on a swappable NumPy (numba) / CuPy backend."""
from . import activations, backend, callbacks, datasets, gradcheck, layers, losses, optimizers, saving, schedules
from .backend import DeviceError, get_backend
from .layers import ShapeError
from .model import Sequential
from .saving import WeightsFileError

__version__ = "0.1.0"
__all__ = [
    "Sequential", "layers", "losses", "optimizers", "schedules", "callbacks", "activations", "backend",
    "gradcheck", "get_backend", "DeviceError", "ShapeError", "WeightsFileError", "__version__",
]
