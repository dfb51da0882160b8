"""Each parallel CPU kernel has a serial twin: the same Python function compiled without
`parallel=True`, which runs when the calling thread has one numba thread.

Why: a split training batch (tinycnn.batch_split) runs each share's kernels on one numba thread,
where a parallel kernel only pays for machinery it cannot use. numba lowers a parallel loop into
a gufunc with a scheduler, which more than doubles its compile time (a first Week2 step in a fresh
environment on a 2-core Zen 3, helper process off: 33.3 s with every kernel parallel, 14.1 s with
every kernel serial), and every call goes through the scheduler. The twin runs the same loops in
the same order (a parallel loop becomes a plain one), so it gives the same bits.

The twin is a copy of the function with its own qualified name (`<name>_serial`): numba's disk
cache keys an entry by the function's qualified name and signature but not by its `parallel`
flag, so the two must not share a name.
"""
import types

import numba
from numba import njit


def serial_twin(dispatcher):
    """A numba dispatcher for `dispatcher`'s Python function with its options but `parallel`,
    cached on disk as every tinycnn kernel is (`cache` is not among a dispatcher's options)."""
    fn = dispatcher.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    options = {name: value for name, value in dispatcher.targetoptions.items() if name not in ("parallel", "nopython")}
    return njit(cache=True, **options)(twin)


class ByThreadCount:
    """Calls `serial` when the calling thread has one numba thread (a share of a split batch,
    TINYCNN_NUMBA_THREADS=1, a one-core machine), else `parallel`."""

    def __init__(self, parallel, serial):
        self.parallel, self.serial = parallel, serial

    def __call__(self, *args):
        return (self.serial if numba.get_num_threads() == 1 else self.parallel)(*args)


def with_serial_twin(dispatcher, wrap=lambda kernel: kernel):
    """`dispatcher` (a parallel numba kernel) and its serial twin behind one callable; `wrap` is
    applied to each (cpu_conv compiles both with LLVM's SLP vectorizer on)."""
    return ByThreadCount(wrap(dispatcher), wrap(serial_twin(dispatcher)))
