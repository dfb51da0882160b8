"""Where arrays live: NumPy on the CPU, CuPy on the GPU.

Layer code asks a `Backend` for its array module (`backend.xp`) and writes its math once against
it; only the hot kernels differ per device, through the backend's kernel set (`backend.kernels`,
see tinycnn.kernels). Which backend a model gets is a setting (tinycnn.config): the device, the
kernel set and the CPU convolution algorithm. The first CPU backend also applies the process-wide
CPU tuning (tinycnn.kernels.cpu.tune_process); `describe()` shows all of it.
"""
import sys

import numpy as np

from . import config, naming, randomness
from .arrays import CUPY_IMPORT_ERROR, cupy, get_array_module, to_numpy
from .errors import DeviceError

__all__ = ["Backend", "get_backend", "gpu_problem", "get_array_module", "to_numpy", "clear_session", "DeviceError"]

GPU_INSTALL_HINT = ('pip install "tinycnn[gpu]" (CuPy for CUDA 12 with the CUDA libraries it needs; '
                    '"tinycnn[gpu-cuda13]" for a CUDA 13 driver)')

clear_session = naming.clear_session

# The probe: one tiny kernel compiled and launched (NVRTC, the driver) and one matmul (cuBLAS).
_PROBE_SOURCE = r"""
extern "C" __global__ void tinycnn_probe(float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = 2.0f * i + 1.0f;
}
"""
_probed = {}  # CuPy module -> its problem (None: usable); per module, so a test's stand-in is probed anew
_fallback_noticed = False


def _probe(cp):
    """None when CuPy can compile, launch and multiply on the current GPU; else what failed."""
    try:
        kernel = cp.RawModule(code=_PROBE_SOURCE).get_function("tinycnn_probe")
    except Exception as exc:  # NVRTC missing (a CuPy without its CUDA components) or broken
        return f"CuPy cannot compile CUDA kernels ({type(exc).__name__}: {exc}); install with: {GPU_INSTALL_HINT}"
    try:
        y = cp.empty(37, dtype=cp.float32)
        kernel((2,), (8,), (y, np.int32(37)))
        if not np.array_equal(cp.asnumpy(y), 2.0 * np.arange(37, dtype=np.float32) + 1.0):
            return "a test kernel ran on the GPU but computed wrong values"
    except Exception as exc:
        return f"CuPy cannot launch a kernel on the GPU ({type(exc).__name__}: {exc})"
    try:
        a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        if not np.array_equal(cp.asnumpy(a @ a.T), np.array([[5.0, 14.0], [14.0, 50.0]], dtype=np.float32)):
            return "a test matrix product on the GPU computed wrong values"
    except Exception as exc:  # cuBLAS missing or broken
        return (f"CuPy cannot multiply matrices (cuBLAS: {type(exc).__name__}: {exc}); "
                f"install with: {GPU_INSTALL_HINT}")
    return None


def gpu_problem():
    """Why the GPU backend is unavailable, or None if it can be used. The first call proves the
    GPU works (compiles and launches a kernel, multiplies two matrices: what the first training
    step needs) and remembers the answer for the process."""
    if cupy is None:
        return f"CuPy is not installed or failed to import ({CUPY_IMPORT_ERROR}); install it with: {GPU_INSTALL_HINT}"
    if cupy not in _probed:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            _probed[cupy] = f"CuPy is installed but CUDA is not usable ({exc})"
        else:
            _probed[cupy] = "CuPy is installed but no CUDA GPU is visible" if count == 0 else _probe(cupy)
    return _probed[cupy]


def _auto_device():
    """'gpu' when the GPU works, else 'cpu', saying why once when CuPy is installed but unusable
    (someone meant to use the GPU; a CPU-only install stays quiet)."""
    global _fallback_noticed
    problem = gpu_problem()
    if problem is None:
        return "gpu"
    if cupy is not None and not _fallback_noticed:
        _fallback_noticed = True
        print(f"tinycnn: device='auto' runs on the CPU: {problem}", file=sys.stderr)
    return "cpu"


class Backend:
    """One device: its array module and its kernel set."""

    def __init__(self, name, xp, kernels, settings):
        self.name = name
        self.xp = xp
        self.kernels = kernels
        self.settings = settings
        self.tuning = None  # process-wide CPU tuning in force (set for CPU backends)

    def asarray(self, array, dtype=None):
        """`array` on this device (no copy when it is already there with that dtype)."""
        return self.xp.asarray(array, dtype=dtype)

    def random_generator(self, seed):
        """A device-side generator of this backend's array module."""
        return self.xp.random.default_rng(seed)

    def permutation(self, n, seed):
        """A random permutation of range(n), computed on the device; the same on every backend."""
        return randomness.permutation(self.xp, n, seed)

    def describe(self):
        """One line: the device, the kernel set and the settings in force."""
        if self.name == "gpu":
            dev = self.xp.cuda.Device()
            props = self.xp.cuda.runtime.getDeviceProperties(dev.id)
            gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            return f"gpu:{dev.id} ({gpu}), CuPy {self.xp.__version__}, kernels: {self.kernels.describe()}"
        text = f"cpu (NumPy {np.__version__}), kernels: {self.kernels.describe()}"
        if self.tuning:
            text += (f"; numba threads: {self.tuning['numba_threads']}, OpenMP idle policy: {self.tuning['spin']}, "
                     f"malloc tuning: {self.tuning['malloc_tuning']}")
        return text

    def __repr__(self):
        return f"Backend({self.name!r}, kernels={self.kernels.name!r})"


_BACKENDS = {}


def _make_backend(device, settings):
    from .kernels.reference import ReferenceKernels

    if device == "cpu":
        from .kernels import cpu

        backend = Backend("cpu", np, cpu.CPUKernels(settings.conv) if settings.kernels == "fast" else ReferenceKernels(),
                          settings)
        backend.tuning = cpu.tune_process(settings)
        return backend
    if settings.kernels == "fast":
        from .kernels.gpu import GPUKernels

        return Backend("gpu", cupy, GPUKernels(), settings)
    return Backend("gpu", cupy, ReferenceKernels(), settings)


def get_backend(device=None):
    """The backend for `device` ('cpu', 'gpu', 'auto', a Backend, or None for the `device` setting),
    with the kernel set the settings choose (tinycnn.config)."""
    if isinstance(device, Backend):
        return device
    settings = config.settings()
    device = settings.device if device is None else config.validate("device", device)
    if device == "auto":
        device = _auto_device()
    if device == "gpu":
        problem = gpu_problem()
        if problem is not None:
            raise DeviceError(f"device='gpu' is unavailable: {problem}")
    key = (device, settings.kernels, settings.conv if device == "cpu" else None)
    if key not in _BACKENDS:
        _BACKENDS[key] = _make_backend(device, settings)
    return _BACKENDS[key]
