"""Data parallelism: N processes train one model exactly as one process would with the global batch.

    dp = tinycnn.distributed.DataParallel()     # first: it picks each rank's GPU and CPU threads
    model = ...
    model.compile(optimizer, loss, metrics, distribution=dp)
    model.fit(x, y, batch_size=128)             # 128 is the global batch: each of N ranks computes ~128/N

Every rank passes the same arrays (checked when fit begins). Of each global batch of the epoch's
shuffled order (a permutation from the model's seed, the same on every rank) rank r computes its
contiguous share. Each rank scales its loss gradient by the *global* batch size, and one sum over
the ranks of the flat gradient buffer gives every rank the gradient of the global batch, so every
rank applies the same update: the one a single process makes, to float32 round-off (the sums run
in another order). Dropout masks are drawn at each sample's position in the global batch, so they
are the single process's masks too.

BatchNormalization, per rank (the default, as in Keras's MirroredStrategy and Horovod): each rank
normalizes with its own share's statistics, and the moving statistics are averaged over the
ranks at the end of every epoch (as Keras reads its per-replica copies; an average of moving
averages is the moving average of the averages, so this equals averaging every step).
Synchronized (`sync_batchnorm=True`, or a layer's own `synchronized=True`): the kernels sum the
moments and the gradient sums over the ranks (their `reduce`), so N ranks normalize as one
process does with the global batch, for two small allreduces per layer and step.

Logs: the epoch's loss and metrics, validation included, are sums over every rank's samples; the
running values a progress bar shows during an epoch are rank 0's own (as with Horovod). Rank 0
alone prints and runs the callbacks that write files (`rank_zero_only`); every rank runs the
others (learning-rate schedules, early stopping: they see the same epoch logs, so they agree).
"""
import contextlib
import os
import weakref

import numpy as np

from ..errors import DistributedError, RankFailure
from .communicators import abort_on_uncaught_errors, make_communicator


