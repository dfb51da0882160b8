"""fit's training step with static buffers and device-side counters, so that a GPU can capture it.

The `step` setting (`TINYCNN_STEP`, tinycnn.config) chooses how `fit` runs its training steps:

- `eager` (the default): each step hands the host's values to its kernels: the batch's rows, the
  dropout seeds, Adam's step size.
- `static`: the same step with nothing in it that changes from one step to the next, on any
  backend (CI runs it on NumPy). For batches of B rows it
  1. gathers its batch into static buffers on the device: the step counter picks its row of
     the epoch's shuffled order (copied into a static buffer when the epoch starts), and that
     row picks the samples of x and y;
  2. computes every Dropout's mask key on the device from the layers' seeds for the epoch and
     the step counter (the kernel entry `dropout_keys`: the keys of the seeds an eager step
     draws on the host, tinycnn.randomness.call_seed);
  3. runs forward, loss and backward as the eager step does;
  4. advances Adam's bias powers and step size in device buffers, then updates the weights;
  5. adds the loss and metric sums into device accumulators, and one to the step counter.
  The host keeps its own counts (Dropout calls, optimizer iterations, samples seen) without
  reading the device, and writes the device only between steps: the order and the layers'
  seeds when an epoch starts, the learning rate when it changes.
- `graphs`: static, and on the GPU each batch size's step (the full batch and the epoch's last,
  smaller one) runs eagerly once on a stream and a memory pool of its own (the warm-up: kernels
  compile, the pool fills), is captured as a CUDA graph at its second run, and replayed from
  then on. Elsewhere it is `static`.

A static step gives the eager step's results bit for bit (tested on NumPy with the reference, the
CPU and the GPU kernel sets). It needs Adam without clipping or weight decay, no sample or class
weights, no data parallelism, and tinycnn's own layers, loss and metrics (or custom ones that
declare `static_safe = True`: nothing they compute in a training step comes from the host and
changes from step to step); `fit` falls back to the eager step otherwise and says why. A layer
frozen or unfrozen during fit makes the steps warm up (and capture) anew, as it makes the eager
step start a fresh optimizer state.

NOTE: the capture and replay have not run on a GPU yet (no GPU was available while this was written).
"""
import contextlib
import sys

from . import randomness
from .optimizers import Adam
from .randomness import MASK64, DeviceKey


def static_problem(trainer, weights):
    """Why fit cannot run static steps for this model and these inputs (None if it can)."""
    opt = trainer.optimizer
    if trainer.distribution is not None:
        return "data parallelism runs eager steps"
    if weights is not None:
        return "sample or class weights need the eager step"
    if not isinstance(opt, Adam) or opt.weight_decay or opt.clipnorm or opt.clipvalue or opt.global_clipnorm:
        return "the static step supports Adam without clipping or weight decay"
    parts = [(layer.name, layer) for layer in trainer.compute_layers]
    parts += [(f"loss {type(trainer.loss).__name__}", trainer.loss)]
    parts += [(f"metric {metric.name}", metric) for metric in trainer.metrics]
    custom = [name for name, part in parts
              if not type(part).__module__.startswith("tinycnn.") and not getattr(part, "static_safe", False)]
    if custom:  # they might take host values (random numbers, say) that a captured graph would freeze
        return (f"custom {', '.join(custom)} may take values from the host each step (set the class attribute "
                "static_safe = True on one that does not)")
    return None


class AdamState:
    """Adam's learning rate, bias powers and step size in device buffers: the host writes the rate
    when it changes (between steps); each step multiplies the powers by the betas and computes
    lr_t = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) there, in the eager step's order of float64
    operations (Adam.update), so the two agree to the bit."""

    def __init__(self, xp, optimizer):
        self.xp, self.optimizer = xp, optimizer
        f64 = xp.float64
        self.betas = xp.asarray([optimizer.beta_1, optimizer.beta_2], dtype=f64)
        self.powers = xp.asarray(optimizer.bias_powers(optimizer.iterations), dtype=f64)
        self.lr, self.lr_t = xp.zeros(1, dtype=f64), xp.zeros(1, dtype=f64)
        self._a, self._b = xp.zeros(1, dtype=f64), xp.zeros(1, dtype=f64)
        self._written = None

    def set_learning_rate(self, lr):
        if lr != self._written:
            self.lr.fill(lr)
            self._written = lr

    def advance(self):
        xp = self.xp
        xp.multiply(self.powers, self.betas, out=self.powers)
        xp.subtract(1.0, self.powers[1:2], out=self._a)
        xp.sqrt(self._a, out=self._a)
        xp.multiply(self.lr, self._a, out=self._a)
        xp.subtract(1.0, self.powers[0:1], out=self._b)
        xp.divide(self._a, self._b, out=self.lr_t)


