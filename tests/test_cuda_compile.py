"""Every CUDA kernel the GPU set can launch compiles with NVRTC for sm_80 and sm_90 (issue 13, part
2a), without a GPU: NVRTC is a compiler library and needs no device or driver. The source and
options are the ones GPUKernels hands CuPy's RawModule (tinycnn/kernels/cuda_source.py), with
what RawModule adds to them; NVRTC comes from the `nvidia-cuda-nvrtc` wheel of the test install,
called through ctypes."""
import ctypes
import glob
import os

import numpy as np
import pytest

from tinycnn.kernels import cuda_source


def _find_nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (CUDA 13 or 12 layout), else CUDA_HOME's, else None."""
    try:
        import nvidia

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    patterns = [os.path.join(r, sub, "lib", "libnvrtc.so*") for r in roots for sub in ("cu13", "cuda_nvrtc")]
    patterns.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64", "libnvrtc.so*"))
    for pattern in patterns:
        found = sorted(p for p in glob.glob(pattern) if "builtins" not in p and "alt" not in p)
        if found:
            return found[0]
    return None


NVRTC_PATH = _find_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC_PATH is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")


def nvrtc_compile(source, options, name="tinycnn.cu"):
    """(status, log, cubin bytes) of NVRTC compiling `source` with `options`."""
    lib = ctypes.CDLL(NVRTC_PATH)
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    assert status == 0, f"nvrtcCreateProgram: {status}"
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        cubin = b""
        if status == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            assert lib.nvrtcGetCUBIN(prog, buffer) == 0
            cubin = buffer.raw
        return status, log.value.decode(errors="replace"), cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cupy_options(arch):
    """The options CuPy 14's RawModule compiles our source with, on a GPU of compute capability `arch`."""
    return [*cuda_source.NVRTC_OPTIONS, *cuda_source.CUPY_ADDED_OPTIONS, f"-arch={arch}"]


def nvrtc_version():
    lib = ctypes.CDLL(NVRTC_PATH)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wide", [False, True], ids=["int-index", "64-bit-index"])
def test_every_kernel_compiles_with_nvrtc(arch, dtype, wide):
    status, log, cubin = nvrtc_compile(cuda_source.module_source(dtype, wide), cupy_options(arch))
    assert status == 0, f"NVRTC {nvrtc_version()} failed for {arch}:\n{log}"
    assert "warning" not in log.lower(), log
    assert cubin[:4] == b"\x7fELF"
    for name in cuda_source.KERNELS:  # extern "C": each kernel is in the cubin under its own name
        assert name.encode() + b"\x00" in cubin, f"{name} is missing from the {arch} cubin"


def test_nvrtc_rejects_a_broken_kernel():
    """The test above would fail on a kernel that does not compile (here: an undeclared name)."""
    broken = cuda_source.module_source(np.float32, False).replace("cols[i] = (y >= 0", "cols[i] = (yy >= 0")
    status, log, _ = nvrtc_compile(broken, cupy_options("sm_90"))
    assert status != 0 and "yy" in log
