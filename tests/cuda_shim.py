"""CuPy's RawModule on the CPU, for tests on machines without a GPU.

A module's CUDA source (tinycnn/kernels/cuda_source.py) is compiled by the host C++ compiler
after a small prelude that makes `__global__` functions host functions and blockIdx, threadIdx,
blockDim and gridDim variables; a launch then plays every thread of a deliberately small grid
(PLAYED_GRID blocks of PLAYED_BLOCK threads, whatever grid the caller asked for: the kernels are
grid-stride loops, so any grid must give the same result), one after another. Arrays are passed
as pointers and NumPy scalars by value, as CuPy's RawKernel passes them. `fake_cupy()` is a
stand-in `cupy` module (NumPy for the array functions, this RawModule) under which
`tinycnn.kernels.gpu` imports and its GPUKernels runs on NumPy arrays: the kernels' own source,
called the way the backend calls it. Compiled with -ffp-contract=off, as NVRTC is given
--fmad=false: no fused multiply-adds anywhere, so a GPU must round as this does.
"""
import contextlib
import ctypes
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")
PLAYED_GRID, PLAYED_BLOCK = 3, 5  # small and odd: a stride loop that assumed one thread per item would fail

_PRELUDE = r"""
#include <cmath>
using std::exp; using std::log; using std::sqrt;
#define __global__
#define __device__
#define __forceinline__ inline
// Threads run one after another here, so a fence has nothing to order and an atomic is a plain add.
static inline void __threadfence() {}
static inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { unsigned int old = *p; *p += v; return old; }
template <class V> static inline V __ldcg(const V* p) { return *p; }
struct tinycnn_dim3 { unsigned int x, y, z; };
static tinycnn_dim3 blockIdx, threadIdx, blockDim, gridDim;
extern "C" void tinycnn_shim_thread(unsigned int block, unsigned int thread, unsigned int blocks,
                                    unsigned int threads) {
    blockIdx = {block, 0, 0}; threadIdx = {thread, 0, 0}; gridDim = {blocks, 1, 1}; blockDim = {threads, 1, 1};
}
"""
_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
           np.uint8: ctypes.c_ubyte, np.uint32: ctypes.c_uint, np.uint64: ctypes.c_ulonglong}
_BUILD = os.path.join(tempfile.gettempdir(), f"tinycnn-cuda-shim-{os.getuid()}")


def compile_library(code, name="module"):
    """The shared library of `code` (CUDA source) compiled as C++ after the prelude; cached by hash."""
    text = _PRELUDE + code
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    os.makedirs(_BUILD, exist_ok=True)
    src, lib = (os.path.join(_BUILD, f"{name}-{digest}{ext}") for ext in (".cpp", ".so"))
    if not os.path.exists(lib):
        with open(src, "w") as f:
            f.write(text)
        tmp = f"{lib}.{os.getpid()}"
        proc = subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-o", tmp, src],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"the CUDA source does not compile as C++:\n{proc.stderr}"
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


class RawKernel:
    def __init__(self, library, name):
        self.name = name
        self._function = getattr(library, name)
        self._function.restype = None
        self._thread = library.tinycnn_shim_thread

    def __call__(self, grid, block, args, **_):
        assert all(int(g) >= 1 for g in grid) and all(int(b) >= 1 for b in block), f"{self.name}: empty launch"
        c_args = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{self.name}: a non-contiguous array argument"
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:
                assert isinstance(a, np.generic), f"{self.name}: pass scalars as NumPy scalars, not {type(a)}"
                c_args.append(_CTYPES[type(a)](a))
        for b in range(PLAYED_GRID):
            for t in range(PLAYED_BLOCK):
                self._thread(b, t, PLAYED_GRID, PLAYED_BLOCK)
                self._function(*c_args)


class RawModule:
    def __init__(self, code, options=(), **_):
        self.code, self.options = code, options
        self._library = compile_library(code)

    def get_function(self, name):
        return RawKernel(self._library, name)


