"""OpenBLAS's thread count, for the parts of a step that already use every core another way.

Why: a split batch (tinycnn.batch_split, tinycnn.share_process) runs one share per core. A GEMM
inside a share (a wide convolution, a Dense layer) would otherwise start OpenBLAS's own threads
on every core as well, and the shares' threads and OpenBLAS's take turns on the cores: the
VGG-style network of benchmarks/vgg_scaling.py at W = 64, batch 64, with its wide convolutions as
GEMMs, took 1305 ms per step that way against 550-580 ms with one OpenBLAS thread per share (2-core
Zen 3 guest, fit's steady state; numbers in benchmarks/results/cpu_round2.md).

How: NumPy's OpenBLAS (its wheels bundle one, with prefixed and suffixed names) exports
`openblas_set_num_threads`; it is found among the libraries this process has mapped and called
through ctypes. The count is process-wide, so only code that owns the whole process for the
block sets it (batch_split.run around all its shares, the share process's parent around its
step, the worker once). Where no OpenBLAS is found (another BLAS, or not Linux) nothing changes.
"""
import contextlib
import ctypes
import functools

_NAMES = [(prefix + "openblas_", suffix) for prefix in ("scipy_", "") for suffix in ("64_", "")]


@functools.lru_cache(maxsize=1)
def _functions():
    """(get, set) of the OpenBLAS NumPy uses, or None."""
    import numpy  # noqa: F401  (loads its BLAS)

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in _NAMES:
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


def count():
    """OpenBLAS's thread count now, or None where it cannot be read."""
    functions = _functions()
    return None if functions is None else int(functions[0]())


def set_count(threads):
    """Set OpenBLAS's thread count for the whole process (a no-op without OpenBLAS)."""
    functions = _functions()
    if functions is not None:
        functions[1](int(threads))


@contextlib.contextmanager
def limited(threads):
    """At most `threads` OpenBLAS threads inside the block, the previous count after it (a count
    for the whole process: blocks in two threads at once would restore each other's)."""
    saved = count()
    lowered = saved is not None and saved > threads
    if lowered:
        set_count(threads)
    try:
        yield
    finally:
        if lowered:
            set_count(saved)