class DataParallel:
    """Data-parallel training over `communicator` ('auto': NCCL for GPUs when CuPy has it, else
    MPI; 'mpi'; 'nccl'; or a Communicator). `sync_batchnorm` synchronizes every
    BatchNormalization's batch statistics across the ranks. `threads`: numba threads per rank on
    the CPU (default: this machine's cores shared evenly among its ranks)."""

    def __init__(self, communicator="auto", sync_batchnorm=False, threads=None):
        self.comm = make_communicator(communicator)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.threads = self._share_cores(threads)
        self._synchronized = weakref.WeakSet()  # models whose state came from rank 0
        if self.size > 1:
            abort_on_uncaught_errors(self.comm)

    @property
    def rank(self):
        return self.comm.rank

    @property
    def size(self):
        return self.comm.size

    @property
    def is_chief(self):
        """Rank 0: the one that prints, writes checkpoints and results."""
        return self.comm.rank == 0

    def describe(self):
        threads = "" if self.threads is None else f", {self.threads} CPU thread(s) per rank"
        bn = "synchronized" if self.sync_batchnorm else "per rank"
        return f"data parallel on {self.comm.describe()}{threads}; BatchNormalization statistics {bn}"

    def _share_cores(self, threads):
        """Give each rank its share of this machine's cores for numba (unless TINYCNN_NUMBA_THREADS
        says otherwise): N ranks with every core each would oversubscribe the machine N times."""
        if os.environ.get("TINYCNN_NUMBA_THREADS") and threads is None:
            return None
        try:
            import numba
        except ImportError:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = threads if threads is not None else max(1, cores // self.comm.local_size)
        count = min(int(count), numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(count)
        return count

    # -- for scripts ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def rank_zero_first(self):
        """Run the block on rank 0 first, then on the others: a download or a cache that rank 0
        makes and the others then read."""
        with self.guard():
            if self.rank != 0:
                self.comm.barrier()
            yield
            if self.rank == 0:
                self.comm.barrier()

    @contextlib.contextmanager
    def guard(self):
        """An error inside the block is told to the other ranks (they raise RankFailure at their
        next collective) before it propagates here."""
        self.comm.begin_call()
        try:
            yield
        except RankFailure:
            raise
        except BaseException as exc:
            self.comm.fail(f"{type(exc).__name__}: {exc}")
            raise

    def barrier(self):
        self.comm.barrier()

    # -- for the trainer -------------------------------------------------------------------------------
    def shard(self, count):
        """(start, stop): this rank's contiguous share of `count` items."""
        return share(count, self.rank, self.size)

    def check_same(self, facts):
        """DistributedError on every rank unless every rank was given the same `facts` (sizes,
        settings and fingerprints of the data)."""
        self.comm.agree(facts, "data or settings to fit")

    def synchronize(self, model):
        """Make every rank hold rank 0's seed (the epochs' shuffles and masks derive from it), random
        streams, weights, statistics and optimizer state: fit does this first, and train_on_batch the first
        time it sees a model."""
        model.seed = int(self.comm.broadcast_(np.array([model.seed], dtype=np.int64))[0])
        states = self.comm.broadcast_object([layer.random_state() for layer in model.compute_layers])
        for layer, state in zip(model.compute_layers, states):  # the same Dropout streams as rank 0
            if state is not None:
                layer.set_random_state(state)
        for layer in model.compute_layers:
            for value in layer.weights.values():
                self.comm.broadcast_(value)
        optimizer = model.optimizer
        state = {key: np.array(value, copy=True) for key, value in optimizer.get_state().items()}
        for value in state.values():
            self.comm.broadcast_(value)
        optimizer.set_state(state)
        if not callable(optimizer.learning_rate):
            rate = self.comm.broadcast_(np.array([optimizer.learning_rate], dtype=np.float64))
            optimizer.learning_rate = float(rate[0])
        self._synchronized.add(model)

    def synchronized(self, model):
        return model in self._synchronized

    @contextlib.contextmanager
    def training(self, model):
        """While the block trains `model`: its synchronized BatchNormalization layers share their
        statistics over the ranks; afterwards every layer is back to single-process behaviour."""
        for layer in self.batchnorm_layers(model):
            layer.synchronize_with(self.comm if (self.sync_batchnorm or layer.synchronized) else None)
        try:
            yield
        finally:
            for layer in model.compute_layers:
                layer.place_in_batch(0)
            for layer in self.batchnorm_layers(model):
                layer.synchronize_with(None)

    @staticmethod
    def batchnorm_layers(model):
        return [layer for layer in model.compute_layers if hasattr(layer, "synchronize_with")]

    def place_batch(self, model, first_sample):
        """Tell the layers that draw random masks where this rank's share starts in the global batch."""
        for layer in model.compute_layers:
            layer.place_in_batch(first_sample)

    def sum_(self, array):
        return self.comm.sum_(array)

    def any(self, flag):
        """True on every rank if `flag` is True on any (a stop requested by one rank's callback)."""
        return bool(self.comm.sum_(np.array([1.0 if flag else 0.0]))[0] > 0)

    def average_statistics(self, model):
        """Average the moving statistics of per-rank BatchNormalization layers over the ranks (the
        synchronized ones are equal on every rank already)."""
        for layer in self.batchnorm_layers(model):
            if layer.reduce is None:
                for name in ("moving_mean", "moving_variance"):
                    value = self.comm.sum_(layer.weights[name])
                    value *= value.dtype.type(1.0 / self.size)

    def gather(self, array):
        return self.comm.gather(array)


def share(count, rank, size):
    """(start, stop): rank `rank`'s contiguous share of `count` items split among `size` ranks in
    rank order (the shares' sizes differ by at most one, the larger first)."""
    base, extra = divmod(int(count), size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def as_distribution(value):
    """compile's `distribution`: None or a DataParallel."""
    if value is None or isinstance(value, DataParallel):
        return value
    raise DistributedError(f"distribution must be a tinycnn.distributed.DataParallel (or None), got "
                           f"{type(value).__name__}")


__all__ = ["DataParallel", "share", "as_distribution"]
