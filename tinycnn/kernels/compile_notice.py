"""One line on stderr when numba starts compiling tinycnn's CPU kernels, so that a first run's
long pause (about 9 s for a Week2 training step on a 2-core Zen 3 guest, with
tinycnn.kernels.precompile's helper; the generated convolution loops are large) is explained
while it happens instead of looking like a hang.

numba announces a compilation through its event API ("numba:compile", raised on a cache miss
only, before compiling); loading a kernel from numba's disk cache raises nothing, so later runs
print nothing. The notice is shown once per process.
"""
import sys
import threading

from numba.core import event

from . import precompile

MESSAGE = ("tinycnn: compiling the CPU kernels for this machine (the first run only; numba caches them, and later "
           "runs load them in under a second; `python -m tinycnn.precompile` compiles them all ahead)")

_lock = threading.Lock()
_installed = False
_shown = False


class _Notice(event.Listener):
    def on_start(self, ev):
        global _shown
        dispatcher = (ev.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if not module.startswith("tinycnn."):
            return
        precompile.start_helper()  # a training step's compile: the biggest kernel on the other core
        if _shown:
            return
        with _lock:
            if _shown:
                return
            _shown = True
        print(MESSAGE, file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


def install():
    """Listen for numba's compile events (once per process)."""
    global _installed
    with _lock:
        if not _installed:
            event.register("numba:compile", _Notice())
            _installed = True
