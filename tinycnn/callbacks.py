"""Training callbacks, the list that calls them, and the Keras 2 progress bar.

`fit` runs [ProgbarLogger] + the user's callbacks + [History], in that order, as Keras 2
did; so `Epoch 1/20` is printed before a LearningRateScheduler's message, and the blank
line between them is the scheduler's leading newline, exactly as in the seed's log.

Batch logs are Keras 3's: the epoch's running mean of each metric so far. On the GPU they are
device scalars, converted (a host sync) only when something reads them, such as the progress
bar when it redraws.
"""
import math
import sys
import time


class Callback:
    """Keras's callback hooks, all no-ops here. `self.model` is the model being trained; setting
    `self.model.stop_training = True` ends `fit` after the current batch."""

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)

    def on_batch_begin(self, batch, logs=None):
        """Keras 2's name for on_train_batch_begin (called by it)."""

    def on_batch_end(self, batch, logs=None):
        """Keras 2's name for on_train_batch_end (called by it)."""

    def on_test_begin(self, logs=None):
        pass

    def on_test_end(self, logs=None):
        pass

    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass


def _overrides(callback, *hooks):
    return any(getattr(type(callback), hook) is not getattr(Callback, hook) for hook in hooks)


class CallbackList:
    """Calls a hook on every callback in order. Batch hooks go only to callbacks that implement
    them, so a fit without such callbacks builds no per-batch logs."""

    def __init__(self, callbacks, model, params):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)
        self.batch_begin = [cb for cb in self.callbacks if _overrides(cb, "on_train_batch_begin", "on_batch_begin")]
        self.batch_end = [cb for cb in self.callbacks if _overrides(cb, "on_train_batch_end", "on_batch_end")]

    def call(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_train_batch_begin(self, batch):
        for cb in self.batch_begin:
            cb.on_train_batch_begin(batch, {})

    def on_train_batch_end(self, batch, make_logs):
        """`make_logs()` builds Keras's batch logs (the epoch's running metrics); called only if needed."""
        if self.batch_end:
            logs = make_logs()
            for cb in self.batch_end:
                cb.on_train_batch_end(batch, logs)


class History(Callback):
    """Per-epoch metrics: `history.history['val_acc'][-1]` is the last epoch's validation accuracy."""

    def on_train_begin(self, logs=None):
        self.epoch = getattr(self, "epoch", [])
        self.history = getattr(self, "history", {})

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)


class LearningRateScheduler(Callback):
    """Sets the optimizer's learning rate to `schedule(epoch)` (or `schedule(epoch, lr)`) at each epoch start."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        current = optimizer.current_learning_rate()
        try:
            lr = self.schedule(epoch, current)
        except TypeError:
            lr = self.schedule(epoch)
        if not isinstance(lr, (float, int)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"the learning-rate schedule returned {lr!r} for epoch {epoch}; expected a positive float")
        optimizer.learning_rate = lr
        if self.verbose > 0:
            # '%s' of a float is its repr: 0.002274450341167551, as the seed's log reads.
            sys.stdout.write("\nEpoch %05d: LearningRateScheduler setting learning rate to %s.\n" % (epoch + 1, lr))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = self.model.optimizer.current_learning_rate()


def format_metrics(values):
    """' - loss: 0.4498 - acc: 0.8983': 4 decimals, or 4-digit exponent form for tiny values (Keras 2)."""
    out = ""
    for key, value in values.items():
        out += " - %s:" % key
        out += " %.4f" % value if abs(value) > 1e-3 else " %.4e" % value
    return out


class Progbar:
    """The Keras 2 progress bar: `60000/60000 [=====...] - 14s 230us/step - loss: ...`.

    On a terminal the bar is redrawn in place (at most every `interval` seconds); otherwise
    only the finished line is written, once per epoch, so logs stay readable."""

    def __init__(self, target, width=30, verbose=1, interval=0.05, stream=None, dynamic=None):
        self.target, self.width, self.verbose, self.interval = target, width, verbose, interval
        self.stream = stream
        out = self._out()
        self.dynamic = dynamic if dynamic is not None else bool(getattr(out, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._prev_width = 0

    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def update(self, current, values_fn, finalize=False):
        """Draw progress `current`; `values_fn()` returns the metrics (called only when drawing)."""
        now = time.perf_counter()
        if not finalize and (self.verbose != 1 or not self.dynamic or now - self._last_draw < self.interval):
            return
        self._last_draw = now
        values = values_fn()
        elapsed = now - self._start
        if self.verbose == 2:
            if finalize:
                self._out().write(" - %.0fs%s\n" % (elapsed, format_metrics(values)))
            return
        line = self._bar(current)
        per_unit = elapsed / current if current else 0.0
        if finalize:
            line += " - %.0fs" % elapsed
            if per_unit >= 1:
                line += " %.0fs/step" % per_unit
            elif per_unit >= 1e-3:
                line += " %.0fms/step" % (per_unit * 1e3)
            else:
                line += " %.0fus/step" % (per_unit * 1e6)
        else:
            eta = per_unit * (self.target - current)
            if eta > 3600:
                eta_text = "%d:%02d:%02d" % (eta // 3600, (eta % 3600) // 60, eta % 60)
            elif eta > 60:
                eta_text = "%d:%02d" % (eta // 60, eta % 60)
            else:
                eta_text = "%ds" % eta
            line += " - ETA: %s" % eta_text
        line += format_metrics(values)
        out = self._out()
        if self.dynamic:
            previous = self._prev_width
            self._prev_width = len(line)
            line += " " * max(previous - len(line), 0)  # blank what a longer previous line left
            out.write("\b" * previous + "\r" + line)
        else:
            out.write(line)
        if finalize:
            out.write("\n")
        out.flush()

    def _bar(self, current):
        digits = int(math.floor(math.log10(self.target))) + 1 if self.target > 0 else 1
        bar = "%*d/%d [" % (digits, current, self.target)
        filled = int(self.width * current / self.target) if self.target else self.width
        if filled > 0:
            bar += "=" * (filled - 1) + (">" if current < self.target else "=")
        return bar + "." * (self.width - filled) + "]"


class ProgbarLogger(Callback):
    """Prints `Epoch i/n` and the progress bar for each epoch (verbose 1), or one line (verbose 2)."""

    def __init__(self, verbose=1):
        super().__init__()
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        sys.stdout.write("Epoch %d/%d\n" % (epoch + 1, self.params["epochs"]))
        sys.stdout.flush()
        self.progbar = Progbar(self.params["samples"], verbose=self.verbose)

    def on_train_batch_end(self, batch, logs=None):
        seen = min((batch + 1) * self.params["batch_size"], self.params["samples"])
        if seen < self.params["samples"]:
            self.progbar.update(seen, lambda: {k: float(v) for k, v in logs.items()})

    def on_epoch_end(self, epoch, logs=None):
        shown = {k: v for k, v in logs.items() if k in self.params["metrics"]}
        self.progbar.update(self.params["samples"], lambda: shown, finalize=True)