class DropoutKeyTable:
    """Where a static step's Dropout layers find their mask keys: one slot per (layer, call in the
    step). The first run of the step learns the slots and hands out the host's seeds; from then on
    the keys are computed on the device each step, slot k from
    call_seed(bases[k], offsets[k] + step * calls[k]) (kernel entry dropout_keys)."""

    def __init__(self, layers):
        self._layers = {id(layer) for layer in layers}  # the model's: another model's Dropout draws as always
        self.slots = []  # (layer, j): the j-th call of `layer` in a step, in call order
        self.keys = None  # device uint32 keys, one per slot, once the slots are known
        self.counts = {}  # {layer: its calls in one step}, once the slots are known
        self._index = {}
        self._calls = {}

    def start_step(self):
        self._calls = {}

    def serves(self, layer):
        return id(layer) in self._layers

    def key_for(self, layer):
        j = self._calls.get(id(layer), 0)
        self._calls[id(layer)] = j + 1
        if self.keys is None:  # the first run: the eager step's seed (the layer counts its calls after the step)
            self.slots.append((layer, j))
            state = layer.random_state()
            return randomness.call_seed(state["base"], state["calls"] + j)
        if (id(layer), j) not in self._index:
            raise RuntimeError(f"static step: layer {layer.name!r} drew more masks than in its first run; "
                               "run fit with TINYCNN_STEP=eager")
        return DeviceKey(self.keys, self._index[(id(layer), j)])

    def freeze(self, xp, step):
        """After the first run: device buffers for the slots, placed for the step counter's `step`."""
        self._index = {(id(layer), j): k for k, (layer, j) in enumerate(self.slots)}
        for layer, _ in self.slots:
            self.counts[layer] = self.counts.get(layer, 0) + 1
        self.calls = xp.asarray([self.counts[layer] for layer, _ in self.slots], dtype=xp.uint64)
        self.bases = xp.zeros(len(self.slots), dtype=xp.uint64)
        self.offsets = xp.zeros(len(self.slots), dtype=xp.uint64)
        self.keys = xp.zeros(len(self.slots), dtype=xp.uint32)
        self.place(xp, step)

    def place(self, xp, step):
        """Write the layers' seeds and call offsets for `step`, the step counter's value at the next
        step to run, given the calls each layer has counted so far: slot (layer, j) of step s >= step
        is call number counted + (s - step) * calls + j. Between steps only (an epoch's start; the
        first run, whose own calls the layers count after it)."""
        if self.keys is None or not self.slots:
            return
        bases, offsets = [], []
        for layer, j in self.slots:
            state = layer.random_state()
            bases.append(state["base"] & MASK64)
            offsets.append((state["calls"] - step * self.counts[layer] + j) & MASK64)
        self.bases[...] = xp.asarray(bases, dtype=xp.uint64)
        self.offsets[...] = xp.asarray(offsets, dtype=xp.uint64)


class CudaGraph:
    """Runs a step's body on a CUDA stream and memory pool of its own: eagerly the first time (the
    warm-up: kernels compile, the pool fills), captured as a graph the second time and launched,
    and replayed from then on. The caller's stream waits for it, so whatever reads the results
    afterwards (metrics, callbacks) sees them."""

    def __init__(self, cp):
        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()  # only this step allocates from it: nothing else reuses its blocks
        self.graph = None
        self.runs = 0
        self._before, self._after = (cp.cuda.Event(disable_timing=True) for _ in range(2))

    def run(self, body):
        cp = self.cp
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record(self._before))
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            if self.runs == 0:
                body()
            elif self.graph is None:
                self.stream.begin_capture()
                try:
                    body()
                except BaseException:
                    with contextlib.suppress(Exception):  # the body's error is the one to see
                        self.stream.end_capture()
                    raise
                self.graph = self.stream.end_capture()
                self.graph.launch(self.stream)
            else:
                self.graph.launch(self.stream)
        caller.wait_event(self.stream.record(self._after))
        self.runs += 1


