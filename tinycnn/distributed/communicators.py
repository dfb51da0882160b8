"""Communicators: the few collectives data-parallel training needs, over MPI between processes
(mpi4py) or NCCL between GPUs (CuPy), behind one interface:

    sum_(array)        in-place sum over the ranks (gradients, batch statistics, metric sums)
    broadcast_(array)  in place, from rank 0 (weights and optimizer state when fit begins)
    gather(array)      every rank's rows, concatenated in rank order, on every rank (predict)
    agree(values)      DistributedError unless every rank passed the same values
    barrier()

A rank that fails says so to the others (`fail`), and every wait here polls for such a notice:
the other ranks raise RankFailure, naming the failed rank and its error, instead of waiting in
a collective forever. `abort_on_uncaught_errors` ends the whole job once an error escapes.
"""
import json
import os
import sys
import time

import numpy as np

from ..arrays import get_array_module, to_numpy
from ..errors import DistributedError, RankFailure

FAILURE_TAG = 4099  # the tag of failure notices, on a communicator of their own
POLLS_BEFORE_SLEEPING = 2000  # a wait spins this many polls (microseconds each), then sleeps between polls
EXIT_GRACE_SECONDS = 10.0  # how long a failing rank waits for the others to report before the job is aborted


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(f"distributed training over MPI needs mpi4py and an MPI library ({exc}): "
                               'pip install -e ".[distributed]" (mpi4py and the mpich wheel), then run under '
                               "mpiexec -n N") from None
    return MPI


class Communicator:
    """One process alone: every collective is the identity. The base of the real ones."""

    kind = "single"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def sum_(self, array):
        return array

    def broadcast_(self, array, root=0):
        return array

    def gather(self, array):
        return array

    def broadcast_object(self, value, root=0):
        return value

    def agree(self, values, what="the arguments"):
        return values

    def barrier(self):
        pass

    def fail(self, message, final=False):
        pass

    def begin_call(self):
        pass

    def describe(self):
        return "1 process"


