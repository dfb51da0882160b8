"""`Sequential`: a Keras-shaped model that owns the training loop.

Built once for its input shape: every trainable weight then becomes a view into one flat
parameter buffer and every gradient a view into one flat gradient buffer, so the optimizer
runs one fused update per step. When the model ends in a softmax and the loss is a
cross-entropy, the model fuses the two (the last layer emits logits during training).
"""
import collections
import sys
import time

import numpy as np

from . import callbacks as callbacks_module
from . import losses as losses_module
from . import optimizers as optimizers_module
from . import saving
from .activations import softmax
from .backend import get_backend, to_numpy
from .layers import BatchNormalization, Dropout, Layer, ShapeError

_model_counts = collections.Counter()


def derive_seed(*parts):
    """A 31-bit seed from a tuple of ints: independent streams per (model seed, epoch, layer)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class _EpochMetrics:
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
        if not self.seen:
            return {}
        values = {prefix + "loss": float(self.loss_sum) / self.seen}
        if "acc" in self.metric_names:
            values[prefix + "acc"] = float(self.correct) / self.seen
        return values


class Sequential:
    """A linear stack of layers on one device ('cpu', 'gpu' or 'auto')."""

    def __init__(self, layers=None, device=None, name=None, dtype="float32", seed=None, fuse=True):
        if name is None:
            _model_counts["sequential"] += 1
            name = f"sequential_{_model_counts['sequential']}"
        self.name = name
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"models compute in float32 or float64, not {self.dtype}")
        # Without a seed, draw one now: the model is still reproducible from `model.seed`.
        self.seed = int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF) if seed is None else int(seed)
        self.fuse = bool(fuse)  # let a BatchNormalization apply the Dropout after it (same masks)
        self.layers = []
        self.built = False
        self.optimizer = None
        self.loss = None
        self.metric_names = []
        self._fused_softmax = False  # set by compile when the last layer's softmax joins the loss
        self.history = None
        for layer in layers or []:
            self.add(layer)

    # -- structure ------------------------------------------------------------------------
    def add(self, layer):
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add expects a tinycnn layer, got {type(layer).__name__}")
        if self.built:
            raise RuntimeError("cannot add layers to a model that is already built")
        self.layers.append(layer)

    @property
    def input_shape(self):
        return self.layers[0].input_shape if self.layers else None

    @property
    def output_shape(self):
        return self.layers[-1].output_shape if self.built else None

    def build(self, input_shape=None):
        """Build every layer in turn; then gather trainable weights into flat buffers."""
        if self.built:
            return
        if not self.layers:
            raise ValueError("the model has no layers")
        shape = input_shape or self.layers[0].input_shape
        if shape is None:
            raise ValueError("the first layer needs input_shape=(...) (or call model.build(input_shape))")
        for i, layer in enumerate(self.layers):
            shape = layer.build(shape, self.backend, self.dtype, seed=derive_seed(self.seed, 0, i))
        self.layers[0].needs_input_grad = False  # nothing upstream needs it
        if self.fuse:
            for layer, after in zip(self.layers, self.layers[1:]):
                if isinstance(layer, BatchNormalization) and isinstance(after, Dropout):
                    layer.fuse_dropout(after)
        self._bind_flat_buffers()
        self.built = True

    def _bind_flat_buffers(self):
        entries = [(layer, name) for layer in self.layers for name in layer.trainable_names]
        total = sum(layer.weights[name].size for layer, name in entries)
        self._flat_params = self.xp.empty(total, dtype=self.dtype)
        self._flat_grads = self.xp.zeros(total, dtype=self.dtype)
        offset = 0
        for layer, name in entries:
            w = layer.weights[name]
            view = self._flat_params[offset : offset + w.size].reshape(w.shape)
            view[...] = w
            layer.weights[name] = view
            layer.grads[name] = self._flat_grads[offset : offset + w.size].reshape(w.shape)
            offset += w.size

    def count_params(self):
        self.build()
        return sum(layer.count_params() for layer in self.layers)

    # -- summary --------------------------------------------------------------------------
    def summary(self, line_length=65, positions=(0.45, 0.85, 1.0), print_fn=None):
        """The Keras 2 summary table, character for character (fields cut to their column)."""
        self.build()
        print_fn = print_fn or print
        cols = [int(line_length * p) for p in positions]

        def row(fields):
            line = ""
            for i, field in enumerate(fields):
                if i > 0:
                    line = line[:-1] + " "
                line += str(field)
                line = line[: cols[i]]
                line += " " * (cols[i] - len(line))
            print_fn(line)

        print_fn(f'Model: "{self.name}"')
        print_fn("_" * line_length)
        row(["Layer (type)", "Output Shape", "Param #"])
        print_fn("=" * line_length)
        for i, layer in enumerate(self.layers):
            row([f"{layer.name} ({type(layer).__name__})", str((None,) + tuple(layer.output_shape)), layer.count_params()])
            print_fn(("=" if i == len(self.layers) - 1 else "_") * line_length)
        total = self.count_params()
        trainable = sum(layer.count_trainable_params() for layer in self.layers)
        print_fn(f"Total params: {total:,}")
        print_fn(f"Trainable params: {trainable:,}")
        print_fn(f"Non-trainable params: {total - trainable:,}")
        print_fn("_" * line_length)

    # -- compiling ------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="categorical_crossentropy", metrics=None):
        self.build()
        self.optimizer = optimizers_module.get(optimizer)
        self.optimizer.build(self._flat_params, self.backend)
        self.loss = losses_module.get(loss)
        self.metric_names = []
        for metric in metrics or []:
            if metric not in ("accuracy", "acc"):
                raise ValueError(f"unknown metric {metric!r}: tinycnn supports 'accuracy'")
            self.metric_names.append("acc")
        last = self.layers[-1]
        self._fused_softmax = getattr(last, "activation", None) == "softmax"
        last.output_logits = self._fused_softmax

    def _require_compiled(self, what):
        if self.loss is None:
            raise RuntimeError(f"call model.compile(...) before model.{what}(...)")

    # -- input checks -----------------------------------------------------------------------
    def _check_x(self, x, what="x"):
        """x on this model's device in its dtype, after checking type, shape and values."""
        self.build(None if self.layers[0].input_shape else np.shape(x)[1:])
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        kind = np.dtype(x.dtype).kind
        if kind not in "fiu":
            raise TypeError(f"{what} must hold numbers (float or integer), got dtype {x.dtype}")
        expected = tuple(self.layers[0].input_shape)
        if tuple(x.shape[1:]) != expected:
            hint = ""
            if tuple(x.shape[1:]) + (1,) == expected:
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

    def _check_y(self, y, n, what="y"):
        """Targets as dense one-hot rows on the device, after checking shape and range."""
        classes = self.layers[-1].output_shape[-1]
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

    # -- the step -------------------------------------------------------------------------
    def _forward(self, x, training):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def _loss_and_backward(self, xb, tb):
        """Forward in training mode, loss, backward into the flat gradient buffer."""
        out = self._forward(xb, training=True)
        probs, per_sample, dout = self.loss.compute(out, tb, self._fused_softmax, self.backend.kernels)
        dout *= dout.dtype.type(1.0 / xb.shape[0])  # the loss is the batch mean
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return probs, per_sample

    def train_on_batch(self, x, y):
        """One optimizer step on one batch; returns [loss, acc] like Keras."""
        self._require_compiled("train_on_batch")
        xb = self._check_x(x)
        tb = self._check_y(y, xb.shape[0])
        probs, per_sample = self._loss_and_backward(xb, tb)
        self.optimizer.apply(self._flat_params, self._flat_grads)
        return [float(per_sample.mean())] + (
            [float(losses_module.count_correct(probs, tb)) / xb.shape[0]] if self.metric_names else []
        )

    def loss_and_gradients(self, x, y):
        """Mean loss in training mode and the gradient of every trainable weight (NumPy, Keras order).
        No optimizer step; used by gradient checks and parity tests."""
        self._require_compiled("loss_and_gradients")
        xb = self._check_x(x)
        tb = self._check_y(y, xb.shape[0])
        _, per_sample = self._loss_and_backward(xb, tb)
        grads = [to_numpy(layer.grads[name]).copy() for layer in self.layers for name in layer.trainable_names]
        return float(per_sample.mean()), grads

    def _epoch_seeds(self, epoch):
        """Per-epoch random streams derived from the model seed: a resumed run replays them exactly."""
        for i, layer in enumerate(self.layers):
            base = getattr(layer, "seed", None)
            layer.reseed(derive_seed(self.seed if base is None else base, 1, epoch, i))
        return derive_seed(self.seed, 2, epoch)

    # -- fit / evaluate / predict ---------------------------------------------------------------
    def fit(self, x, y, batch_size=32, epochs=1, verbose=1, callbacks=None, validation_data=None,
            shuffle=True, initial_epoch=0):
        self._require_compiled("fit")
        if int(batch_size) < 1 or int(epochs) < 0:
            raise ValueError("batch_size must be >= 1 and epochs >= 0")
        batch_size = int(batch_size)
        x = self._check_x(x)
        n = x.shape[0]
        t = self._check_y(y, n)
        val = None
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            xv = self._check_x(validation_data[0], "validation x")
            val = (xv, self._check_y(validation_data[1], xv.shape[0], "validation y"))

        history = callbacks_module.History()
        cbs = ([callbacks_module.ProgbarLogger(verbose)] if verbose else []) + list(callbacks or []) + [history]
        metric_names = ["loss"] + self.metric_names
        shown = metric_names + (["val_" + m for m in metric_names] if val else [])
        for cb in cbs:
            cb.set_model(self)
            cb.set_params({"epochs": epochs, "samples": n, "batch_size": batch_size, "verbose": verbose,
                           "metrics": shown, "do_validation": val is not None})
        if verbose and val is not None:
            sys.stdout.write("Train on %d samples, validate on %d samples\n" % (n, val[0].shape[0]))
        for cb in cbs:
            cb.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            shuffle_seed = self._epoch_seeds(epoch)
            order = self.backend.permutation(n, shuffle_seed) if shuffle else self.xp.arange(n)
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            metrics = _EpochMetrics(self.metric_names)
            started = time.perf_counter()
            for batch, start in enumerate(range(0, n, batch_size)):
                idx = order[start : start + batch_size]
                xb, tb = x[idx], t[idx]
                probs, per_sample = self._loss_and_backward(xb, tb)
                self.optimizer.apply(self._flat_params, self._flat_grads)
                metrics.add(per_sample.sum(), losses_module.count_correct(probs, tb), xb.shape[0])
                logs = {"batch": batch, "size": xb.shape[0], "seen": metrics.seen, "metrics": metrics}
                for cb in cbs:
                    cb.on_batch_end(batch, logs)
            logs = metrics.averages()
            if not np.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1}: the loss is {logs['loss']} "
                    "(lower the learning rate, or check the inputs' scale)"
                )
            logs["seconds"] = time.perf_counter() - started
            if val is not None:
                logs.update(self._evaluate_arrays(val[0], val[1], batch_size).averages("val_"))
            for cb in cbs:
                cb.on_epoch_end(epoch, logs)
        for cb in cbs:
            cb.on_train_end()
        self.history = history
        return history

    # Inference gives each sample the same result whatever the batch, so the CPU runs a large
    # requested batch as sub-batches small enough for their activations to stay in cache.
    CPU_INFERENCE_BATCH = 128

    def _inference_batches(self, n, batch_size):
        if self.backend.name == "cpu":
            batch_size = min(batch_size, self.CPU_INFERENCE_BATCH)
        return range(0, n, batch_size), batch_size

    def _evaluate_arrays(self, x, t, batch_size):
        metrics = _EpochMetrics(self.metric_names)
        starts, batch_size = self._inference_batches(x.shape[0], batch_size)
        for start in starts:
            xb, tb = x[start : start + batch_size], t[start : start + batch_size]
            out = self._forward(xb, training=False)
            probs, per_sample, _ = self.loss.compute(out, tb, self._fused_softmax, self.backend.kernels)
            metrics.add(per_sample.sum(), losses_module.count_correct(probs, tb), xb.shape[0])
        return metrics

    def evaluate(self, x, y, batch_size=32, verbose=1):
        """[loss, acc] in inference mode, like Keras."""
        self._require_compiled("evaluate")
        x = self._check_x(x)
        t = self._check_y(y, x.shape[0])
        bar = callbacks_module.Progbar(x.shape[0], verbose=verbose) if verbose else None
        values = self._evaluate_arrays(x, t, int(batch_size)).averages()
        if bar is not None:
            bar.update(x.shape[0], lambda: values, finalize=True)
        return [values["loss"]] + ([values["acc"]] if "acc" in values else [])

    def predict(self, x, batch_size=32):
        """Outputs in inference mode as a NumPy array (probabilities when the model ends in softmax)."""
        x = self._check_x(x)
        outs = []
        starts, batch_size = self._inference_batches(x.shape[0], int(batch_size))
        for start in starts:
            out = self._forward(x[start : start + batch_size], training=False)
            if self._fused_softmax:
                out = softmax(out)
            outs.append(to_numpy(out))
        return np.concatenate(outs)

    # -- weights ----------------------------------------------------------------------------
    def get_weights(self):
        self.build()
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        self.build()
        weights = list(weights)
        expected = sum(len(layer.weights) for layer in self.layers)
        if len(weights) != expected:
            raise ValueError(f"the model has {expected} weight arrays, got {len(weights)}")
        # Check every shape first, so a bad list leaves the model untouched.
        flat = [(layer, name, w) for layer in self.layers for name, w in layer.weights.items()]
        for (layer, name, current), value in zip(flat, weights):
            if np.shape(value) != tuple(current.shape):
                raise ShapeError(f"{layer.name} weight {name!r}: expected shape {tuple(current.shape)}, got {np.shape(value)}")
        start = 0
        for layer in self.layers:
            layer.set_weights(weights[start : start + len(layer.weights)])
            start += len(layer.weights)

    def save_weights(self, path):
        self.build()
        saving.save_weights(self, path)

    def load_weights(self, path, by_name=False):
        self.build()
        saving.load_weights(self, path, by_name=by_name)

    def save_keras_weights(self, path):
        """Write a Keras 3 `.weights.h5` file that Keras loads into the same architecture (needs h5py)."""
        from . import keras_io

        keras_io.save_keras_weights(self, path)

    def load_keras_weights(self, path):
        """Load a Keras 3 `.weights.h5` file of the same architecture (needs h5py)."""
        from . import keras_io

        keras_io.load_keras_weights(self, path)