class StaticStep:
    """The static step for batches of `rows` rows: the full batch (its rows picked by the step
    counter) or the epoch's last, smaller batch (`tail_start`: where its rows start in the order)."""

    def __init__(self, training, rows, tail_start=None):
        xp = training.xp
        self.training, self.rows, self.tail_start = training, rows, tail_start
        self.inputs = [xp.empty((rows,) + a.shape[1:], dtype=a.dtype) for a in training.xs]
        self.targets = xp.empty((rows,) + training.targets.shape[1:], dtype=training.targets.dtype)
        self.row_index = xp.empty((1, rows), dtype=xp.int64)
        self.keys = DropoutKeyTable(training.trainer.compute_layers)
        self.graph = CudaGraph(xp) if training.capture else None

    def body(self):
        tr = self.training
        xp, trainer = tr.xp, tr.trainer
        if self.tail_start is None:  # row `step` of the order, seen as (full batches, rows)
            whole = tr.order[: tr.full_batches * self.rows].reshape(tr.full_batches, self.rows)
            xp.take(whole, tr.step_counter, axis=0, out=self.row_index)
            index = self.row_index[0]
        else:
            index = tr.order[self.tail_start :]
        for source, static in zip(tr.xs, self.inputs):
            xp.take(source, index, axis=0, out=static)
        xp.take(tr.targets, index, axis=0, out=self.targets)
        if self.keys.keys is not None:
            self._compute_keys()
        self.keys.start_step()
        with randomness.static_keys(self.keys):  # StaticTraining built the optimizer before the step
            predictions, batch_sum = trainer.forward_backward(self.inputs, self.targets)
        trainer.optimizer.static_update(trainer.params.params, trainer.params.grads, tr.adam)
        tr.accumulate(batch_sum, predictions, self.targets)
        xp.add(tr.step_counter, 1, out=tr.step_counter)

    def _compute_keys(self):
        if self.keys.slots:
            tr = self.training
            tr.trainer.backend.kernels.dropout_keys(self.keys.bases, self.keys.offsets, self.keys.calls,
                                                    tr.step_counter.view(tr.xp.uint64), self.keys.keys)

    def run(self):
        tr = self.training
        tr.adam.set_learning_rate(tr.trainer.optimizer.current_learning_rate())
        first = self.keys.keys is None
        if self.graph is None:
            self.body()
        else:
            self.graph.run(self.body)
        if first:
            self.keys.freeze(tr.xp, tr.step_host)
            self._compute_keys()  # once outside any capture: its kernel compiles before the capture
        for layer, calls in self.keys.counts.items():  # the host's counts, kept in step
            layer.count_calls(calls)
        tr.trainer.optimizer.iterations += 1
        tr.metrics.count(self.rows)
        tr.step_host += 1


class StaticTraining:
    """fit's static steps for one call of fit: the device counters and buffers the steps share."""

    def __init__(self, trainer, xs, targets, n, batch_size, capture):
        xp = trainer.xp
        trainer.build_optimizer()  # before AdamState reads its iterations
        self.trainer, self.xp, self.xs, self.targets = trainer, xp, xs, targets
        self.batch_size, self.full_batches = batch_size, n // batch_size
        self.capture = capture and trainer.backend.name == "gpu"
        self.order = xp.empty(n, dtype=xp.int64)
        self.step_counter = xp.zeros(1, dtype=xp.int64)  # steps run in this epoch, on the device
        self.step_host = 0  # the same count, on the host
        self.adam = AdamState(xp, trainer.optimizer)
        self.steps = {}
        self.metrics = None
        self.sums = None  # device accumulators: [loss sum, each metric's sum], made by the first step
        self._seen = None  # (parameter buffer, optimizer iterations) after the last step

    def begin_epoch(self, order, metrics):
        self.order[...] = order
        self.step_counter[...] = 0
        self.step_host = 0
        for step in self.steps.values():
            step.keys.place(self.xp, 0)
        self.metrics = metrics
        if self.sums is not None:
            for total in self.sums:
                total[...] = 0
            metrics.bind_device_sums(self.sums[0], self.sums[1:])

    def step(self, start, rows):
        self._follow_the_model()
        key = rows if start + rows <= self.full_batches * self.batch_size else ("tail", rows)
        if key not in self.steps:
            self.steps[key] = StaticStep(self, rows, None if key == rows else start)
        self.steps[key].run()
        self._seen = (self.trainer.params.params, self.trainer.optimizer.iterations)

    def _follow_the_model(self):
        """A layer frozen or unfrozen since the last step (a new parameter buffer, and a fresh
        optimizer state for it, as the eager step makes them), or the optimizer's state set: the
        steps built on the old buffers go, captured graphs included, and Adam's device state is
        read again, so the next steps warm up and capture anew."""
        trainer = self.trainer
        trainer.refresh_parameters()
        trainer.build_optimizer()
        if self._seen is not None and (trainer.params.params is not self._seen[0]
                                       or trainer.optimizer.iterations != self._seen[1]):
            self.steps = {}
            self.adam = AdamState(self.xp, trainer.optimizer)

    def accumulate(self, batch_sum, predictions, targets):
        """Adds the step's loss sum and metric sums into the device accumulators, in the order and
        the dtypes of the eager step's running sums (training.EpochMetrics.add)."""
        kernels, metrics = self.trainer.backend.kernels, self.metrics.metrics
        if self.sums is None:  # the first run: accumulators of the eager sums' dtypes
            values = [batch_sum] + [metric.total(predictions, targets, kernels) for metric in metrics]
            self.sums = [self.xp.zeros((), dtype=(0 + value).dtype) for value in values]
            self.metrics.bind_device_sums(self.sums[0], self.sums[1:])
            for total, value in zip(self.sums, values):
                total += value
            return
        self.sums[0] += batch_sum
        for total, metric in zip(self.sums[1:], metrics):
            metric.accumulate(total, predictions, targets, kernels)  # in place (the accuracy: its kernel)


def notice(reason):
    print(f"tinycnn: fit runs eager steps: {reason}", file=sys.stderr)