class MpiCommunicator(Communicator):
    """MPI between processes: `mpiexec -n N python train.py`. Host arrays travel as they are; device
    arrays are copied to the host and back (NcclCommunicator keeps them on the GPU)."""

    kind = "mpi"

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        world = MPI.COMM_WORLD if comm is None else comm
        self.world = world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        # Separate communicators, so a failure notice or the exit handshake can never be taken
        # for part of a collective.
        self._collectives = world.Dup()
        self._notices = world.Dup()
        self._exit = world.Dup()
        self._sent = []  # failure notices in flight (kept alive until delivered)
        self.call = 0  # which distributed call (fit, evaluate, ...) this is: the same count on every rank
        self.notified = False  # this rank has told the others it failed, in this call
        self.failed_rank = None  # the rank whose failure notice this rank received

    def describe(self):
        version = self.MPI.Get_library_version().splitlines()[0].strip()
        return f"{self.size} processes over MPI ({version})"

    # -- waiting, and failures -------------------------------------------------------------------
    def begin_call(self):
        """A new distributed call starts (every rank starts the same ones, in the same order). A
        failure notice from an earlier call is stale: an error every rank raised alike (a bad
        argument) was sent by every rank, and each rank has already seen its own."""
        self.call += 1
        self.notified = False
        self.failed_rank = None

    def check(self):
        """RankFailure if another rank has said it failed in this call (stale notices are dropped)."""
        status = self.MPI.Status()
        while self._notices.Iprobe(source=self.MPI.ANY_SOURCE, tag=FAILURE_TAG, status=status):
            source = status.Get_source()
            call, message = self._notices.recv(source=source, tag=FAILURE_TAG)
            if call < self.call:
                continue
            self.failed_rank = source
            raise RankFailure(f"rank {source} of {self.size} failed ({message}); rank {self.rank} stops too")

    def wait(self, request):
        """Complete a non-blocking MPI request, polling for failure notices meanwhile."""
        polls = 0
        while not request.Test():
            self.check()
            polls += 1
            if polls > POLLS_BEFORE_SLEEPING:
                time.sleep(50e-6)  # a rank that waits long (a slower peer) leaves the core to others

    def fail(self, message, final=False):
        """Tell every other rank that this one failed (once per call); they raise RankFailure at their
        next wait. `final`: the process is ending, so the notice holds for any call the others are in."""
        if self.notified or self.failed_rank is not None:
            return
        self.notified = True
        notice = (sys.maxsize if final else self.call, str(message)[:2000])
        self._sent += [self._notices.isend(notice, dest=r, tag=FAILURE_TAG) for r in range(self.size) if r != self.rank]

    def abort_job(self, grace=EXIT_GRACE_SECONDS):
        """End this rank after an error, and make sure no rank is left waiting: when every rank
        arrives here within `grace` seconds (each has printed its own error), each exits with status
        1; otherwise MPI_Abort ends the whole job. (An abort kills ranks whose last lines are still
        on their way to mpiexec, so it is kept for ranks that do not answer.)"""
        request = self._exit.Ibarrier()
        deadline = time.monotonic() + grace
        while not request.Test():
            if time.monotonic() > deadline:
                sys.stdout.flush()
                sys.stderr.flush()
                self.world.Abort(1)
            time.sleep(0.01)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    # -- collectives -------------------------------------------------------------------------------
    def _host(self, array):
        """A contiguous host array holding `array`'s values (the array itself where it is one)."""
        return np.ascontiguousarray(to_numpy(array))

    def _back(self, array, host):
        if host is not array:
            array[...] = get_array_module(array).asarray(host).reshape(array.shape)
        return array

    def sum_(self, array):
        host = self._host(array)
        self.wait(self._collectives.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM))
        return self._back(array, host)

    def broadcast_(self, array, root=0):
        host = self._host(array)
        self.wait(self._collectives.Ibcast(host, root=root))
        return self._back(array, host)

    def barrier(self):
        self.wait(self._collectives.Ibarrier())

    def broadcast_object(self, value, root=0):
        """A small picklable value from rank `root` (blocking: used when a call starts, not in steps)."""
        return self._collectives.bcast(value, root=root)

    def _counts(self, count):
        counts = np.zeros(self.size, dtype=np.int64)
        self.wait(self._collectives.Iallgather(np.array([count], dtype=np.int64), counts))
        return counts

    def _gather_host(self, host):
        """(every rank's rows of a host array, concatenated in rank order; each rank's row count)."""
        row = int(np.prod(host.shape[1:], dtype=np.int64))
        counts = self._counts(host.shape[0])
        out = np.empty((int(counts.sum()),) + host.shape[1:], dtype=host.dtype)
        sizes = counts * row
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.wait(self._collectives.Iallgatherv(host.reshape(-1), [out.reshape(-1), (sizes, offsets)]))
        return out, counts

    def gather(self, array):
        """Every rank's rows of `array` (same trailing shape and dtype on every rank), in rank order."""
        out, _ = self._gather_host(self._host(array))
        return get_array_module(array).asarray(out)

    def agree(self, values, what="the arguments"):
        """DistributedError on every rank unless every rank passed equal `values` (a JSON-able dict)."""
        mine = np.frombuffer(json.dumps(values, sort_keys=True).encode(), dtype=np.uint8)
        texts, counts = self._gather_host(mine)
        parts = np.split(texts, np.cumsum(counts)[:-1])
        seen = [json.loads(bytes(p).decode()) for p in parts]
        if any(s != seen[0] for s in seen):
            differ = sorted({k for s in seen for k in s if any(t.get(k) != s.get(k) for t in seen)})
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(seen))
                               for k in differ)
            raise DistributedError(f"the ranks were given different {what} ({detail}): every rank must call "
                                   "it with the same data and settings (tinycnn shards the data itself)")
        return values