class LaunchCounter:
    """Counts what a GPU would launch while the stand-in CuPy runs: each CUDA kernel of the GPU set,
    each array operation (a CuPy kernel, or a cuBLAS call for matmul), each fill of host values,
    each dtype-changing copy. `install(module)` makes the module's arrays count (an ndarray
    subclass that reports its ufuncs, array functions, item assignments and copies)."""

    FREE = {"empty_like", "shares_memory", "may_share_memory", "ndim", "shape", "result_type"}

    def __init__(self):
        self.counts = {}
        counter = self

        class Counted(np.ndarray):
            def __array_ufunc__(self, ufunc, method, *inputs, **kw):
                counter.add(ufunc.__name__ + ("" if method == "__call__" else "." + method))
                inputs = tuple(_plain(i) for i in inputs)
                if "out" in kw:
                    kw["out"] = tuple(_plain(o) for o in kw["out"])
                return _counted(getattr(ufunc, method)(*inputs, **kw))

            def __array_function__(self, func, types, args, kw):
                if func.__name__ not in LaunchCounter.FREE:
                    counter.add(func.__name__)
                return _counted(func(*_plain(args), **{k: _plain(v) for k, v in kw.items()}))

            def __setitem__(self, key, value):
                counter.add("copy into")
                super().__setitem__(key, value)

            def get(self):  # CuPy's copy to the host
                return np.array(self.view(np.ndarray))

            def astype(self, dtype, *args, **kw):
                if np.dtype(dtype) != self.dtype or kw.get("copy", True):
                    counter.add("astype")
                return super().astype(dtype, *args, **kw)

        def _plain(a):
            if isinstance(a, Counted):
                return a.view(np.ndarray)
            if isinstance(a, (list, tuple)):
                return type(a)(_plain(x) for x in a)
            return a

        def _counted(r):
            return r.view(Counted) if type(r) is np.ndarray else r

        self.array_type, self._counted = Counted, _counted

    def add(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def array_module(self, module):
        """What tinycnn.arrays takes for `cupy` so that its get_array_module answers `module` (the
        installed stand-in) for counted arrays and NumPy for the rest; to_numpy copies them back."""
        counted = self.array_type
        return types.SimpleNamespace(
            ndarray=counted,
            get_array_module=lambda *arrays: module if any(isinstance(a, counted) for a in arrays) else np)

    def total(self):
        return sum(self.counts.values())

    def install(self, module):
        for name in ("empty", "zeros", "ones", "asarray", "array", "zeros_like", "arange", "ascontiguousarray"):
            setattr(module, name, lambda *a, _f=getattr(np, name), **k: self._counted(_f(*a, **k)))

        def full(*a, **k):
            self.add("fill")
            return self._counted(np.full(*a, **k))

        module.full = full
        real = RawKernel.__call__
        counter = self

        class CountingModule(RawModule):
            def get_function(self, name):
                kernel = RawKernel(self._library, name)

                def launch(grid, block, args, **kw):
                    counter.add(name)
                    return real(kernel, grid, block, args, **kw)
                return launch

        module.RawModule = CountingModule


class Graph:
    """A captured graph, as far as NumPy can play one: NumPy ran the captured work while it was
    captured, so the launch that follows a capture does nothing, and each later launch runs the
    captured work again (which a static step makes the same every time: see test_static_step)."""

    def __init__(self, work):
        self.work, self.launches = work, 0

    def launch(self, stream=None):
        assert stream is None or isinstance(stream, Stream)
        if self.launches:
            self.work()
        self.launches += 1


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = 0


class Stream:
    """A CUDA stream for NumPy: a context that makes itself current, records events and captures.
    NumPy cannot record operations, so a test names the work a capture captures (`capture_body`:
    the step body that runs while it is open)."""

    current = []  # the stream stack; the legacy default stream at the bottom
    capture_body = None

    def __init__(self, null=False, non_blocking=False):
        self.null, self.capturing, self.waited = null, False, 0

    def __enter__(self):
        Stream.current.append(self)
        return self

    def __exit__(self, *exc):
        Stream.current.pop()
        return False

    def record(self, event=None):
        event = event or Event()
        event.recorded += 1
        return event

    def wait_event(self, event):
        assert isinstance(event, Event)
        self.waited += 1

    def begin_capture(self, mode=None):
        assert not self.null, "cannot capture on the default (legacy) stream"
        assert not self.capturing
        self.capturing = True

    def end_capture(self):
        assert self.capturing
        self.capturing = False
        return Graph(Stream.capture_body)


Stream.current.append(Stream(null=True))


class MemoryPool:
    def __init__(self):
        self.allocations = 0

    def malloc(self, size):
        self.allocations += 1


@contextlib.contextmanager
def using_allocator(allocator=None):
    yield


def fake_cupy(devices=1):
    """A stand-in `cupy` module: NumPy array functions, the RawModule above, and a CUDA runtime that
    reports `devices` GPUs."""
    module = types.ModuleType("cupy")
    module.RawModule = RawModule
    module.get_array_module = lambda *arrays: np  # for code that asks which module an array is of
    module.asnumpy = np.asarray
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: devices),
                                        Stream=Stream, Event=Event, MemoryPool=MemoryPool,
                                        using_allocator=using_allocator,
                                        get_current_stream=lambda: Stream.current[-1])
    module.__getattr__ = lambda name: getattr(np, name)  # every other array function: NumPy's (PEP 562)
    return module


@contextlib.contextmanager
def gpu_module(fake=None):
    """tinycnn.kernels.gpu imported under the stand-in CuPy `fake` (a new fake_cupy() by default);
    the real modules come back after the block."""
    saved = {name: sys.modules.get(name) for name in ("cupy", "tinycnn.kernels.gpu")}
    sys.modules["cupy"] = fake if fake is not None else fake_cupy()
    sys.modules.pop("tinycnn.kernels.gpu", None)
    try:
        yield importlib.import_module("tinycnn.kernels.gpu")
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


@contextlib.contextmanager
def gpu_backend(fake=None):
    """A Backend named "gpu" on the stand-in CuPy, with the GPU kernel set (see gpu_module)."""
    from tinycnn import config
    from tinycnn.backend import Backend

    fake = fake if fake is not None else fake_cupy()
    with gpu_module(fake) as gpu:
        yield Backend("gpu", fake, gpu.GPUKernels(), config.settings())
