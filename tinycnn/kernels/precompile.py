"""A first training run compiles the biggest CPU kernels in a second process, beside the rest.

numba compiles one kernel at a time (under a process-wide lock), on one core. A first Week2
training step on a machine compiles for about 20 s, and half of it is the direct convolution's
filter gradient (its generated register-blocked loops). So when a float32 training step with direct
convolutions starts compiling (compile_notice sees numba's compile event inside `training(helps)`,
and then asks helps()), `start_helper()` launches a Python process running
`cpu_conv.compile_filter_grad()` and `compile_input_grad_scatter()`: it compiles those kernels'
serial twins (what a split batch's shares run: tinycnn.kernels.serial_twin) for float32 into
numba's disk cache on the other core. The training step compiles everything else meanwhile, and
its first filter gradient or scatter waits for the helper (`wait_for_helper`) and then loads the
kernels from the cache instead of compiling them again. (A fresh process's first Week2 step with
an empty cache on a 2-core Zen 3 guest: 11.2 s with the scatter compiled in the step, 8.6-9.0 with
it in the helper; 7.3-7.7 before there was a scatter.) Nothing of this happens once the cache is
warm (no compile event), in inference alone, for float64 models or GEMM convolutions, or with one
usable core; a thread reaps the helper when it ends, whether or not anything waited for it.
"""
import contextlib
import os
import subprocess
import sys
import threading

import numpy as np

HELPER_ENV = "TINYCNN_PRECOMPILE_HELPER"  # set in the helper: it starts no helper itself
# The directory this tinycnn was imported from: the helper imports the same one, not whatever
# `tinycnn` its working directory (first on a `python -c` path) happens to hold.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HELPER_CODE = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
                "from tinycnn.kernels import cpu_conv; cpu_conv.compile_filter_grad(); "
                "cpu_conv.compile_input_grad_scatter()")
WAIT_SECONDS = 120  # the longest a first filter gradient waits before compiling it here anyway

_lock = threading.Lock()
_state = {"training": [], "helper": None, "started": False}


@contextlib.contextmanager
def training(helps):
    """Inside the block a compile event starts the helper if `helps()` says it would (a CPU training
    step whose convolutions run the float32 direct kernels: the helper compiles those). helps is
    asked only then, so a step with its kernels already compiled pays nothing for it."""
    with _lock:
        _state["training"].append(helps)
    try:
        yield
    finally:
        with _lock:
            _state["training"].remove(helps)


def _usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _wanted():
    return (not _state["started"] and not os.environ.get(HELPER_ENV) and not os.environ.get("NUMBA_DISABLE_JIT")
            and _usable_cpus() >= 2 and any(helps() for helps in _state["training"]))


def start_helper():
    """Launch the helper if a training step is compiling and none was launched in this process."""
    with _lock:
        if not _wanted():
            return
        _state["started"] = True
        try:
            helper = subprocess.Popen([sys.executable, "-c", _HELPER_CODE],
                                      env={**os.environ, HELPER_ENV: "1"}, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:  # no helper: this process compiles everything, as without one
            return
        _state["helper"] = helper
        threading.Thread(target=helper.wait, name="tinycnn-compile-helper", daemon=True).start()


def wait_for_helper(dtype):
    """Before a filter gradient or a scatter of `dtype` (a NumPy dtype): let a running helper finish
    writing numba's cache (it compiles float32). Every caller waits (the two shares of a split batch
    call at once). Without a helper it returns at once (no dtype name looked up: 2-3 us each, 8 a step)."""
    helper = _state["helper"]
    if helper is None or dtype != np.float32:
        return
    try:
        helper.wait(WAIT_SECONDS)  # Popen.wait may be called from several threads
    except subprocess.TimeoutExpired:
        pass  # compiled here, then; the helper's cache entry, when it comes, is the same code
    _state["helper"] = None

