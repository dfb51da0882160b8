"""tinycnn's settings, read in one place::

    | setting           | environment variable                | values                | default                               |
    |-------------------|-------------------------------------|-----------------------|---------------------------------------|
    | `device`          | `TINYCNN_DEVICE`                    | auto, cpu, gpu        | auto (the GPU if one works)           |
    | `kernels`         | `TINYCNN_KERNELS`                   | fast, reference       | fast (numba / CUDA kernels)           |
    | `conv`            | `TINYCNN_CONV`                      | auto, direct, gemm    | auto (CPU: GEMM for wide layers)      |
    | `numba_threads`   | `TINYCNN_NUMBA_THREADS`             | a positive integer    | numba's default: every core           |
    | `malloc_tuning`   | `TINYCNN_MALLOC_TUNING`             | 1, 0                  | 1                                     |
    | `batch_split`     | `TINYCNN_BATCH_SPLIT`               | 1, 0                  | 1 (CPU: see tinycnn.batch_split)      |
    | `share_processes` | `TINYCNN_SHARE_PROCESSES`           | 1, 0                  | 1 (fit: see tinycnn.share_process)    |
    | `step`            | `TINYCNN_STEP`                      | eager, static, graphs | eager (see tinycnn.static_step)       |
    | `spin`            | `GOMP_SPINCOUNT`, `OMP_WAIT_POLICY` | OpenMP's own          | GOMP_SPINCOUNT=1000 if neither is set |

`settings()` reads the environment every time it is called (a few dictionary lookups) and lays
the overrides of any enclosing `using(...)` block over it; a bad value raises `ConfigError`
naming the variable and the values it accepts. Tests and benchmarks switch paths with
`using(conv="gemm")` instead of patching module globals.

`device`, `kernels` and `conv` choose the backend a model gets when it is made; `batch_split` is
read at every CPU training step and inference batch, `step` and `share_processes` when `fit`
starts. `numba_threads`, `malloc_tuning` and `spin` tune the whole process, so they are applied
once, when the first CPU backend is created (see `tinycnn.kernels.cpu.tune_process`); later
changes do not take effect.
"""
import contextlib
import contextvars
import dataclasses
import os

from .errors import ConfigError, DeviceError

DEVICES = ("auto", "cpu", "gpu")
KERNEL_CHOICES = ("fast", "reference")
CONV_CHOICES = ("auto", "direct", "gemm")
STEP_CHOICES = ("eager", "static", "graphs")


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str = "auto"
    kernels: str = "fast"
    conv: str = "auto"
    numba_threads: int = None  # None: numba's default (every core)
    malloc_tuning: bool = True
    batch_split: bool = True  # CPU training splits a batch between threads (tinycnn.batch_split)
    share_processes: bool = True  # fit runs a split batch's second share in a process (tinycnn.share_process)
    step: str = "eager"  # fit's training step: eager, static, or static captured as CUDA graphs


def _choice(choices, error=ConfigError):
    def check(value, source):
        text = str(value).lower()
        if text not in choices:
            raise error(f"{source} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return text
    return check


def _threads(value, source):
    if value is None:
        return None
    try:
        count = int(value)
        if isinstance(value, float) or count < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{source} must be a positive integer (a thread count), got {value!r}") from None
    return count


def _flag(value, source):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{source} must be 1 or 0, got {value!r}")


# setting -> (environment variable, checker: (value, where it came from) -> normalized value)
_FIELDS = {
    "device": ("TINYCNN_DEVICE", _choice(DEVICES, DeviceError)),  # DeviceError is a ConfigError
    "kernels": ("TINYCNN_KERNELS", _choice(KERNEL_CHOICES)),
    "conv": ("TINYCNN_CONV", _choice(CONV_CHOICES)),
    "numba_threads": ("TINYCNN_NUMBA_THREADS", _threads),
    "malloc_tuning": ("TINYCNN_MALLOC_TUNING", _flag),
    "batch_split": ("TINYCNN_BATCH_SPLIT", _flag),
    "share_processes": ("TINYCNN_SHARE_PROCESSES", _flag),
    "step": ("TINYCNN_STEP", _choice(STEP_CHOICES)),
}

_overrides = contextvars.ContextVar("tinycnn_settings_overrides", default=())


def validate(name, value):
    """`value` checked (and normalized) as setting `name`; ConfigError if it is not acceptable."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting {name!r}: tinycnn's settings are {', '.join(_FIELDS)}")
    return _FIELDS[name][1](value, f"setting {name!r}")


def from_environment():
    """The settings the environment asks for, without any `using` overrides."""
    values = {}
    for name, (variable, check) in _FIELDS.items():
        text = os.environ.get(variable)
        if text is not None and text != "":
            values[name] = check(text, variable)
    return Settings(**values)


def settings():
    """The settings in force here: the environment, overridden by enclosing `using` blocks."""
    current = from_environment()
    for changes in _overrides.get():
        current = dataclasses.replace(current, **changes)
    return current


@contextlib.contextmanager
def using(**changes):
    """Override settings inside a `with` block (this thread or task only):
    `with tinycnn.config.using(conv="gemm"): model = ...`."""
    checked = {name: validate(name, value) for name, value in changes.items()}
    token = _overrides.set(_overrides.get() + (checked,))
    try:
        yield
    finally:
        _overrides.reset(token)
