"""The second share of a split CPU training batch runs in a process of its own during `fit`.

Why: a split batch (tinycnn.batch_split) runs its two shares in two threads of one process, which
meet at every BatchNormalization (the whole batch's statistics, forward and backward: 14 meetings
a Week2 step). After each meeting both threads run the same Python glue at the same moment, and
one waits for the GIL while the other holds it. On a 2-vCPU Zen 3 guest one share alone took
20.6 ms, two processes at once 20.6 each, but the split step 25.4-27.2 ms
(benchmarks/results/cpu_round2.md). A process has its own GIL.

How: when `fit` has run one training step with threads (so every kernel the shares need is
compiled and is inherited), it forks a worker that lives until `fit` ends. For each training
step the parent copies the worker's share of the batch and the current weights into memory both
processes map (an anonymous shared mmap made before the fork) and runs its own share; the worker
runs the second share exactly as the second thread would (`Model.share_step`, on one numba thread),
and leaves its predictions, loss sum and weight gradients in the shared memory. Their meetings
are batch_split's (`ProcessSplit` stands in for its thread split): BatchNormalization's sums go
through slots in the shared memory and are added in share order, and the Dropout seeds are
the parent's draws, read by the worker in order. So the step's results are the thread split's
bit for bit; the parent alone applies the optimizer, runs callbacks, validates and prints.

The worker reads only what a training step reads: the weights being trained, its rows, and the
model as it was at the fork. `fit` forks again when the plan, the trainable weights or a batch's
shapes change; a callback that changes other state in the middle of an epoch (a frozen layer's
weights, a Dropout rate) is seen by the worker at the next fork only. `TINYCNN_SHARE_PROCESSES=0`
keeps both shares in threads.

Where it runs: Linux on x86-64 (the handshakes are plain stores and loads in shared memory, in
order under x86's memory model), on the numba CPU backend, with two or more usable cores, in
`fit` without data parallelism. If the worker fails, the parent raises its traceback; if the
parent fails or is interrupted, it kills the worker; a worker whose parent is gone exits.
"""
import gc
import mmap
import os
import platform
import signal
import sys
import time
import traceback
import warnings

import numpy as np

from . import batch_split, blas_threads
from .errors import ShareProcessError

# The control words (int64) at the start of the shared memory.
CMD, DONE, RED_0, RED_1, SEEDS, STATUS, ROWS, START, TOTAL, LOSS_KIND = range(10)
CONTROL_WORDS = 16
SLOT_BYTES = 1 << 20  # one share's part of one reduction (BatchNorm sums: a few values per channel)
SEED_SLOTS = 4096  # Dropout seeds a step may draw
ERROR_BYTES = 1 << 16
# A wait polls SPIN times (1-2 ms: a meeting inside a step is shorter), then sleeps NAP between
# polls, and after NAPS of those (a worker waiting while the parent validates) LONG_NAP.
SPIN, NAP, NAPS, LONG_NAP = 20_000, 50e-6, 2_000, 1e-3


def usable():
    """Why share processes cannot run here (a sentence), or None when they can."""
    if not hasattr(os, "fork") or sys.platform != "linux":
        return "share processes need Linux (fork)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return "share processes need x86-64 (their handshakes rely on its memory order)"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if cores < 2:
        return "share processes need two usable cores"
    return None


