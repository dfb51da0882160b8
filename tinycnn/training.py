"""The training loop: compile, fit, evaluate, predict, and the single steps they are made of.

`Trainer` is a base class of `tinycnn.Model` (as Keras 3 does it): the model holds structure and
weights, this module holds what trains and runs it. It relies on the model for `build()`, its
`backend` and `dtype`, its symbolic `inputs` and `outputs`, `compute_layers`, the parameter
buffer `params` (`refresh_parameters()` keeps it in step with frozen layers) and
`plan(strip_activation)`, the execution plan of its graph.

One training step (`train_step`) is: the plan's forward in training mode, keeping each step's
saved values on a tape; the loss and its gradient (sample-weighted); the plan's backward into the
flat gradient buffer; the regularizers' gradients; one fused optimizer update. `fit` adds
shuffling (a counter-based permutation per epoch, so a resumed run replays it), batching, metrics
kept on the device, validation and callbacks. Losses and metrics follow Keras 3: the logged loss
is the sample-weighted per-sample loss summed over the batch and divided by its size, plus the
regularization penalty. A metric is the plain mean of its per-sample values: sample and class
weights reach only the loss and the `weighted_metrics`, whose means they weight.
"""
import contextlib
import copy
import hashlib
import math
import sys
import time

import numpy as np

from . import arguments, batch_split, config, share_process, static_step
from . import callbacks as callbacks_module
from . import losses as losses_module
from . import metrics as metrics_module
from . import optimizers as optimizers_module
from .arrays import get_array_module, to_numpy
from .concurrency import exclusive
from .distributed.data_parallel import as_distribution
from .errors import DistributedError, ShapeError
from .kernels import precompile
from .layers.convolutional import Conv2D, SeparableConv2D
from .randomness import derive_seed


class EpochMetrics:
    """Sums of the loss and of each metric, kept on the device; synced only when read. Sample
    weights weight the metrics whose `weighted` flag is set (compile's weighted_metrics)."""

    def __init__(self, metrics, weighted, kernels=None):
        self.metrics = metrics
        self.weighted = weighted
        self.kernels = kernels  # the model's kernel set, for metrics with a kernel of their own
        self.loss_sum = 0.0
        self.seen = 0
        self.sums = [0] * len(metrics)
        self.weights = [0] * len(metrics)

    def add(self, batch_loss_sum, predictions, targets, sample_weight):
        n = targets.shape[0]
        self.loss_sum = self.loss_sum + batch_loss_sum
        self.seen += n
        for i, (metric, weighted) in enumerate(zip(self.metrics, self.weighted)):
            if sample_weight is None or not weighted:
                self.sums[i] = metric.accumulate(self.sums[i], predictions, targets, self.kernels)
                self.weights[i] = self.weights[i] + n
            else:
                values = metric.values(predictions, targets)
                self.sums[i] = self.sums[i] + (values * sample_weight).sum()
                self.weights[i] = self.weights[i] + sample_weight.sum()

    def sum_over_ranks(self, sum_, xp):
        """Replace every sum by its sum over the ranks of a data-parallel job (`sum_`: an in-place
        allreduce), so the averages are those of every rank's samples. `xp`: the model's array
        module, on every rank alike (a rank with no rows holds Python numbers, yet must take part
        in the same collective as the others: NCCL for device arrays)."""
        parts = [self.loss_sum, self.seen, *self.sums, *self.weights]
        totals = sum_(xp.stack([xp.asarray(p, dtype=xp.float64).reshape(()) for p in parts]))
        k = len(self.metrics)
        self.loss_sum, self.seen = totals[0], int(totals[1])
        self.sums, self.weights = list(totals[2 : 2 + k]), list(totals[2 + k :])

    def averages(self, prefix=""):
        """Python floats (a host sync on the GPU)."""
        if not self.seen:
            return {}
        values = {prefix + "loss": float(self.loss_sum) / self.seen}
        for metric, total, weight in zip(self.metrics, self.sums, self.weights):
            values[prefix + metric.name] = float(total) / float(weight)
        return values

    def bind_device_sums(self, loss_sum, sums):
        """A static step adds each batch's loss and metric sums into these device scalars itself
        (tinycnn.static_step); `count` counts its samples."""
        self.loss_sum, self.sums = loss_sum, list(sums)

    def count(self, n):
        """n more samples, whose sums a static step added (unweighted)."""
        self.seen += n
        self.weights = [w + n for w in self.weights]

    def running(self):
        """The same means as device scalars (no sync): Keras's batch logs."""
        values = {"loss": self.loss_sum / self.seen}
        for metric, total, weight in zip(self.metrics, self.sums, self.weights):
            values[metric.name] = total / weight
        return values


def _metric_list(metrics, what):
    if metrics is None:
        return []
    if isinstance(metrics, (str, metrics_module.Metric)) or callable(metrics):
        return [metrics]
    if isinstance(metrics, dict):
        raise ValueError(f"{what} as a dict (one list per output) is for models with several outputs; "
                         "this model has one: pass a list")
    return list(metrics)


def _result(logs, return_dict):
    """What Keras's evaluate and *_on_batch return: the dict, or its values in order, or the one
    value alone when only the loss is logged."""
    if return_dict:
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values


def _auto(verbose):
    """Keras's verbose: "auto" (a progress bar), 0 (silent), 1 (progress bar), 2 (a line per epoch)."""
    if isinstance(verbose, str) and verbose == "auto":
        return 1
    if isinstance(verbose, (bool, np.bool_)):
        return int(verbose)
    return arguments.integer(verbose, "verbose", 0, 2)


