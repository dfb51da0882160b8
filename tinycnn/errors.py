"""Every error type tinycnn raises on purpose, in one leaf module (no imports, so any module may use them)."""


class ConfigError(ValueError):
    """A setting has a value tinycnn cannot use: an environment variable, `tinycnn.config.using(...)`,
    or a device name. The message names the setting and the values it accepts."""


class DeviceError(ConfigError, RuntimeError):
    """The requested device cannot be used (unknown name, CuPy missing, no working CUDA device)."""


class ShapeError(ValueError):
    """An array's shape does not fit the layer or model it is given to."""


class GraphError(ValueError):
    """A functional model's graph is malformed: an input that is not a tinycnn.Input, a layer
    called on something that is not a tensor, outputs that do not depend on the inputs."""


class WeightsFileError(ValueError):
    """A weights or checkpoint file is unreadable, corrupt, or does not match the model."""


class DatasetError(RuntimeError):
    """A dataset could not be read, verified or obtained from any source."""


class ModelBusyError(RuntimeError):
    """A model was called from one thread while another thread was running it."""


class DistributedError(RuntimeError):
    """Data-parallel training cannot go on: MPI or NCCL is missing, or the ranks were given
    different data or settings. The message says which."""


class RankFailure(DistributedError):
    """Another rank of a data-parallel job failed; this rank stops too instead of waiting for it
    forever in a collective. The message names the rank and its error."""


class ShareProcessError(RuntimeError):
    """The worker process that trains a split batch's second share during `fit` failed or vanished
    (tinycnn.share_process). The message holds the worker's traceback."""
