"""The training loop: compile, fit, evaluate, predict, and the single steps they are made of.

`Trainer` is a base class of `tinycnn.Model` (as Keras 3 does it): the model holds structure and
weights, this module holds what trains and runs it. It relies on the model for `build()`, its
`backend` and `dtype`, its symbolic `inputs` and `outputs`, `compute_layers`, the parameter
buffer `params` and `plan(logits_output)`, the execution plan of its graph.

One training step (`train_step`) is: the plan's forward in training mode, keeping each step's
saved values on a tape; the loss and its gradient; the plan's backward into the flat gradient
buffer; one fused optimizer update. `fit` adds shuffling (a counter-based permutation per epoch,
so a resumed run replays it), batching, metrics kept on the device, validation and callbacks.
"""
import sys
import time

import numpy as np

from . import callbacks as callbacks_module
from . import losses as losses_module
from . import optimizers as optimizers_module
from .arrays import to_numpy
from .errors import ShapeError
from .randomness import derive_seed


class EpochMetrics:
    """Sums of loss and correct predictions, kept on the device; synced only when read."""

    def __init__(self, metric_names):
        self.metric_names = metric_names
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0

    def add(self, loss_sum, correct, n):
        self.loss_sum = self.loss_sum + loss_sum
        self.correct = self.correct + correct
        self.seen += n

    def averages(self, prefix=""):
        """Python floats (a host sync on the GPU)."""
        if not self.seen:
            return {}
        values = {prefix + "loss": float(self.loss_sum) / self.seen}
        if "acc" in self.metric_names:
            values[prefix + "acc"] = float(self.correct) / self.seen
        return values

    def running(self):
        """The same means as device scalars (no sync): Keras's batch logs."""
        values = {"loss": self.loss_sum / self.seen}
        if "acc" in self.metric_names:
            values["acc"] = self.correct / self.seen
        return values


