"""CuPy's ElementwiseKernel on the CPU, for tests on machines without a GPU.

A kernel's CUDA body is compiled by the host C++ compiler inside a loop that plays every thread
index i in turn: each non-raw array parameter is read into a local before the body (CuPy's
elementwise access), each non-raw output is written back after it, `raw` parameters are
pointers, scalars are passed by value. `fake_cupy()` is a stand-in `cupy` module (NumPy for the
array functions, this class for ElementwiseKernel) under which `tinycnn.kernels.gpu` imports and
its GPUKernels runs on NumPy arrays: the kernels' own source, called the way the backend calls
them. Compiled with -ffp-contract=off: the reference kernels do not fuse multiply-adds either
(NVRTC does by default, which may move a GPU's results by an ulp; tests on a GPU allow that).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import types

import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")

_TYPES = {  # CuPy parameter type -> (C++ type, NumPy dtype)
    "float32": ("float", np.float32), "float64": ("double", np.float64), "int32": ("int", np.int32),
    "int64": ("long long", np.int64), "uint8": ("unsigned char", np.uint8), "uint32": ("unsigned int", np.uint32),
    "uint64": ("unsigned long long", np.uint64),
}
_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
           np.uint8: ctypes.c_ubyte, np.uint32: ctypes.c_uint, np.uint64: ctypes.c_ulonglong}
_BUILD = os.path.join(tempfile.gettempdir(), f"tinycnn-cuda-shim-{os.getuid()}")


def _parse(params):
    """'raw T x, int32 h' -> [(raw, type, name), ...]"""
    out = []
    for part in params.split(","):
        words = part.split()
        raw = words[0] == "raw"
        typ, name = words[1:] if raw else words
        out.append((raw, typ, name))
    return out


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name, **_):
        self.in_params, self.out_params, self.operation, self.name = in_params, out_params, operation, name
        self.inputs, self.outputs = _parse(in_params), _parse(out_params)
        self._libraries = {}

    def mutated(self, old, new):
        """This kernel with `old` replaced by `new` in its body (to show that a test catches a bug)."""
        assert old in self.operation, f"{old!r} is not in {self.name}'s body"
        return ElementwiseKernel(self.in_params, self.out_params, self.operation.replace(old, new), self.name)

    def __call__(self, *args):
        params = self.inputs + self.outputs
        args = list(args)
        t_dtype = next(np.asarray(a).dtype for a, (_, typ, _) in zip(args, params) if typ == "T")
        if len(args) == len(self.inputs):  # CuPy allocates the outputs, shaped as the array inputs
            shape = next(np.shape(a) for a, (raw, _, _) in zip(args, self.inputs) if not raw and np.ndim(a))
            args += [np.empty(shape, dtype=t_dtype if typ == "T" else _TYPES[typ][1]) for _, typ, _ in self.outputs]
        assert len(args) == len(params), f"{self.name}: {len(args)} arguments for {len(params)} parameters"
        arrays = [raw or np.ndim(a) > 0 for a, (raw, _, _) in zip(args, params)]
        size = next(np.size(a) for a, (raw, _, _), is_array in zip(args, params, arrays) if is_array and not raw)
        function = self._library(np.dtype(t_dtype), tuple(arrays))
        c_args = [ctypes.c_ssize_t(size)]
        for a, (raw, typ, name), is_array in zip(args, params, arrays):
            dtype = np.dtype(t_dtype if typ == "T" else _TYPES[typ][1])
            if is_array:
                assert isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous, \
                    f"{self.name}: {name} must be a C-contiguous {dtype} array"
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:
                c_args.append(_CTYPES[dtype.type](dtype.type(a)))
        function(*c_args)
        outs = args[len(self.inputs):]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def source(self, t_dtype, arrays):
        """The C++ translation unit: run(n, params...) plays threads 0..n-1."""
        t_name = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(t_dtype)]
        decls, before, after = ["ptrdiff_t n"], [], []
        for k, ((raw, typ, name), is_array) in enumerate(zip(self.inputs + self.outputs, arrays)):
            ctype = "T" if typ == "T" else _TYPES[typ][0]
            output = k >= len(self.inputs)
            if raw:
                decls.append(f"{'' if output else 'const '}{ctype}* {name}")
            elif is_array:
                decls.append(f"{ctype}* {name}_")
                before.append(f"{'' if output else 'const '}{ctype} {name} = {name}_[i];")
                if output:
                    before[-1] = f"{ctype} {name} = {name}_[i];"
                    after.append(f"{name}_[i] = {name};")
            else:
                decls.append(f"const {ctype} {name}")
        return "\n".join([
            "#include <algorithm>", "#include <cmath>", "#include <cstddef>",
            "using std::max; using std::min; using std::sqrt;",
            f"typedef {t_name} T;",
            f'extern "C" void run({", ".join(decls)}) {{',
            "    for (ptrdiff_t i = 0; i < n; ++i) {",
            *["        " + line for line in before],
            "        {", self.operation + ";", "        }",  # CuPy ends the operation with ';' too
            *["        " + line for line in after],
            "    }", "}", ""])

    def _library(self, t_dtype, arrays):
        key = (t_dtype, arrays)
        if key not in self._libraries:
            text = self.source(t_dtype, arrays)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            os.makedirs(_BUILD, exist_ok=True)
            src, lib = (os.path.join(_BUILD, f"{self.name}-{digest}{ext}") for ext in (".cpp", ".so"))
            if not os.path.exists(lib):
                with open(src, "w") as f:
                    f.write(text)
                tmp = f"{lib}.{os.getpid()}"
                proc = subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-o", tmp, src],
                                      capture_output=True, text=True)
                assert proc.returncode == 0, f"{self.name} does not compile as C++:\n{proc.stderr}\n{text}"
                os.replace(tmp, lib)
            function = ctypes.CDLL(lib).run
            function.restype = None
            self._libraries[key] = function
        return self._libraries[key]


def fake_cupy():
    """A stand-in `cupy` module: NumPy array functions and the ElementwiseKernel above."""
    module = types.ModuleType("cupy")
    module.ElementwiseKernel = ElementwiseKernel
    module.get_array_module = lambda *arrays: np  # for code that asks which module an array is of
    for name in ("empty", "empty_like", "zeros", "ascontiguousarray", "uint8", "uint32", "uint64", "int32", "int64",
                 "float32", "float64"):
        setattr(module, name, getattr(np, name))
    return module
