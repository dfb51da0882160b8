"""Training callbacks, the list that calls them, and the Keras 2 progress bar.

Keras's callbacks are here with Keras 3's semantics: EarlyStopping, ModelCheckpoint, CSVLogger,
ReduceLROnPlateau, TerminateOnNaN, LambdaCallback and TensorBoard (through tensorboardX, an
optional extra).

`fit` runs [ProgbarLogger] + the user's callbacks + [History], in that order, as Keras 2
did; so `Epoch 1/20` is printed before a LearningRateScheduler's message, and the blank
line between them is the scheduler's leading newline, exactly as in the seed's log.

Batch logs are Keras 3's: the epoch's running mean of each metric so far. On the GPU they are
device scalars, converted (a host sync) only when something reads them, such as the progress
bar when it redraws.
"""
import collections
import csv
import math
import os
import sys
import time
import warnings

import numpy as np

from .arrays import to_numpy


class Callback:
    """Keras's callback hooks, all no-ops here. `self.model` is the model being trained; setting
    `self.model.stop_training = True` ends `fit` after the current batch. Under data-parallel
    training a callback runs on every rank, unless its `rank_zero_only` is True (those that print
    or write files: rank 0 alone runs them)."""

    rank_zero_only = False

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

    def on_test_batch_begin(self, batch, logs=None):
        pass

    def on_test_batch_end(self, batch, logs=None):
        pass

    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass

    def on_predict_batch_begin(self, batch, logs=None):
        pass

    def on_predict_batch_end(self, batch, logs=None):
        pass


def _overrides(callback, *hooks):
    """Whether `callback` implements one of `hooks` (as a method of its class or an attribute set on it)."""
    return any(getattr(getattr(callback, hook), "__func__", getattr(callback, hook)) is not getattr(Callback, hook)
               for hook in hooks)


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

    def on_batch(self, hook, batch, make_logs=dict):
        """A test or predict batch hook ("on_test_batch_end", ...), to the callbacks that implement it."""
        implementing = [cb for cb in self.callbacks if _overrides(cb, hook)]
        if implementing:
            logs = make_logs()
            for cb in implementing:
                getattr(cb, hook)(batch, logs)


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

    rank_zero_only = True

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


# -- Keras's callbacks ------------------------------------------------------------------------------------
class MonitorCallback(Callback):
    """What EarlyStopping, ModelCheckpoint and ReduceLROnPlateau share: a monitored log entry, a
    direction ("min", "max", or "auto": lower for losses, higher for the model's metrics, which
    are accuracies) and min_delta, the smallest change that counts as an improvement."""

    def __init__(self, monitor="val_loss", mode="auto", baseline=None, min_delta=0.0):
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{type(self).__name__} mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.best = monitor, mode, baseline
        self.min_delta = abs(float(min_delta))
        self.lower_is_better = None

    def _direction(self):
        if self.mode != "auto":
            return self.mode == "min"
        name = self.monitor[4:] if self.monitor.startswith("val_") else self.monitor
        if name == "loss":
            return True
        for metric in getattr(self.model, "metrics", []):
            if metric.name == name:
                return metric.direction != "up"
        raise ValueError(f"{type(self).__name__} cannot tell whether {self.monitor!r} should go up or down: "
                         "pass mode='max' or mode='min'")

    def is_improvement(self, value, reference):
        if self.lower_is_better is None:
            self.lower_is_better = self._direction()
        if reference is None:
            return True
        if self.lower_is_better:
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def monitored(self, logs):
        value = (logs or {}).get(self.monitor)
        if value is None:
            warnings.warn(f"{type(self).__name__} monitors {self.monitor!r}, which is not in the logs; they hold "
                          f"{', '.join(logs or {})}", stacklevel=3)
            return None
        return float(value)