class NcclCommunicator(MpiCommunicator):
    """NCCL between GPUs, one GPU per rank (rank r on this machine uses GPU r modulo the count).
    MPI starts it (rank 0 makes NCCL's unique id and broadcasts it), carries the failure notices
    and the small host-side exchanges; sums and broadcasts of device arrays stay on the GPUs.

    Make it before the model, so the model is built on this rank's GPU."""

    kind = "nccl"
    _TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int64": "NCCL_INT64", "int32": "NCCL_INT32"}

    def __init__(self, comm=None):
        super().__init__(comm)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise DistributedError(f"the NCCL communicator needs CuPy with NCCL ({exc}); use communicator='mpi' "
                                   "on CPUs") from None
        self.cupy, self.nccl = cupy, nccl
        devices = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.local_rank % devices).use()
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self._collectives.bcast(unique_id, root=0)
        self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def describe(self):
        return f"{self.size} processes over NCCL {self.nccl.get_version()} (GPU {self.cupy.cuda.Device().id} here)"

    def _on_device(self, array):
        return isinstance(array, self.cupy.ndarray) and array.flags.c_contiguous

    def _wait_stream(self, stream):
        polls = 0
        while not stream.done:
            try:
                self.check()
            except RankFailure:
                self._nccl.abort()  # a collective the failed rank will never join
                raise
            polls += 1
            if polls > POLLS_BEFORE_SLEEPING:
                time.sleep(50e-6)

    def _datatype(self, array):
        name = self._TYPES.get(array.dtype.name)
        if name is None:
            raise DistributedError(f"NCCL collectives here take {', '.join(self._TYPES)}, not {array.dtype}")
        return getattr(self.nccl, name)

    def sum_(self, array):
        if not self._on_device(array):
            return super().sum_(array)
        stream = self.cupy.cuda.get_current_stream()
        self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, self._datatype(array), self.nccl.NCCL_SUM,
                             stream.ptr)
        self._wait_stream(stream)
        return array

    def broadcast_(self, array, root=0):
        if not self._on_device(array):
            return super().broadcast_(array, root)
        stream = self.cupy.cuda.get_current_stream()
        self._nccl.bcast(array.data.ptr, array.size, self._datatype(array), root, stream.ptr)
        self._wait_stream(stream)
        return array


def make_communicator(kind="auto"):
    """'mpi', 'nccl', 'auto' (NCCL when CuPy has it and a GPU works, else MPI), or a Communicator."""
    if isinstance(kind, Communicator):
        return kind
    if kind not in ("auto", "mpi", "nccl"):
        raise DistributedError(f"communicator must be 'auto', 'mpi', 'nccl' or a Communicator, got {kind!r}")
    if kind == "mpi":
        return MpiCommunicator()
    if kind == "nccl":
        return NcclCommunicator()
    MPI = _mpi()
    usable = _nccl_usable()
    if MPI.COMM_WORLD.allreduce(int(usable), op=MPI.MIN):  # every rank alike, or none
        return NcclCommunicator()
    if MPI.COMM_WORLD.allreduce(int(usable), op=MPI.MAX):
        import warnings

        warnings.warn("some ranks have a working GPU with NCCL and some do not: every rank uses MPI",
                      RuntimeWarning, stacklevel=3)
    return MpiCommunicator()


def _nccl_usable():
    """Whether CuPy with NCCL and a working GPU are here (no collective: each rank asks itself)."""
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no NCCL in it, or no working GPU
        return False


def abort_on_uncaught_errors(comm):
    """Install a sys.excepthook for a job of several ranks: print the error as usual, tell the other
    ranks (they raise RankFailure), give them time to report, then abort the job so no rank hangs."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        if not isinstance(value, RankFailure):
            print(f"tinycnn.distributed: rank {comm.rank} of {comm.size} failed with the error above; "
                  "stopping every rank", file=sys.stderr)
        try:
            comm.fail(f"{kind.__name__}: {value}", final=True)
        finally:
            comm.abort_job()

    sys.excepthook = hook
    return previous
