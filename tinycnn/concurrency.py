"""One call at a time per model: a model's calls share its weights, its optimizer state and its
kernels' scratch buffers, so two threads running it at once (predict while fit trains) would
silently corrupt both. `exclusive` makes such a second call fail at once with a clear error.

The same thread may nest calls (a callback that calls `model.predict` inside `fit`); another
thread gets a RuntimeError naming what the model is busy with. Copy the model (save and load it)
to serve predictions while it trains.

The guard is per model: two models that share a layer are two models to it, and running them in
two threads at once is not detected (their shared weights would then be updated concurrently).
"""
import functools
import threading

from .errors import ModelBusyError

__all__ = ["exclusive"]

_LOCK = threading.Lock()  # guards the owner records of every model (held for microseconds)


def exclusive(method):
    """Decorate a model method: refused while another thread runs one of the model's methods."""
    what = method.__name__

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        me = threading.get_ident()
        with _LOCK:
            owner = self.__dict__.get("_busy_owner")
            if owner is not None and owner[0] != me:
                raise ModelBusyError(f"model {getattr(self, 'name', '?')!r} is running {owner[1]}() in another thread, "
                                     f"so {what}() was refused: a model runs one call at a time (give each thread "
                                     "its own model, e.g. a saved and reloaded copy)")
            self.__dict__["_busy_owner"] = (me, owner[1], owner[2] + 1) if owner else (me, what, 1)
        try:
            return method(self, *args, **kwargs)
        finally:
            with _LOCK:
                _, first, depth = self.__dict__["_busy_owner"]
                self.__dict__["_busy_owner"] = (me, first, depth - 1) if depth > 1 else None

    return guarded