class EarlyStopping(MonitorCallback):
    """Stop when the monitored quantity has not improved for `patience` epochs; with
    `restore_best_weights`, end with the weights of the best epoch (as Keras 3 does, even when
    training ran all its epochs)."""

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, verbose=0, mode="auto", baseline=None,
                 restore_best_weights=False, start_from_epoch=0):
        super().__init__(monitor, mode, None, min_delta)
        self.patience, self.verbose, self.baseline = int(patience), verbose, baseline
        self.restore_best_weights, self.start_from_epoch = bool(restore_best_weights), int(start_from_epoch)

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best, self.best_weights, self.best_epoch = 0, 0, None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        current = self.monitored(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


class ModelCheckpoint(MonitorCallback):
    """Save the model (a `.keras` file) or its weights (`.weights.h5` with save_weights_only, or
    tinycnn's `.npz`) after every epoch, or only when the monitored quantity improves
    (`save_best_only`). The path may hold `{epoch}` and any log entry: "ck-{epoch:02d}-{val_loss:.2f}.keras"."""

    rank_zero_only = True

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False, save_weights_only=False,
                 mode="auto", save_freq="epoch", initial_value_threshold=None):
        super().__init__(monitor, mode, initial_value_threshold)
        self.filepath, self.verbose = os.fspath(filepath), verbose
        self.save_best_only, self.save_weights_only = bool(save_best_only), bool(save_weights_only)
        if save_freq != "epoch":
            raise ValueError(f"ModelCheckpoint supports save_freq='epoch' only, got {save_freq!r}")
        if save_weights_only and not self.filepath.endswith((".weights.h5", ".npz")):
            raise ValueError("with save_weights_only=True the filepath must end in .weights.h5 (Keras's weights "
                             f"format) or .npz (tinycnn's), got {self.filepath!r}")
        if not save_weights_only and not self.filepath.endswith(".keras"):
            raise ValueError(f"the filepath must end in .keras (Keras's model format), got {self.filepath!r}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError) as exc:
            raise KeyError(f"ModelCheckpoint's filepath {self.filepath!r} names {exc}, which is not in the logs "
                           f"({', '.join(logs)})") from None
        if self.save_best_only:
            current = self.monitored(logs)
            if current is not None:
                best = "None" if self.best is None else f"{self.best:.5f}"
                if not self.is_improvement(current, self.best):
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
                    return
                if self.verbose > 0:
                    print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to {current:.5f}, "
                          f"saving model to {path}")
                self.best = current
        elif self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: saving model to {path}")
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)


class CSVLogger(Callback):
    """One CSV row per epoch: the epoch and every log entry (sorted, validation entries after)."""

    rank_zero_only = True

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.separator, self.append = os.fspath(filename), separator, bool(append)
        self.keys, self.writer, self.file = None, None, None

    def on_train_begin(self, logs=None):
        self.header = not (self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0)
        self.file = open(self.filename, "a" if self.append else "w", newline="")
        self.keys, self.writer = None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys += [f"val_{k}" for k in self.keys]
        if self.writer is None:
            dialect = type("Dialect", (csv.excel,), {"delimiter": self.separator})
            self.writer = csv.DictWriter(self.file, fieldnames=["epoch"] + self.keys, dialect=dialect)
            if self.header:
                self.writer.writeheader()
        row = collections.OrderedDict({"epoch": epoch})
        row.update((key, logs.get(key, "NA")) for key in self.keys)
        self.writer.writerow(row)
        self.file.flush()

    def on_train_end(self, logs=None):
        if self.file is not None and not self.file.closed:
            self.file.close()
        self.writer = None