class _Memory:
    """The shared memory's layout: control words, weights, gradients, the worker's inputs, its
    results, the reduction slots, the seeds and an error message, each a NumPy view."""

    def __init__(self, params, inputs, targets, weights, outputs, rows):
        self._parts, offset = [], 0

        def part(shape, dtype):
            nonlocal offset
            dtype = np.dtype(dtype)
            offset = -(-offset // 64) * 64  # cache-line aligned
            self._parts.append((offset, tuple(shape), dtype))
            offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            return len(self._parts) - 1

        keys = {
            "control": part((CONTROL_WORDS,), np.int64),
            "params": part(params.shape, params.dtype),
            "grads": part(params.shape, params.dtype),
            "inputs": [part((rows,) + a.shape[1:], a.dtype) for a in inputs],
            "targets": part((rows,) + targets.shape[1:], targets.dtype),
            "weights": None if weights is None else part((rows,), weights.dtype),
            "predictions": part((rows,) + outputs[0], outputs[1]),
            "loss": part((1,), np.float64),
            "slots": part((2, 2, SLOT_BYTES), np.uint8),
            "seeds": part((SEED_SLOTS,), np.int64),
            "error": part((ERROR_BYTES,), np.uint8),
        }
        self.buffer = mmap.mmap(-1, max(offset, 1))  # anonymous and shared: both sides of a fork see it

        def view(k):
            start, shape, dtype = self._parts[k]
            return np.frombuffer(self.buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                                 offset=start).reshape(shape)

        for name, k in keys.items():
            setattr(self, name, [view(i) for i in k] if isinstance(k, list) else (None if k is None else view(k)))
        self.rows = rows


class ProcessSplit:
    """batch_split's split state for a share that runs in one of the two processes: its BatchNorm
    sums and Dropout seeds go through the shared memory."""

    def __init__(self, memory, index, peer_alive):
        self.memory, self.index, self.peer_alive = memory, index, peer_alive
        self.reductions = 0
        self.draws = 0

    def wait(self, word, target):
        """Until control word `word` reaches `target`; ShareProcessError if the peer failed."""
        control = self.memory.control
        polls = 0
        while control[word] < target:
            polls += 1
            if polls > SPIN:
                time.sleep(NAP if polls < SPIN + NAPS else LONG_NAP)
                if polls % 200 == 0:
                    self.check_peer()
        if control[STATUS] != 0:
            self.check_peer()

    def check_peer(self):
        control = self.memory.control
        if control[STATUS] != 0:
            text = bytes(self.memory.error[: int(control[STATUS])]).decode("utf-8", "replace")
            raise ShareProcessError(f"the process training the batch's second share failed:\n{text}")
        if not self.peer_alive():
            raise ShareProcessError("the process training the batch's other share is gone")

    def reduce(self, array):
        """Sum `array` over the two shares in share order, in place (batch_split's reduce)."""
        memory = self.memory
        slots = memory.slots[self.reductions % 2]
        self.reductions += 1
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        if raw.size > SLOT_BYTES:
            raise ShareProcessError(f"a reduction of {raw.size} bytes is over the share slots' {SLOT_BYTES}")
        slots[self.index, : raw.size] = raw
        memory.control[RED_0 + self.index] = self.reductions  # published after its data (x86 store order)
        self.wait(RED_0 + 1 - self.index, self.reductions)
        parts = [slots[k, : raw.size].view(array.dtype).reshape(array.shape) for k in range(2)]
        total = parts[0].copy()
        total += parts[1]
        array[...] = total
        return array

    def abort(self):
        """Nothing to release here: a failing worker reports through STATUS, and the parent kills
        the worker when its own share fails (FitShares)."""

    def seed(self, layer, draw):
        """The step's next Dropout seed: the parent draws it and publishes it, the worker reads it
        (both draw in the same order: the same plan)."""
        memory, k = self.memory, self.draws
        self.draws += 1
        if k >= SEED_SLOTS:
            raise ShareProcessError(f"a training step drew more than {SEED_SLOTS} Dropout seeds")
        if self.index == 0:
            value = draw()
            memory.seeds[k] = value
            memory.control[SEEDS] = k + 1
            return value
        self.wait(SEEDS, k + 1)
        return int(memory.seeds[k])


class ShareProcess:
    """A forked worker that trains the second share of each split batch of one model's `fit`."""

    def __init__(self, model, plan, inputs, targets, weights, rows, predictions):
        """Fork the worker for batches whose second share has at most `rows` rows and the shapes
        and dtypes of `inputs`, `targets` and `weights` (a batch's arrays); `predictions`: (shape of
        a row, dtype) of the plan's output."""
        self.params = model.params
        self.key = self._key(model, plan, inputs, targets, weights)
        self.memory = _Memory(self.params.params, inputs, targets, weights, predictions, rows)
        self.sequence = 0
        for stream in (sys.stdout, sys.stderr):  # else the worker holds a copy of what is unwritten
            if stream is not None:
                stream.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a process with threads may deadlock the child: a lock
            # another thread held at the fork stays held there. The worker takes none of the other
            # threads' locks: it runs kernels that are compiled, NumPy, and this module.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the worker: never returns
            _serve(model, plan, self.memory, os.getppid())
        self.pid = pid

    @staticmethod
    def _key(model, plan, inputs, targets, weights):
        from .layers.base import trainable_version

        return (id(plan), id(model.params), model.params.size, trainable_version(),
                tuple((a.shape[1:], a.dtype.str) for a in inputs), (targets.shape[1:], targets.dtype.str),
                None if weights is None else weights.dtype.str)

    def fits(self, model, plan, inputs, targets, weights, share_rows):
        return (self.pid is not None and share_rows <= self.memory.rows
                and self._key(model, plan, inputs, targets, weights) == self.key)

    def alive(self):
        if self.pid is None:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if done:
            self.pid = None
        return done == 0

    def step(self, shares, inputs, targets, weights, n, work):
        """Run a split training step: share 0 here through `work` (as batch_split.run would), share 1
        in the worker. Returns [(predictions, loss sum) of share 0, of share 1] and the worker's
        weight gradients (a view of the shared memory, valid until the next step)."""
        memory, control = self.memory, self.memory.control
        (start0, stop0), (start1, stop1) = shares
        rows = stop1 - start1
        memory.params[...] = self.params.params
        for buffer, x in zip(memory.inputs, inputs):
            buffer[:rows] = x[start1:stop1]
        memory.targets[:rows] = targets[start1:stop1]
        if weights is not None:
            memory.weights[:rows] = weights[start1:stop1]
        control[RED_0] = control[RED_1] = control[SEEDS] = 0
        control[ROWS], control[START], control[TOTAL] = rows, start1, n
        self.sequence += 1
        control[CMD] = self.sequence  # last: the worker starts when it sees it
        split = ProcessSplit(memory, 0, self.alive)
        with blas_threads.limited(1):  # the worker has the other core
            own = batch_split.run_share(split, 0, start0, stop0, 1, work)
        split.wait(DONE, self.sequence)
        split.check_peer()
        predictions = memory.predictions[:rows].copy()
        loss = memory.loss[0]
        kind = int(control[LOSS_KIND])
        total = np.asarray(loss, dtype=np.dtype(np.float32 if kind == 4 else np.float64))
        other = (predictions, total if isinstance(own[1], np.ndarray) else total[()])
        return [own, other], memory.grads

    def close(self):
        """Stop the worker (it may be inside a step that will never finish: it is killed)."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = None


def _serve(model, plan, memory, parent):
    """The worker's loop: a step per command, until the parent kills it or is gone. Exits, never returns."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills us
        gc.freeze()  # the inherited objects stay where they are: no copy-on-write from collections
        import numba

        numba.set_num_threads(1)
        blas_threads.set_count(1)
        params = model.params
        sink = params.gradient_share_into(memory.grads)
        control = memory.control
        split = ProcessSplit(memory, 1, lambda: os.getppid() == parent)
        done = 0
        while True:
            split.wait(CMD, done + 1)  # raises when the parent is gone; the parent ends us with SIGKILL
            done = int(control[CMD])
            rows, start, n = int(control[ROWS]), int(control[START]), int(control[TOTAL])
            params.params[...] = memory.params
            inputs = [buffer[:rows] for buffer in memory.inputs]
            targets = memory.targets[:rows]
            weights = None if memory.weights is None else memory.weights[:rows]
            split.reductions = split.draws = 0

            def work(k, a, b):
                return model.share_step(plan, inputs, targets, weights, n, sink)

            predictions, total = batch_split.run_share(split, 1, start, start + rows, 1, work)
            memory.predictions[:rows] = predictions
            total = np.asarray(total)
            memory.loss[0] = float(total)
            control[LOSS_KIND] = total.dtype.itemsize
            control[DONE] = done
    except BaseException:  # noqa: B036 - told to the parent, which raises it
        text = traceback.format_exc().encode("utf-8", "replace")[-ERROR_BYTES:]
        memory.error[: len(text)] = np.frombuffer(text, dtype=np.uint8)
        memory.control[STATUS] = len(text)
        status = 1
    finally:
        os._exit(status)


class FitShares:
    """The share processes of one `fit`: its first split step runs in threads (compiling whatever
    the shares need, before any fork), later ones through a ShareProcess, forked again when a
    batch does not fit the one running."""

    def __init__(self):
        self.worker = None
        self.predictions = None  # (shape of a row, dtype) of the plan's output, from a thread step

    def run(self, model, plan, shares, inputs, targets, weights, n, work):
        """A split training step: [(predictions, loss sum) per share] and the weight gradients of
        the shares after the first, each in the model's flat layout."""
        rows = shares[1][1] - shares[1][0]
        if self.predictions is None or len(shares) != 2:
            results = batch_split.run(shares, work)
            self.predictions = (results[0][0].shape[1:], results[0][0].dtype)
            return results, model.params.share_gradients(len(shares))
        if self.worker is None or not self.worker.fits(model, plan, inputs, targets, weights, rows):
            self.close()
            self.worker = ShareProcess(model, plan, inputs, targets, weights, max(rows, shares[0][1]),
                                       self.predictions)
        try:
            results, grads = self.worker.step(shares, inputs, targets, weights, n, work)
        except BaseException:
            self.close()  # the worker may be inside the step: it cannot be reused
            raise
        return results, [grads]

    def close(self):
        if self.worker is not None:
            self.worker.close()
            self.worker = None
