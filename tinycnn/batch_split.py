"""Splitting a CPU batch between threads: each of SHARES threads runs the whole network on its
contiguous share of the batch, with single-threaded kernels: forward and backward in training,
forward in `predict` and `evaluate`.

Why: most of a Week2 step's kernels are too small to gain from two threads each (conv3 to conv8,
BatchNormalization: 0.3-1.3x on two threads), and the NumPy glue between them runs on one core.
Two threads that each run half the batch keep both cores busy through all of it. Week2 at batch
128 on 2-vCPU AVX-512 KVM guests (numba 0.68, NumPy 2.4; figures in
benchmarks/results/cpu_round2.md): a training step took 26.2-26.4 ms with every kernel on two
threads and 21.7 split on one quiet host, and 38.2 against 35.6 ms (medians, interleaved) on a
busier one whose hypervisor took 16 % of the time; predict over 10,000 images 0.88 -> 0.65 s.
The numba kernels release the GIL, so the threads run in parallel.

The split changes nothing a user can see but the time, and in training the float round-off:
- BatchNormalization normalizes with the statistics of the whole batch: its kernels sum their
  moments and gradient sums over the shares with `reduce` (the hook synchronized BatchNorm uses
  across ranks), in share order. One share (the lead) updates the moving statistics.
- Dropout draws each mask at the sample's position in the whole batch, with one seed per layer
  call that every share reads: the masks of the unsplit batch.
- Each share's weight gradients go to a buffer of its own; they are summed in share order.
- In inference a sample's output does not depend on the rest of its batch: the same bits.
- Whether and how a batch splits depends on its size and the model alone (SHARES is fixed), never
  on the thread count, so results are the same on any machine. Only the numba CPU backend splits, and
  only graphs of tinycnn's own layers (`Layer.thread_safe`); `TINYCNN_BATCH_SPLIT=0` turns it off.
"""
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from . import blas_threads

SHARES = 2  # fixed: the split must not depend on the machine
MIN_ROWS = 32  # smaller batches run whole (each share would be under 16 samples)...
# ...unless each share of 8 samples or more still brings this many multiply-adds (tinycnn.plan's
# estimate of the forward pass): then the split's per-step costs (the shares' meetings and Python
# glue) are small against the work. The VGG-style network of benchmarks/vgg_scaling.py at W = 16
# (9.9 M per sample), batch 16, fit's steady state, 2-core Zen 3 guest, 2 interleaved rounds:
# 30.6-31.9 ms whole, 12.3-17.7 split (PyTorch 21.7); at W = 64 139-209 -> 123-128 (PyTorch 149).
# Week2 (1.8 M per sample) gains nothing from shares of 8-12 samples (fit per batch of 16: 8.9-9.3
# ms whole, 6.4-8.7 split; train_on_batch 10.1-10.6 against 10.5-13.9; predict with batches of 24:
# 178-180 against 197-252 ms), and stays whole below 32.
SMALL_SHARE_ROWS = 8
SMALL_SHARE_MULTIPLY_ADDS = 40_000_000
# A batch under this many rows runs whole on one numba thread: a parallel region's fork and join
# cost more than its share of so little work. Week2 on a 2-vCPU AVX-512 guest, ms on two threads
# / one: inference of 1 image 1.03 / 0.33, 8 images 1.53 / 0.86, 16 images 2.25 / 2.19; a
# training step of 1 sample 3.8 / 2.6, 8 samples 6.0 / 3.8, 16 samples 7.4 / 8.3. The kernels' sums
# run in the same order on any thread count, so only the time changes.
SERIAL_ROWS = 16


def bounds(rows, sample_multiply_adds=0):
    """[(start, stop)] of each share of a batch of `rows` samples (sizes differ by at most one, the
    larger first), or None when the batch runs whole. `sample_multiply_adds`: the model's forward
    work per sample (tinycnn.plan.Plan.sample_multiply_adds), which lets batches under MIN_ROWS
    split where each share still has enough to do."""
    share = rows // SHARES
    worth_it = share >= SMALL_SHARE_ROWS and share * sample_multiply_adds >= SMALL_SHARE_MULTIPLY_ADDS
    if rows < MIN_ROWS and not worth_it:
        return None
    base, extra = divmod(rows, SHARES)
    out, start = [], 0
    for k in range(SHARES):
        stop = start + base + (k < extra)
        out.append((start, stop))
        start = stop
    return out