class ReduceLROnPlateau(MonitorCallback):
    """Multiply the learning rate by `factor` when the monitored quantity has not improved for
    `patience` epochs (then wait `cooldown` epochs); never below `min_lr`. Logs "learning_rate"."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto", min_delta=1e-4, cooldown=0,
                 min_lr=0.0):
        super().__init__(monitor, mode, None, min_delta)
        if not 0 < float(factor) < 1.0:
            raise ValueError(f"ReduceLROnPlateau needs 0 < factor < 1, got {factor!r}")
        self.factor, self.patience, self.verbose = float(factor), int(patience), verbose
        self.cooldown, self.min_lr = int(cooldown), float(min_lr)

    def on_train_begin(self, logs=None):
        if callable(self.model.optimizer.learning_rate):  # checked now, not after epochs of work
            raise TypeError("ReduceLROnPlateau sets the optimizer's learning rate, but this optimizer follows a "
                            f"schedule ({type(self.model.optimizer.learning_rate).__name__}): use one or the other")
        self.best, self.cooldown_counter, self.wait = None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        if logs is not None:
            logs["learning_rate"] = optimizer.current_learning_rate()
        current = self.monitored(logs)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = optimizer.current_learning_rate()
                if old > np.float32(self.min_lr):
                    new = max(old * self.factor, self.min_lr)
                    optimizer.learning_rate = new
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class TerminateOnNaN(Callback):
    """Stop training at the first batch whose loss is NaN or infinite."""

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            print(f"Batch {batch}: Invalid loss, terminating training")
            self.model.stop_training = True


class LambdaCallback(Callback):
    """A callback from plain functions: LambdaCallback(on_epoch_end=lambda epoch, logs: ...)."""

    _HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
              "on_train_batch_end", "on_batch_begin", "on_batch_end", "on_test_begin", "on_test_end",
              "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
              "on_predict_batch_begin", "on_predict_batch_end")

    def __init__(self, **hooks):
        super().__init__()
        unknown = sorted(set(hooks) - set(self._HOOKS))
        if unknown:
            raise TypeError(f"LambdaCallback got unknown hook(s) {', '.join(unknown)}; it takes {', '.join(self._HOOKS)}")
        for name, function in hooks.items():
            if function is not None:
                setattr(self, name, function)


class TensorBoard(Callback):
    """Curves for the real TensorBoard: per-epoch scalars ("epoch_loss", "epoch_<metric>",
    "epoch_learning_rate") under log_dir/train and log_dir/validation as Keras 3 writes them,
    per-batch scalars with update_freq="batch" (or every N batches), and weight histograms every
    `histogram_freq` epochs. Written by tensorboardX (`pip install "tinycnn[tensorboard]"`)."""

    rank_zero_only = True

    def __init__(self, log_dir="logs", histogram_freq=0, update_freq="epoch", write_graph=False):
        super().__init__()
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError('the TensorBoard callback writes through tensorboardX: pip install "tinycnn[tensorboard]"'
                              ) from None
        if update_freq != "epoch" and update_freq != "batch" and not (isinstance(update_freq, int) and update_freq > 0):
            raise ValueError(f"update_freq must be 'epoch', 'batch' or a positive int, got {update_freq!r}")
        self.writer_class = SummaryWriter
        self.log_dir, self.histogram_freq, self.update_freq = os.fspath(log_dir), int(histogram_freq), update_freq
        self.writers = {}
        self.global_step = 0

    def _writer(self, name):
        if name not in self.writers:
            self.writers[name] = self.writer_class(os.path.join(self.log_dir, name))
        return self.writers[name]

    def on_train_begin(self, logs=None):
        self.global_step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        every = 1 if self.update_freq == "batch" else self.update_freq
        if self.update_freq != "epoch" and self.global_step % every == 0:
            writer = self._writer("train")
            for key, value in (logs or {}).items():
                writer.add_scalar(f"batch_{key}", float(value), self.global_step)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        train, validation = self._writer("train"), None
        train.add_scalar("epoch_learning_rate", self.model.optimizer.current_learning_rate(), epoch)
        for key, value in logs.items():
            if key == "seconds" or key == "lr":
                continue
            if key.startswith("val_"):
                validation = validation or self._writer("validation")
                validation.add_scalar(f"epoch_{key[4:]}", float(value), epoch)
            else:
                train.add_scalar(f"epoch_{key}", float(value), epoch)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            for layer in self.model.compute_layers:
                for name, weight in layer.weights.items():
                    train.add_histogram(f"{layer.name}/{name}", to_numpy(weight).astype(np.float64), epoch)
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