class Trainer:
    """compile / fit / evaluate / predict and the steps they are made of (a base of Model)."""

    # Inference gives each sample the same result whatever the batch, so the CPU runs a large
    # requested batch as sub-batches small enough for their activations to stay in cache.
    CPU_INFERENCE_BATCH = 128

    def __init__(self):
        self.optimizer = None
        self.loss = None
        self.metric_names = []
        self.history = None
        self.stop_training = False
        self._optimizer_buffer = None  # the flat parameter array the optimizer's state was built for

    # -- compiling ------------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="categorical_crossentropy", metrics=None):
        if self.buildable():  # else (a Sequential with no input shape yet) the first data builds it
            self.build()
        if len(self.outputs) > 1:
            raise ValueError(f"training a model with {len(self.outputs)} outputs is not supported yet; "
                             "fit/evaluate need a single output")
        self.optimizer = optimizers_module.get(optimizer)
        self.loss = losses_module.get(loss)
        self.metric_names = []
        for metric in metrics or []:
            if metric not in ("accuracy", "acc"):
                raise ValueError(f"unknown metric {metric!r}: tinycnn supports 'accuracy'")
            self.metric_names.append("acc")
        self._optimizer_buffer = None
        if self.built:  # else the optimizer's state is made on the first step
            self.build_optimizer()

    def build_optimizer(self):
        """Make the optimizer's state for the model's parameter buffer, unless it already has it
        (a rebuilt model, after Sequential.add, gets fresh state)."""
        self.build()
        if self._optimizer_buffer is not self.params.params:
            self.optimizer.build(self.params.params, self.backend, owner=self)
            self._optimizer_buffer = self.params.params

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"call model.compile(...) before model.{what}(...)")

    def _loss_plan(self):
        return self.plan(logits_output=self.loss.fuses_softmax)

    # -- input checks -----------------------------------------------------------------------------
    def check_inputs(self, x, what="x"):
        """The model's input arrays, on its device in its dtype, after checking type, shape and
        values. `x` is an array, or a list of arrays for a model with several inputs."""
        items = list(x) if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape") else [x]
        if not self.built:  # a Sequential without an input shape takes it from the data
            self.build(None if self.buildable() else (None,) + tuple(np.shape(items[0])[1:]))
        if len(items) != len(self.inputs):
            raise ShapeError(f"the model has {len(self.inputs)} inputs; {what} gives {len(items)} arrays")
        arrays = []
        for k, (item, tensor) in enumerate(zip(items, self.inputs)):
            name = what if len(self.inputs) == 1 else f"{what}[{k}]"
            arrays.append(self._check_array(item, tensor.shape[1:], name))
        if len({a.shape[0] for a in arrays}) != 1:
            raise ShapeError(f"the arrays of {what} have different numbers of rows: {[a.shape[0] for a in arrays]}")
        return arrays

    def _check_array(self, x, expected, what):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        kind = np.dtype(x.dtype).kind
        if kind not in "fiu":
            raise TypeError(f"{what} must hold numbers (float or integer), got dtype {x.dtype}")
        if tuple(x.shape[1:]) != tuple(expected):
            hint = ""
            if tuple(x.shape[1:]) + (1,) == tuple(expected):
                hint = "; add the channel axis with x[..., None]"
            raise ShapeError(
                f"{what} has shape {tuple(x.shape)} but the model expects (batch, {', '.join(map(str, expected))}){hint}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty")
        x = self.backend.asarray(x, dtype=self.dtype)
        if kind == "f":
            bad = int((~self.xp.isfinite(x)).sum())
            if bad:
                raise ValueError(f"{what} contains {bad} NaN or infinite values")
        return x

    def check_targets(self, y, n, what="y"):
        """Targets as dense one-hot rows on the device, after checking shape and range."""
        if len(self.outputs[0].shape) != 2:
            raise ShapeError(f"{self.loss.name} needs a model output of shape (batch, classes); this model's is "
                             f"{self.outputs[0].shape}: add Flatten() or GlobalAveragePooling2D() before the last layer")
        classes = self.outputs[0].shape[-1]
        y = y if hasattr(y, "shape") else np.asarray(y)
        if y.shape[0] != n:
            raise ShapeError(f"{what} has {y.shape[0]} rows but x has {n}")
        if self.loss.sparse:
            if y.ndim == 2 and y.shape[1] == 1:
                y = y.reshape(-1)
            if y.ndim != 1 or np.dtype(y.dtype).kind not in "iuf":
                raise ShapeError(f"{what} must be integer class labels of shape ({n},) for {self.loss.name}, got {y.shape}")
            labels = self.backend.asarray(y)
            lo, hi = float(labels.min()), float(labels.max())
            if lo < 0 or hi >= classes or bool((labels != self.xp.floor(labels)).any()):
                raise ValueError(f"{what} has labels outside 0..{classes - 1} (found min {lo:g}, max {hi:g})")
            return self.loss.targets_to_dense(labels, classes).astype(self.dtype)
        if y.ndim != 2 or y.shape[1] != classes:
            hint = " (integer labels? one-hot encode them, or use loss='sparse_categorical_crossentropy')" if y.ndim == 1 else ""
            raise ShapeError(f"{what} must have shape ({n}, {classes}) for {self.loss.name}, got {tuple(y.shape)}{hint}")
        y = self.backend.asarray(y, dtype=self.dtype)
        if not bool(self.xp.isfinite(y).all()):
            raise ValueError(f"{what} contains NaN or infinite values")
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise ValueError(f"{what} must hold probabilities in [0, 1] (one-hot rows); found values outside")
        return y

    # -- the steps -----------------------------------------------------------------------------------
    def forward_backward(self, inputs, targets):
        """Forward in training mode, the loss, and backward into the flat gradient buffer
        (`self.params.grads`), on checked device arrays. Returns (probabilities, per-sample loss)."""
        self.params.bind()  # take back weights of shared layers that another model trained meanwhile
        plan = self._loss_plan()
        (out,), tape = plan.forward(inputs, training=True, keep_for_backward=True)
        probs, per_sample, dout = self.loss.compute(out, targets, plan.emits_logits, self.backend.kernels)
        dout *= dout.dtype.type(1.0 / targets.shape[0])  # the loss is the batch mean
        plan.backward(tape, [dout], self.params)
        return probs, per_sample

    def train_step(self, inputs, targets):
        """One optimizer step on checked device arrays (a list of input arrays, dense targets):
        what `fit` runs per batch. Returns (probabilities, per-sample loss) as device arrays."""
        self.build_optimizer()
        probs, per_sample = self.forward_backward(inputs, targets)
        self.optimizer.apply(self.params.params, self.params.grads)
        return probs, per_sample

    def train_on_batch(self, x, y):
        """One optimizer step on one batch; returns [loss, acc] like Keras."""
        self._require_compiled("train_on_batch")
        xs = self.check_inputs(x)
        tb = self.check_targets(y, xs[0].shape[0])
        probs, per_sample = self.train_step(xs, tb)
        return [float(per_sample.mean())] + (
            [float(losses_module.count_correct(probs, tb)) / tb.shape[0]] if self.metric_names else []
        )

    def loss_and_gradients(self, x, y):
        """Mean loss in training mode and the gradient of every trainable weight (NumPy, in the
        order of `trainable_weights`). No optimizer step; used by gradient checks and parity tests."""
        self._require_compiled("loss_and_gradients")
        xs = self.check_inputs(x)
        tb = self.check_targets(y, xs[0].shape[0])
        _, per_sample = self.forward_backward(xs, tb)
        return float(per_sample.mean()), [to_numpy(g).copy() for g in self.params.grad_views]

    def seed_random_streams(self, epoch):
        """Restart every layer's random stream (Dropout masks) as at the start of `epoch`, from the
        model's seed (or a layer's own); returns the epoch's shuffling seed. A resumed run replays
        its epochs exactly because of this."""
        for i, layer in enumerate(self.compute_layers):
            base = getattr(layer, "seed", None)
            layer.reseed(derive_seed(self.seed if base is None else base, 1, epoch, i))
        return derive_seed(self.seed, 2, epoch)

    # -- fit ---------------------------------------------------------------------------------------------
    def fit(self, x, y, batch_size=32, epochs=1, verbose=1, callbacks=None, validation_data=None,
            shuffle=True, initial_epoch=0):
        self._require_compiled("fit")
        if int(batch_size) < 1 or int(epochs) < 0:
            raise ValueError("batch_size must be >= 1 and epochs >= 0")
        batch_size = int(batch_size)
        xs = self.check_inputs(x)
        n = xs[0].shape[0]
        t = self.check_targets(y, n)
        val = None
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            xv = self.check_inputs(validation_data[0], "validation x")
            val = (xv, self.check_targets(validation_data[1], xv[0].shape[0], "validation y"))

        history = callbacks_module.History()
        metric_names = ["loss"] + self.metric_names
        shown = metric_names + (["val_" + m for m in metric_names] if val else [])
        cbs = callbacks_module.CallbackList(
            ([callbacks_module.ProgbarLogger(verbose)] if verbose else []) + list(callbacks or []) + [history],
            self, {"epochs": epochs, "samples": n, "batch_size": batch_size, "verbose": verbose, "metrics": shown,
                   "do_validation": val is not None})
        if verbose and val is not None:
            sys.stdout.write("Train on %d samples, validate on %d samples\n" % (n, val[0][0].shape[0]))
        self.stop_training = False
        cbs.call("on_train_begin", {})
        for epoch in range(initial_epoch, epochs):
            shuffle_seed = self.seed_random_streams(epoch)
            order = self.backend.permutation(n, shuffle_seed) if shuffle else self.xp.arange(n)
            cbs.call("on_epoch_begin", epoch, {})
            metrics = EpochMetrics(self.metric_names)
            started = time.perf_counter()
            for batch, start in enumerate(range(0, n, batch_size)):
                cbs.on_train_batch_begin(batch)
                idx = order[start : start + batch_size]
                tb = t[idx]
                probs, per_sample = self.train_step([a[idx] for a in xs], tb)
                metrics.add(per_sample.sum(), losses_module.count_correct(probs, tb), tb.shape[0])
                cbs.on_train_batch_end(batch, metrics.running)
                if self.stop_training:
                    break
            logs = metrics.averages()
            if not np.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1}: the loss is {logs['loss']} "
                    "(lower the learning rate, or check the inputs' scale)"
                )
            logs["seconds"] = time.perf_counter() - started
            if val is not None:
                logs.update(self._evaluate_arrays(val[0], val[1], batch_size).averages("val_"))
            cbs.call("on_epoch_end", epoch, logs)
            if self.stop_training:
                break
        cbs.call("on_train_end", {})
        self.history = history
        return history

    # -- evaluate / predict ---------------------------------------------------------------------------------
    def _inference_batches(self, n, batch_size):
        if self.backend.name == "cpu":
            batch_size = min(batch_size, self.CPU_INFERENCE_BATCH)
        return range(0, n, batch_size), batch_size

    def _evaluate_arrays(self, xs, t, batch_size):
        plan = self._loss_plan()
        metrics = EpochMetrics(self.metric_names)
        starts, batch_size = self._inference_batches(t.shape[0], batch_size)
        for start in starts:
            tb = t[start : start + batch_size]
            (out,), _ = plan.forward([a[start : start + batch_size] for a in xs], training=False,
                                     keep_for_backward=False)
            probs, per_sample, _ = self.loss.compute(out, tb, plan.emits_logits, self.backend.kernels)
            metrics.add(per_sample.sum(), losses_module.count_correct(probs, tb), tb.shape[0])
        return metrics

    def evaluate(self, x, y, batch_size=32, verbose=1):
        """[loss, acc] in inference mode, like Keras."""
        self._require_compiled("evaluate")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        xs = self.check_inputs(x)
        t = self.check_targets(y, xs[0].shape[0])
        bar = callbacks_module.Progbar(t.shape[0], verbose=verbose) if verbose else None
        values = self._evaluate_arrays(xs, t, int(batch_size)).averages()
        if bar is not None:
            bar.update(t.shape[0], lambda: values, finalize=True)
        return [values["loss"]] + ([values["acc"]] if "acc" in values else [])

    def predict(self, x, batch_size=32, verbose=0):
        """Outputs in inference mode as NumPy arrays (a list for a model with several outputs)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        xs = self.check_inputs(x)
        n = xs[0].shape[0]
        plan = self.plan(logits_output=False)
        outs = [[] for _ in self.outputs]
        starts, batch_size = self._inference_batches(n, int(batch_size))
        bar = callbacks_module.Progbar(n, verbose=verbose) if verbose else None
        for start in starts:
            results, _ = plan.forward([a[start : start + batch_size] for a in xs], training=False,
                                      keep_for_backward=False)
            for collected, out in zip(outs, results):
                collected.append(to_numpy(out))
        if bar is not None:
            bar.update(n, lambda: {}, finalize=True)
        joined = [np.concatenate(parts) for parts in outs]
        return joined[0] if self.single_output else joined
