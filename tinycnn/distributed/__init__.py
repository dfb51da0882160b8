"""Data-parallel training across processes and machines (MPI) and GPUs (NCCL)::

    mpiexec -n 4 python train.py

and in train.py::

    import tinycnn as tc
    dp = tc.distributed.DataParallel()            # before building the model
    model = ...
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["acc"], distribution=dp)
    model.fit(x, y, batch_size=128)               # the global batch, shared among the ranks
    if dp.is_chief:
        model.save_weights("weights.npz")

See `tinycnn.distributed.data_parallel` for the semantics (what equals one process, BatchNorm,
logs and callbacks) and `tinycnn.distributed.communicators` for the collectives and failures.
"""
from ..errors import DistributedError, RankFailure
from .communicators import Communicator, MpiCommunicator, NcclCommunicator, make_communicator
from .data_parallel import DataParallel

__all__ = ["DataParallel", "Communicator", "MpiCommunicator", "NcclCommunicator", "make_communicator",
           "DistributedError", "RankFailure"]
