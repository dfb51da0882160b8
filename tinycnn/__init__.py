"""tinycnn: a from-scratch CNN framework on a swappable NumPy (numba) / CuPy backend."""
from . import (activations, arguments, backend, callbacks, config, datasets, distributed, files, gradcheck, initializers,
               layers, losses, metrics, models, optimizers, regularizers, saving, schedules, utils)
from .backend import get_backend
from .errors import (ConfigError, DatasetError, DeviceError, DistributedError, GraphError, ModelBusyError, RankFailure,
                     ShapeError, ShareProcessError, WeightsFileError)
from .layers import Input
from .model import Model, Sequential

__version__ = "0.3.0"
__all__ = [
    "Model", "Sequential", "Input", "layers", "losses", "metrics", "models", "optimizers", "schedules", "callbacks",
    "activations", "initializers", "regularizers", "utils", "backend", "config", "datasets", "files", "gradcheck",
    "saving", "get_backend", "ConfigError", "DeviceError", "GraphError", "ShapeError", "WeightsFileError",
    "ModelBusyError", "DatasetError", "DistributedError", "RankFailure", "ShareProcessError", "distributed", "arguments", "__version__",
]