@contextlib.contextmanager
def numba_threads(count):
    """`count` numba threads for this thread's kernels inside the block (numba's setting is per
    thread), the previous count after it."""
    import numba

    saved = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


def serial_if_small(rows):
    """A context: one numba thread while a batch of fewer than SERIAL_ROWS rows runs."""
    return numba_threads(1) if rows < SERIAL_ROWS else contextlib.nullcontext()


class _ThreadState(threading.local):
    split = None  # the _Split this thread is a share of, while it runs one
    index = 0
    first_sample = 0
    reductions = 0  # how many reduces this share has made in this split (selects the slot set)
    calls = None  # layer id -> how many seeds this share has asked of that layer in this split


_state = _ThreadState()


def first_sample():
    """Where this thread's share starts in the batch (0 outside a split)."""
    return _state.first_sample if _state.split is not None else 0


def is_lead():
    """True outside a split and in its first share: the one that updates shared state."""
    return _state.split is None or _state.index == 0


def reduce_or(own):
    """The sum over the shares while this thread runs one, else `own` (a layer's own reduce)."""
    return _state.split.reduce if _state.split is not None else own


def shared_seed(layer, draw):
    """Inside a split, the k-th seed a share asks of `layer` is the layer's k-th draw in this step,
    whichever share asks first, so every share masks with the same seed; outside, draw()."""
    split = _state.split
    return draw() if split is None else split.seed(layer, draw)


class _Split:
    """What the shares of one step have in common: a barrier and the slots of their reductions."""

    def __init__(self, count):
        self.barrier = threading.Barrier(count)
        # Two slot sets, used alternately: a share that finished reduction k and moved on to k+1
        # writes the other set, while a slower share may still be reading set k.
        self.slots = [[None] * count, [None] * count]
        self.seeds = {}
        self.lock = threading.Lock()

    def reduce(self, array):
        """Sum `array` over the shares, in place, in share order (the same bits in every share)."""
        slots = self.slots[_state.reductions % 2]
        _state.reductions += 1
        slots[_state.index] = array.copy()  # a copy: the owner overwrites `array` below
        self.barrier.wait()
        total = slots[0].copy()
        for part in slots[1:]:
            total += part
        array[...] = total
        return array

    def seed(self, layer, draw):
        k = _state.calls.get(id(layer), 0)
        _state.calls[id(layer)] = k + 1
        with self.lock:
            key = (id(layer), k)
            if key not in self.seeds:
                self.seeds[key] = draw()
            return self.seeds[key]

    def abort(self):
        self.barrier.abort()  # a share waiting for this one's sums raises instead of hanging


_pool = None
_pool_lock = threading.Lock()


def _workers():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=SHARES - 1, thread_name_prefix="tinycnn-share")
        return _pool


def run_share(split, index, start, stop, threads, work):
    """work(index, start, stop) on this thread as share `index` of `split` (a _Split, or
    tinycnn.share_process's ProcessSplit: what its reduce and seed go through), on `threads` numba
    threads. If it fails, the split is aborted first, so no other share waits for it forever."""
    _state.split, _state.index, _state.first_sample = split, index, start
    _state.reductions, _state.calls = 0, {}
    try:
        with numba_threads(threads):
            return work(index, start, stop)
    except BaseException:
        split.abort()
        raise
    finally:
        _state.split = None


def run(share_bounds, work):
    """Run work(index, start, stop) for every share at once: the first on this thread, the others
    on worker threads, each with its part of this thread's numba threads. Returns the results in
    share order. If a share fails, the others are released from their barrier and the first
    failure (in share order) is raised here."""
    import numba

    threads = max(1, numba.get_num_threads() // len(share_bounds))
    split = _Split(len(share_bounds))

    def one(index, start, stop):
        return run_share(split, index, start, stop, threads, work)

    results, errors = [], []
    with blas_threads.limited(threads):  # a GEMM in a share: on its own cores, as the share's kernels
        futures = [_workers().submit(one, k, *b) for k, b in enumerate(share_bounds) if k > 0]
        try:
            results.append(one(0, *share_bounds[0]))
        except BaseException as exc:
            errors.append(exc)
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:
                errors.append(exc)
    if errors:
        # A share that failed first makes the others fail with BrokenBarrierError: raise its error.
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results