def _batch_size(batch_size):
    return 32 if batch_size is None else arguments.integer(batch_size, "batch_size", minimum=1)


def _callbacks(callbacks):
    """A list of Callback objects from None, one callback, or a list of them."""
    if callbacks is None:
        return []
    if isinstance(callbacks, callbacks_module.Callback):
        return [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of tinycnn.callbacks.Callback objects, got {type(callbacks).__name__}")
    for cb in callbacks:
        if not isinstance(cb, callbacks_module.Callback):
            raise TypeError(f"callbacks must be tinycnn.callbacks.Callback objects (subclass Callback, or use "
                            f"LambdaCallback), got {type(cb).__name__}")
    return list(callbacks)


class Trainer:
    """compile / fit / evaluate / predict and the steps they are made of (a base of Model)."""

    # Inference gives each sample the same result whatever the batch, so the CPU runs a large
    # requested batch as sub-batches small enough for their activations to stay in cache: this
    # many rows per thread. Week2, predict over 10,000 images on a 2-vCPU AVX-512 guest, medians
    # of 7: 0.88 s in sub-batches of 128, 0.93 of 256; split between two threads
    # (tinycnn.batch_split), 0.66 s for sub-batches of 128 (64 rows a thread), 0.65 of 256, 0.67 of 512.
    CPU_INFERENCE_BATCH = 128
    _fit_shares = None  # during fit: its share processes (tinycnn.share_process)

    def __init__(self):
        self.optimizer = None
        self.loss = None
        self.metrics = []  # the metrics, then the weighted metrics, in the order they are logged
        self.metric_weighted = []  # for each of self.metrics: do sample weights weight it?
        self.metric_identifiers = []  # what compile was given, for the model file
        self.weighted_metric_identifiers = []
        self.history = None
        self.stop_training = False
        self._optimizer_buffer = None  # the flat parameter array the optimizer's state was built for
        self._growth_warned = False  # one weight-growth warning per fit
        self.distribution = None  # a tinycnn.distributed.DataParallel, set by compile

    @property
    def metrics_names(self):
        return ["loss"] + [m.name for m in self.metrics]

    # -- compiling ------------------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None, weighted_metrics=None,
                run_eagerly=None, steps_per_execution=None, jit_compile=None, auto_scale_loss=None,
                distribution=None):
        """Keras's compile, its arguments in Keras 2's positional order (metrics third), which Keras 3
        scripts pass by name. `metrics` ignore sample and class weights, `weighted_metrics` use them.
        tinycnn always runs eagerly: `run_eagerly`, `steps_per_execution`, `jit_compile` and
        `auto_scale_loss` are accepted and change nothing. `distribution`: a
        tinycnn.distributed.DataParallel, to train on several processes (fit, evaluate and predict
        then share every batch among the ranks)."""
        self.distribution = as_distribution(distribution)
        if self.buildable():  # else (a Sequential with no input shape yet) the first data builds it
            self.build()
        if len(self.outputs) > 1:
            raise ValueError(f"training a model with {len(self.outputs)} outputs is not supported yet; "
                             "fit/evaluate need a single output")
        if loss_weights is not None and loss_weights not in (1, [1], (1,)):
            raise ValueError(f"loss_weights={loss_weights!r}: a model with one output trains its one loss with "
                             "weight 1 (scale the learning rate instead)")
        self.optimizer = optimizers_module.get(optimizer)
        self.loss = None if loss is None else losses_module.get(loss)
        self.metric_identifiers = _metric_list(metrics, "metrics")
        self.weighted_metric_identifiers = _metric_list(weighted_metrics, "weighted_metrics")
        self._make_metrics()
        self._optimizer_buffer = None
        if self.built:  # else the optimizer's state is made on the first step
            self.build_optimizer()
        self._warn_if_probabilities_are_logits()

    def _warn_if_probabilities_are_logits(self):
        """A loss told the output is a probability, on a model ending in neither softmax nor sigmoid:
        Keras trains that silently to poor accuracy; say so once, at compile."""
        if self.loss is None or self.loss.from_logits or self.loss.fuses_activation is None or not self.outputs:
            return
        last = self.outputs[0].node.layer
        activation = getattr(getattr(last, "activation", None), "name", None)
        if activation in (None, "linear"):
            import warnings

            warnings.warn(f"{self.loss.name} is told (from_logits=False) that the model's output is a probability, "
                          f"but the last layer, {last.name}, ends in no activation: pass from_logits=True to the loss "
                          f"or end the model in a {self.loss.fuses_activation}", stacklevel=3)

    def build_optimizer(self):
        """Make the optimizer's state for the model's parameter buffer, unless it already has it
        (a rebuilt model, after Sequential.add or a layer frozen, gets fresh state)."""
        if self.params is None:
            self.refresh_parameters()
        if self._optimizer_buffer is not self.params.params:
            self.optimizer.build(self.params.params, self.backend, owner=self)
            self._optimizer_buffer = self.params.params

    def _require_compiled(self, what):
        if self.loss is None:
            if self.optimizer is None:
                raise RuntimeError(f"call model.compile(...) before model.{what}(...)")
            raise RuntimeError(f"model.{what}() needs a loss: compile with one, e.g. "
                               "model.compile(optimizer, loss='sparse_categorical_crossentropy')")

    def resolve_compile(self):
        """Resolve what compile could not before the output shape was known."""
        self._make_metrics()
        self._warn_if_probabilities_are_logits()

    def _make_metrics(self):
        """The Metric objects of compile's metrics and weighted_metrics, named as Keras 3 logs them
        (a weighted metric whose name is already taken is logged as weighted_<name>)."""
        shape = self.outputs[0].shape[1:] if self.outputs else ()
        self.metrics, self.metric_weighted = [], []
        for identifiers, weighted in ((self.metric_identifiers, False), (self.weighted_metric_identifiers, True)):
            for identifier in identifiers:
                metric = metrics_module.get(identifier, self.loss, shape)
                if metric in self.metrics or (weighted and metric.name in self.metrics_names):
                    metric = copy.copy(metric)  # the user's object keeps its name
                    metric.name = "weighted_" + metric.name if weighted else metric.name
                self.metrics.append(metric)
                self.metric_weighted.append(weighted)
        names = self.metrics_names
        if len(set(names)) != len(names):
            raise ValueError(f"metric names must be unique, got {names}")

    def epoch_metrics(self):
        return EpochMetrics(self.metrics, self.metric_weighted, self.backend.kernels)

    def _loss_plan(self):
        strip = None if self.loss.from_logits else self.loss.fuses_activation
        return self.plan(strip_activation=strip)

    # -- input checks -----------------------------------------------------------------------------
    def check_inputs(self, x, what="x"):
        """The model's input arrays, on its device in its dtype, after checking type, shape and
        values. `x` is an array, or a list of arrays for a model with several inputs."""
        if x is None:
            raise ValueError(f"{what} is None: pass the input data as an array")
        items = list(x) if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape") else [x]
        if not self.built:  # a Sequential without an input shape takes it from the data
            self.build(None if self.buildable() else (None,) + tuple(np.shape(items[0])[1:]))
            if self.loss is not None:
                self.resolve_compile()
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
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:  # a ragged list of lists
                raise ShapeError(f"{what} is not a rectangular array (rows of different lengths?): {exc}") from None
        kind = np.dtype(x.dtype).kind
        if kind not in "biuf":
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
        if kind == "f":
            bad = int((~get_array_module(x).isfinite(x)).sum())
            if bad:
                raise ValueError(f"{what} contains {bad} NaN or infinite values")
        narrowed = kind == "f" and np.dtype(x.dtype).itemsize > np.dtype(self.dtype).itemsize
        with np.errstate(over="ignore"):
            x = self.backend.asarray(x, dtype=self.dtype)
        if narrowed and not bool(self.xp.isfinite(x).all()):
            raise ValueError(f"{what} holds values beyond {np.dtype(self.dtype).name}'s range: scale the inputs")
        return x

    def check_targets(self, y, n, what="y"):
        """Targets prepared by the loss (one-hot rows for the sparse cross-entropy), on the device."""
        if y is None:
            raise ValueError(f"{what} is None: pass the targets as an array")
        y = y if hasattr(y, "shape") else np.asarray(y)
        if y.ndim == 0 or y.shape[0] != n:
            raise ShapeError(f"{what} has {y.shape[0] if y.ndim else 0} rows but x has {n}")
        return self.loss.prepare_targets(y, self.outputs[0].shape[1:], self.backend, self.dtype, what)

    def check_sample_weight(self, sample_weight, class_weight, targets, what="sample_weight"):
        """Per-sample weights on the device (None when neither is given): Keras's sample_weight times
        the class_weight of each sample's class (its largest target entry, or the rounded target of
        a single output)."""
        n = targets.shape[0]
        weights = None
        if sample_weight is not None:
            try:
                w = np.asarray(to_numpy(sample_weight), dtype=np.float64)
            except (ValueError, TypeError):
                raise TypeError(f"{what} must be an array of numbers, got {type(sample_weight).__name__}") from None
            if w.ndim == 2 and w.shape[1] == 1:
                w = w.reshape(-1)
            if w.shape != (n,):
                raise ShapeError(f"{what} must have shape ({n},), got {w.shape}")
            if not np.all(np.isfinite(w)) or (w < 0).any():
                raise ValueError(f"{what} must hold finite weights >= 0")
            weights = w
        if class_weight is not None:
            if not isinstance(class_weight, dict):
                raise TypeError(f"class_weight must be a dict {{class index: weight}}, got {type(class_weight).__name__}")
            dense = to_numpy(targets)
            count = dense.shape[-1] if dense.shape[-1] > 1 else 2  # one sigmoid unit: classes 0 and 1
            classes = (dense.argmax(axis=-1) if dense.shape[-1] > 1 else np.rint(dense[:, 0])).astype(np.int64)
            if classes.size and (classes.min() < 0 or classes.max() >= count):
                raise ValueError(f"class_weight needs class targets (0..{count - 1}); these targets are not classes")
            table = np.ones(count)
            for cls, value in class_weight.items():
                key = int(cls) if isinstance(cls, str) and cls.strip().lstrip("-").isdigit() else cls  # JSON keys
                index = arguments.integer(key, "a class_weight key", 0, count - 1)
                table[index] = arguments.real(value, f"class_weight[{cls!r}]", low=0.0)
            weights = table[classes] if weights is None else weights * table[classes]
        return None if weights is None else self.backend.asarray(weights, dtype=self.dtype)

    # -- the steps -----------------------------------------------------------------------------------
    def forward_backward(self, inputs, targets, sample_weight=None, global_batch=None):
        """Forward in training mode, the loss, and backward into the flat gradient buffer
        (`self.params.grads`), regularizers included, on checked device arrays. Returns
        (predictions, the batch's loss sum): the loss sum divided by the batch size is the batch loss.
        `global_batch`: under data parallelism, these rows are this rank's share of a global batch of
        that size; the loss is its mean over the global batch and the gradients are summed over the
        ranks (the loss sum stays this rank's). On the CPU a batch may run as shares in threads
        (tinycnn.batch_split); the result is the whole batch's."""
        self.refresh_parameters()  # frozen or unfrozen layers; weights another model trained meanwhile
        plan = self._loss_plan()
        rows = targets.shape[0]
        n = rows if global_batch is None else global_batch
        def work(k, start, stop):
            weights = None if sample_weight is None else sample_weight[start:stop]
            sink = self.params if k == 0 else self.params.gradient_share(k)
            return self.share_step(plan, [x[start:stop] for x in inputs], targets[start:stop], weights, n, sink)

        with precompile.training(self._compile_helper_helps):  # tinycnn.kernels.precompile
            shares = self._batch_shares(plan, rows)
            if shares is not None and self._fit_shares is not None:  # during fit (tinycnn.share_process)
                results, share_grads = self._fit_shares.run(self, plan, shares, inputs, targets, sample_weight, n,
                                                            work)
            else:
                results = self._run_shares(shares, rows, work)
                share_grads = self.params.share_gradients(len(results))
        for grads in share_grads:  # in share order: the same sum on every machine
            self.params.grads += grads
        predictions = self._joined([p for p, _ in results])
        batch_sum = results[0][1]
        for _, part in results[1:]:
            batch_sum = batch_sum + part
        if global_batch is not None:
            self.distribution.sum_(self.params.grads)  # before the regularizers, which every rank adds alike
        penalty = self.params.add_regularization()
        if penalty is not None:
            batch_sum = batch_sum + penalty * rows
        return predictions, batch_sum

    def _compile_helper_helps(self):
        """Whether a first run's compile helper would compile kernels this model's training uses:
        float32 direct convolutions on the numba CPU set (tinycnn.kernels.precompile)."""
        return (self.backend.kernels.name == "cpu" and np.dtype(self.dtype) == np.float32
                and self.backend.settings.conv != "gemm"
                and any(isinstance(layer, (Conv2D, SeparableConv2D)) for layer in self.compute_layers))

    def share_step(self, plan, inputs, targets, sample_weight, n, gradients):
        """Forward, loss and backward of `inputs` (the batch, or one share of it) into `gradients`,
        the loss gradient scaled by 1/n (n: the whole batch). Returns (predictions, loss sum)."""
        (out,), tape = plan.forward(inputs, training=True, keep_for_backward=True)
        logits = plan.emits_logits or self.loss.from_logits
        if sample_weight is None:  # the loss is the batch mean
            predictions, batch_sum, dout = self.loss.compute_scaled(out, targets, logits, self.backend.kernels, 1.0 / n)
        else:
            predictions, per_sample, dout = self.loss.compute(out, targets, logits, self.backend.kernels)
            scale = (sample_weight / n).reshape((targets.shape[0],) + (1,) * (dout.ndim - 1))
            dout *= scale.astype(dout.dtype)
            batch_sum = (per_sample * sample_weight).sum()
        plan.backward(tape, [dout], gradients)
        return predictions, batch_sum

    def _batch_shares(self, plan, rows):
        """The shares a batch of `rows` splits into (tinycnn.batch_split), or None: only numba CPU
        kernels split, only graphs of thread-safe layers, never under data parallelism (its ranks
        split the batches already), and never with TINYCNN_BATCH_SPLIT=0."""
        if self.distribution is not None or self.backend.kernels.name != "cpu" or not plan.thread_safe:
            return None
        shares = batch_split.bounds(rows, plan.sample_multiply_adds)
        return shares if shares is not None and config.settings().batch_split else None  # settings(): ~25 us

    def cpu_threads(self, rows):
        """A context for running a whole batch of `rows` samples: on the numba CPU backend, one
        thread for a small batch (tinycnn.batch_split.serial_if_small); elsewhere nothing."""
        if self.backend.kernels.name != "cpu":
            return contextlib.nullcontext()
        return batch_split.serial_if_small(rows)

    def _run_rows(self, plan, rows, work):
        """[work(k, start, stop)] for the shares of a batch of `rows` samples: several in threads
        where the batch splits (tinycnn.batch_split), else one, the whole batch, on this thread."""
        return self._run_shares(self._batch_shares(plan, rows), rows, work)

    def _run_shares(self, shares, rows, work):
        """As _run_rows, for the batch's shares (_batch_shares) known already."""
        if shares is None:
            with self.cpu_threads(rows):
                return [work(0, 0, rows)]
        return batch_split.run(shares, work)

    def _joined(self, parts):
        """The shares' arrays as one (the only one as it is: no copy)."""
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts)

    def _inference_forward(self, plan, inputs):
        """The plan's outputs in inference mode for these rows. On the CPU the rows may run as
        shares in threads (tinycnn.batch_split): a sample's result does not depend on the other
        rows of its batch, so the outputs are the same, bit for bit, and only the time changes."""
        def work(k, start, stop):
            return plan.forward([x[start:stop] for x in inputs], training=False, keep_for_backward=False)[0]

        parts = self._run_rows(plan, inputs[0].shape[0], work)
        return [self._joined(list(outputs)) for outputs in zip(*parts)]

    def train_step(self, inputs, targets, sample_weight=None, global_batch=None):
        """One optimizer step on checked device arrays (a list of input arrays, targets prepared by
        the loss, optional per-sample weights): what `fit` runs per batch. Returns (predictions, the
        batch's loss sum) as device values. `global_batch`: see `forward_backward`."""
        predictions, batch_sum = self.forward_backward(inputs, targets, sample_weight, global_batch)
        self.build_optimizer()  # after forward_backward, which may have rebuilt the parameter buffer
        self.optimizer.apply(self.params.params, self.params.grads, self.params.grad_views)
        return predictions, batch_sum

    def _batch_logs(self, predictions, batch_sum, targets, sample_weight):
        metrics = self.epoch_metrics()
        metrics.add(batch_sum, predictions, targets, sample_weight)
        return metrics.averages()

    @exclusive
    def train_on_batch(self, x, y, sample_weight=None, class_weight=None, return_dict=False):
        """One optimizer step on one batch; returns ``[loss, *metrics]`` (or a dict) like Keras.
        Compiled with a `distribution`, the batch is the global batch: every rank passes it whole
        and computes its share."""
        with self._collective():
            self._require_compiled("train_on_batch")
            xs = self.check_inputs(x)
            tb = self.check_targets(y, xs[0].shape[0])
            weights = self.check_sample_weight(sample_weight, class_weight, tb)
            dist = self.distribution
            if dist is None:
                predictions, batch_sum = self.train_step(xs, tb, weights)
                return _result(self._batch_logs(predictions, batch_sum, tb, weights), return_dict)
            self.build_optimizer()
            if not dist.synchronized(self):
                dist.synchronize(self)
            n = tb.shape[0]
            first, (*xs, tb, weights) = self._shard([*xs, tb, weights])
            with dist.training(self):
                dist.place_batch(self, first)
                predictions, batch_sum = self.train_step(xs, tb, weights, n)
                dist.average_statistics(self)  # per-rank BatchNorm: every rank holds the same statistics
            metrics = self.epoch_metrics()
            metrics.add(batch_sum, predictions, tb, weights)
            metrics.sum_over_ranks(dist.sum_, self.xp)
            return _result(metrics.averages(), return_dict)

    @exclusive
    def test_on_batch(self, x, y, sample_weight=None, return_dict=False):
        """Loss and metrics of one batch in inference mode; ``[loss, *metrics]`` (or a dict)."""
        with self._collective():
            self._require_compiled("test_on_batch")
            xs = self.check_inputs(x)
            tb = self.check_targets(y, xs[0].shape[0])
            weights = self.check_sample_weight(sample_weight, None, tb)
            metrics = self._evaluate_arrays(xs, tb, weights, tb.shape[0], exact_batch=True, shared=True)
            logs = metrics.averages()
            return _result(logs, return_dict)

    @exclusive
    def predict_on_batch(self, x):
        """The outputs for one batch, in inference mode, as NumPy arrays."""
        xs = self.check_inputs(x)
        outputs = self._inference_forward(self.plan(), xs)
        results = [to_numpy(o) for o in outputs]
        return results[0] if self.single_output else results

    @exclusive
    def loss_and_gradients(self, x, y, sample_weight=None):
        """Mean loss in training mode and the gradient of every trainable weight (NumPy, in the
        order of `trainable_weights`). No optimizer step; used by gradient checks and parity tests."""
        self._require_compiled("loss_and_gradients")
        xs = self.check_inputs(x)
        tb = self.check_targets(y, xs[0].shape[0])
        weights = self.check_sample_weight(sample_weight, None, tb)
        _, batch_sum = self.forward_backward(xs, tb, weights)
        return float(batch_sum / tb.shape[0]), [to_numpy(g).copy() for g in self.params.grad_views]

    def seed_random_streams(self, epoch):
        """Restart every layer's random stream (Dropout masks) as at the start of `epoch`, from the
        model's seed (or a layer's own); returns the epoch's shuffling seed. A resumed run replays
        its epochs exactly because of this."""
        for i, layer in enumerate(self.compute_layers):
            base = getattr(layer, "seed", None)
            layer.reseed(derive_seed(self.seed if base is None else base, 1, epoch, i))
        return derive_seed(self.seed, 2, epoch)

    # -- fit ---------------------------------------------------------------------------------------------
    def _collective(self):
        """Under data parallelism, an error inside the block is told to the other ranks first."""
        return contextlib.nullcontext() if self.distribution is None else self.distribution.guard()

    def _for_this_rank(self, callbacks):
        """The callbacks this rank runs: under data parallelism rank 0 alone runs the ones that
        print or write files."""
        if self.distribution is None or self.distribution.is_chief:
            return callbacks
        return [cb for cb in callbacks if not cb.rank_zero_only]

    def _distributed_facts(self, xs, t, weights, val, batch_size, epochs, initial_epoch, shuffle):
        """What every rank of a data-parallel fit must agree on: sizes, settings and fingerprints of
        the data (a hash of up to 1,024 evenly spaced rows of each array)."""
        dist, n = self.distribution, t.shape[0]
        if batch_size < dist.size or n < dist.size:
            raise DistributedError(f"a global batch of {min(batch_size, n)} samples cannot be shared among "
                                   f"{dist.size} ranks: use batch_size >= {dist.size}")

        def fingerprint(a):
            rows = a[:: max(1, a.shape[0] // 1024)]
            return hashlib.sha256(np.ascontiguousarray(to_numpy(rows)).tobytes()).hexdigest()[:16]

        return {"samples": int(n), "batch_size": batch_size, "epochs": epochs, "initial_epoch": initial_epoch,
                "shuffle": bool(shuffle), "parameters": int(self.params.size), "dtype": str(self.dtype),
                "device": self.backend.name,
                "layers": [[type(layer).__name__, [list(w.shape) for w in layer.weights.values()]]
                           for layer in self.compute_layers],
                "inputs": [fingerprint(a) for a in xs], "targets": fingerprint(t),
                "sample_weights": None if weights is None else fingerprint(weights),
                "validation": None if val is None else [int(val[1].shape[0]), fingerprint(val[1])]}

    @exclusive
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0):
        """Keras's fit on arrays. `validation_split` holds out the last fraction of the data, before
        shuffling, as Keras does; `validation_data` is (x, y) or (x, y, sample_weight). Compiled with
        a `distribution`, every rank passes the same arrays and `batch_size` is the global batch."""
        with self._collective():
            return self._fit(x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data,
                             shuffle, class_weight, sample_weight, initial_epoch)

    def _fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data, shuffle,
             class_weight, sample_weight, initial_epoch):
        self._require_compiled("fit")
        batch_size = _batch_size(batch_size)
        verbose = _auto(verbose)
        epochs = arguments.integer(epochs, "epochs", minimum=0)
        initial_epoch = arguments.integer(initial_epoch, "initial_epoch", minimum=0)
        validation_split = arguments.real(validation_split, "validation_split", 0.0, 1.0, high_open=True)
        callbacks = _callbacks(callbacks)
        xs = self.check_inputs(x)
        t = self.check_targets(y, xs[0].shape[0])
        weights = self.check_sample_weight(sample_weight, None, t)
        val = None
        if validation_split and validation_data is None:
            n_all = t.shape[0]
            split = math.floor(n_all * (1.0 - float(validation_split)))  # Keras 3's split point
            if split in (0, n_all):
                raise ValueError(f"validation_split={validation_split} leaves no samples for training or validation "
                                 f"out of {n_all}")
            val = ([a[split:] for a in xs], t[split:], None if weights is None else weights[split:])
            xs, t = [a[:split] for a in xs], t[:split]
            weights = None if weights is None else weights[:split]
        elif validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise ValueError("validation_data must be a pair (x_val, y_val) or a triple (x_val, y_val, weights)")
            xv = self.check_inputs(validation_data[0], "validation x")
            tv = self.check_targets(validation_data[1], xv[0].shape[0], "validation y")
            wv = None
            if len(validation_data) == 3:
                wv = self.check_sample_weight(validation_data[2], None, tv, "validation sample_weight")
            val = (xv, tv, wv)
        if class_weight is not None:  # the training samples only: validation keeps its own weights
            weights = self.check_sample_weight(None if weights is None else to_numpy(weights), class_weight, t)
        n = t.shape[0]
        dist = self.distribution
        self.refresh_parameters()
        if dist is None:
            with self._share_processes():
                return self._fit_epochs(xs, t, weights, val, n, batch_size, epochs, initial_epoch, shuffle, verbose,
                                        callbacks)
        self.build_optimizer()
        dist.check_same(self._distributed_facts(xs, t, weights, val, batch_size, epochs, initial_epoch, shuffle))
        dist.synchronize(self)
        with dist.training(self):
            return self._fit_epochs(xs, t, weights, val, n, batch_size, epochs, initial_epoch, shuffle, verbose,
                                    callbacks)

    @contextlib.contextmanager
    def _share_processes(self):
        """Inside the block (a fit without data parallelism), split CPU training batches run their
        second share in a worker process where that works (tinycnn.share_process)."""
        settings = config.settings()
        if (self.backend.kernels.name != "cpu" or not settings.share_processes or settings.step != "eager"
                or share_process.usable() is not None):  # a static step's buffers and keys stay in threads
            yield
            return
        self._fit_shares = share_process.FitShares()
        try:
            yield
        finally:
            self._fit_shares.close()
            self._fit_shares = None

    def _fit_epochs(self, xs, t, weights, val, n, batch_size, epochs, initial_epoch, shuffle, verbose, callbacks):
        dist = self.distribution
        chief = dist is None or dist.is_chief
        history = callbacks_module.History()
        shown = self.metrics_names + (["val_" + m for m in self.metrics_names] if val else [])
        cbs = callbacks_module.CallbackList(
            self._for_this_rank(([callbacks_module.ProgbarLogger(verbose)] if verbose else []) + callbacks)
            + [history],
            self, {"epochs": epochs, "samples": n, "batch_size": batch_size, "verbose": verbose, "metrics": shown,
                   "do_validation": val is not None, "steps": -(-n // batch_size)})
        if verbose and chief and dist is not None:
            shares = "-".join(map(str, sorted({batch_size // dist.size, -(-batch_size // dist.size)})))
            sys.stdout.write(f"{dist.describe()}\nglobal batch {batch_size} = {dist.size} ranks x {shares} samples\n")
        if verbose and chief and val is not None:
            sys.stdout.write("Train on %d samples, validate on %d samples\n" % (n, val[1].shape[0]))
        self.stop_training = False
        static = self._static_training(xs, t, weights, n, batch_size)
        start_scale, self._growth_warned = self._largest_weight(), False
        cbs.call("on_train_begin", {})
        for epoch in range(int(initial_epoch), epochs):
            shuffle_seed = self.seed_random_streams(epoch)
            order = self.backend.permutation(n, shuffle_seed) if shuffle else self.xp.arange(n)
            cbs.call("on_epoch_begin", epoch, {})
            metrics = self.epoch_metrics()
            if static is not None:
                static.begin_epoch(order, metrics)
            started = time.perf_counter()
            for batch, start in enumerate(range(0, n, batch_size)):
                cbs.on_train_batch_begin(batch)
                if static is not None:  # the batch's rows are picked on the device (tinycnn.static_step)
                    static.step(start, min(batch_size, n - start))
                else:
                    idx = order[start : start + batch_size]
                    global_batch = None
                    if dist is not None:  # this rank's share of the global batch
                        global_batch = idx.shape[0]
                        first, (idx,) = self._shard([idx])
                        dist.place_batch(self, first)
                    tb = t[idx]
                    wb = None if weights is None else weights[idx]
                    predictions, batch_sum = self.train_step([a[idx] for a in xs], tb, wb, global_batch)
                    metrics.add(batch_sum, predictions, tb, wb)
                cbs.on_train_batch_end(batch, metrics.running)
                self._agree_on_stopping()
                if self.stop_training:
                    break
            if dist is not None:
                metrics.sum_over_ranks(dist.sum_, self.xp)
                dist.average_statistics(self)
            logs = metrics.averages()
            if not np.isfinite(logs["loss"]) and not self.stop_training:  # else a callback (TerminateOnNaN) stopped it
                self.history = history
                cbs.call("on_train_end", logs)  # callbacks close their files first
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1}: the loss is {logs['loss']} "
                    "(lower the learning rate, or check the inputs' scale; "
                    "callbacks=[tinycnn.callbacks.TerminateOnNaN()] stops instead of raising)"
                )
            if not self.stop_training:
                self._check_weights(epoch, start_scale, history, cbs, logs)
            logs["seconds"] = time.perf_counter() - started
            if val is not None:
                cbs.call("on_test_begin", {})
                val_logs = self._evaluate_arrays(val[0], val[1], val[2], batch_size, callbacks=cbs,
                                                 shared=True).averages("val_")
                cbs.call("on_test_end", {k[4:]: v for k, v in val_logs.items()})
                logs.update(val_logs)
            cbs.call("on_epoch_end", epoch, logs)
            self._agree_on_stopping()
            if self.stop_training:
                break
        cbs.call("on_train_end", {})
        self.history = history
        return history

    def _static_training(self, xs, t, weights, n, batch_size):
        """The static steps of this fit (tinycnn.static_step) when the `step` setting asks for them
        and the model and inputs allow them; None for eager steps (with a notice when asked)."""
        mode = config.settings().step
        if mode == "eager":
            return None
        problem = static_step.static_problem(self, weights)
        if problem is not None:
            static_step.notice(problem)
            return None
        return static_step.StaticTraining(self, xs, t, n, batch_size, capture=mode == "graphs")

    # How far the largest trainable weight may grow during one fit before it is reported: no
    # sound training multiplies its largest weight by a million; an exploding learning rate does.
    WEIGHT_GROWTH_WARNING = 1e6

    def _largest_weight(self):
        return float(self.xp.abs(self.params.params).max()) if self.params.size else 0.0

    def _check_weights(self, epoch, start_scale, history, cbs, logs):
        """After each epoch: a weight that is no longer finite ends training with a divergence
        report (even when the loss still looks finite); one that grew more than a millionfold
        since fit began is reported as a warning."""
        for layer in self.compute_layers:
            for name, value in layer.weights.items():
                if not bool(self.xp.isfinite(value).all()):
                    self.history = history
                    cbs.call("on_train_end", logs)
                    raise FloatingPointError(
                        f"training diverged in epoch {epoch + 1}: weight {name!r} of layer {layer.name} holds NaN or "
                        "infinite values (lower the learning rate, or check the inputs' scale)")
        largest = self._largest_weight()
        if largest > self.WEIGHT_GROWTH_WARNING * max(start_scale, 1.0) and not self._growth_warned:
            import warnings

            self._growth_warned = True
            warnings.warn(f"epoch {epoch + 1}: the largest trainable weight reached {largest:.3g} (it was "
                          f"{start_scale:.3g} when fit began): training is probably diverging; lower the learning "
                          "rate", RuntimeWarning, stacklevel=3)

    # -- evaluate / predict ---------------------------------------------------------------------------------
    def _inference_batches(self, plan, n, batch_size):
        """(the starts of the batches, their size): on the CPU at most CPU_INFERENCE_BATCH rows
        for each thread a batch is split between (tinycnn.batch_split)."""
        if self.backend.name == "cpu" and min(n, batch_size) > self.CPU_INFERENCE_BATCH:
            largest = self.CPU_INFERENCE_BATCH * batch_split.SHARES
            if self._batch_shares(plan, largest) is None:
                largest = self.CPU_INFERENCE_BATCH
            batch_size = min(batch_size, largest)
        return range(0, n, batch_size), batch_size

    def _shard(self, arrays):
        """Under data parallelism: (where this rank's share starts, its contiguous share of the rows of
        each array; None stays None)."""
        first, stop = self.distribution.shard(next(a for a in arrays if a is not None).shape[0])
        return first, [None if a is None else a[first:stop] for a in arrays]

    def _agree_on_stopping(self):
        """Under data parallelism, a callback that stopped training on one rank (rank 0's checkpoint
        writer, say) stops every rank: else the others would wait for it in the next collective."""
        if self.distribution is not None:
            self.stop_training = self.distribution.any(self.stop_training)

    def _quiet_unless_chief(self, verbose):
        """Keras's verbose, checked; 0 on the ranks other than rank 0 (which alone prints)."""
        verbose = _auto(verbose)
        return verbose if self.distribution is None or self.distribution.is_chief else 0

    def _evaluate_arrays(self, xs, t, weights, batch_size, exact_batch=False, callbacks=None, shared=False):
        """The loss and metrics over the arrays, batch by batch in inference mode. `shared`: under
        data parallelism each rank evaluates its share and the sums are summed over the ranks."""
        shared = shared and self.distribution is not None
        if shared:
            _, (*xs, t, weights) = self._shard([*xs, t, weights])
        plan = self._loss_plan()
        logits = plan.emits_logits or self.loss.from_logits
        metrics = self.epoch_metrics()
        starts, batch_size = (range(0, t.shape[0], batch_size), batch_size) if exact_batch else \
            self._inference_batches(plan, t.shape[0], batch_size)
        for batch, start in enumerate(starts):
            if callbacks is not None:
                callbacks.on_batch("on_test_batch_begin", batch)
            tb = t[start : start + batch_size]
            (out,) = self._inference_forward(plan, [a[start : start + batch_size] for a in xs])
            predictions, per_sample, _ = self.loss.compute(out, tb, logits, self.backend.kernels)
            wb = None if weights is None else weights[start : start + batch_size]
            batch_sum = per_sample.sum() if wb is None else (per_sample * wb).sum()
            penalty = self.params.regularization_penalty()
            if penalty is not None:
                batch_sum = batch_sum + penalty * tb.shape[0]
            metrics.add(batch_sum, predictions, tb, wb)
            if callbacks is not None:
                callbacks.on_batch("on_test_batch_end", batch, metrics.running)
        if shared:
            metrics.sum_over_ranks(self.distribution.sum_, self.xp)
        return metrics

    @exclusive
    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, return_dict=False,
                 callbacks=None):
        """``[loss, *metrics]`` in inference mode (a dict with return_dict=True), like Keras. Compiled
        with a `distribution`, each rank evaluates its share and every rank returns the totals."""
        with self._collective():
            return self._evaluate(x, y, batch_size, verbose, sample_weight, return_dict, callbacks)

    def _evaluate(self, x, y, batch_size, verbose, sample_weight, return_dict, callbacks):
        self._require_compiled("evaluate")
        batch_size = _batch_size(batch_size)
        verbose = self._quiet_unless_chief(verbose)
        xs = self.check_inputs(x)
        t = self.check_targets(y, xs[0].shape[0])
        weights = self.check_sample_weight(sample_weight, None, t)
        cbs = callbacks_module.CallbackList(self._for_this_rank(_callbacks(callbacks)), self,
                                            {"verbose": verbose, "samples": t.shape[0]})
        cbs.call("on_test_begin", {})
        bar = callbacks_module.Progbar(t.shape[0], verbose=verbose) if verbose else None
        values = self._evaluate_arrays(xs, t, weights, batch_size, callbacks=cbs, shared=True).averages()
        if bar is not None:
            bar.update(t.shape[0], lambda: values, finalize=True)
        cbs.call("on_test_end", dict(values))
        return _result(values, return_dict)

    @exclusive
    def predict(self, x, batch_size=None, verbose="auto", callbacks=None):
        """Outputs in inference mode as NumPy arrays (a list for a model with several outputs).
        Compiled with a `distribution`, each rank predicts its share and every rank returns all rows."""
        with self._collective():
            return self._predict(x, batch_size, verbose, callbacks)

    def _predict(self, x, batch_size, verbose, callbacks):
        dist = self.distribution
        batch_size = _batch_size(batch_size)
        verbose = self._quiet_unless_chief(verbose)
        xs = self.check_inputs(x)
        n = xs[0].shape[0]
        if dist is not None:
            _, xs = self._shard(xs)
        cbs = callbacks_module.CallbackList(self._for_this_rank(_callbacks(callbacks)), self,
                                            {"verbose": verbose, "samples": n})
        cbs.call("on_predict_begin", {})
        plan = self.plan()
        outs = [[] for _ in self.outputs]
        starts, batch_size = self._inference_batches(plan, xs[0].shape[0], batch_size)
        bar = callbacks_module.Progbar(n, verbose=verbose) if verbose else None
        for batch, start in enumerate(starts):
            cbs.on_batch("on_predict_batch_begin", batch)
            results = self._inference_forward(plan, [a[start : start + batch_size] for a in xs])
            for collected, out in zip(outs, results):
                collected.append(to_numpy(out))
            cbs.on_batch("on_predict_batch_end", batch, lambda: {"outputs": results[0] if self.single_output
                                                                  else results})
        if bar is not None:
            bar.update(n, lambda: {}, finalize=True)
        cbs.call("on_predict_end", {})
        joined = [np.concatenate(parts) if parts else np.empty((0,) + tuple(tensor.shape[1:]), dtype=self.dtype)
                  for parts, tensor in zip(outs, self.outputs)]
        if dist is not None:
            joined = [dist.gather(part) for part in joined]
        return joined[0] if self.single_output else joined
