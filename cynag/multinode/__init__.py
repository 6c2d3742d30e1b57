"""Data-parallel training over processes, with ChainerMN's API.

Port ChainerMN code by changing ``chainermn`` to ``cynag.multinode``::

    import cynag.multinode as mn

    comm = mn.create_communicator("naive")          # 'naive', 'flat' or 'mpi'
    opt = mn.create_multi_node_optimizer(
        cynag.optimizers.NesterovAG(lr=0.01), comm).setup(model)
    opt.update(lossfun, x, t)     # averages the gradients over the processes

and launch with ``mpiexec -n 2 python train.py``.  mpi4py is an optional
dependency (``pip install "cynag[mpi]"``): this module imports without it,
and creating a communicator then raises ``ImportError`` saying so.
"""
from cynag.multinode import global_except_hook
from cynag.multinode._mpi import INSTALL_HINT, available
from cynag.multinode.communicator import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_DIRECT_MIN_BYTES,
    ModelMismatchError,
    MpiCommunicator,
    MultiNodeError,
)
from cynag.multinode.optimizers import create_multi_node_optimizer

#: ChainerMN's name of the communicator interface (cynag has one implementation).
CommunicatorBase = MpiCommunicator

#: Names accepted by :func:`create_communicator`; all select cynag's communicator.
COMMUNICATOR_NAMES = ("mpi", "naive", "flat")


def create_communicator(communicator_name="mpi", mpi_comm=None, **kwargs):
    """Create a communicator (collective: every process of ``mpi_comm`` must call it).

    Args:
        communicator_name: ``'mpi'`` (default), or ChainerMN's ``'naive'`` or
            ``'flat'``, which select the same implementation (packed, bucketed
            averaging with ChainerMN's numerics).  ``'pure_nccl'`` and
            ChainerMN's other GPU-only names are not provided: CuPy
            gradients are averaged with NCCL by this communicator when
            ``cupy.cuda.nccl`` is available.
        mpi_comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``).
        bucket_bytes (int): bytes per message of gradients (default
            :data:`DEFAULT_BUCKET_BYTES`).
        direct_min_bytes (int): gradients of at least this size are reduced
            in place (default :data:`DEFAULT_DIRECT_MIN_BYTES`).
        allreduce_grad_dtype: only ``None`` (as ChainerMN for non-NCCL
            communicators).
        batched_copy: accepted for compatibility (cynag always packs).

    Raises:
        ImportError: mpi4py is not installed (``pip install "cynag[mpi]"``).
        ValueError: an unknown communicator name.
        TypeError: an unknown option.
    """
    if communicator_name not in COMMUNICATOR_NAMES:
        raise ValueError('Unrecognized communicator: "{}" (cynag.multinode provides {})'.format(
            communicator_name, ", ".join(repr(n) for n in COMMUNICATOR_NAMES)))
    allreduce_grad_dtype = kwargs.pop("allreduce_grad_dtype", None)
    batched_copy = kwargs.pop("batched_copy", True)
    bucket_bytes = kwargs.pop("bucket_bytes", None)
    direct_min_bytes = kwargs.pop("direct_min_bytes", None)
    if kwargs:
        raise TypeError("create_communicator() got unexpected keyword argument(s): %s"
                        % ", ".join(sorted(kwargs)))
    if allreduce_grad_dtype is not None:
        raise ValueError("allreduce_grad_dtype is only available at 'pure_nccl' communicator.")
    comm = MpiCommunicator(mpi_comm=mpi_comm, name=communicator_name,
                           bucket_bytes=bucket_bytes, direct_min_bytes=direct_min_bytes)
    comm.set_config("batched_copy", batched_copy)
    return comm


global_except_hook._add_hook_if_enabled()

__all__ = [
    "COMMUNICATOR_NAMES", "CommunicatorBase", "DEFAULT_BUCKET_BYTES", "DEFAULT_DIRECT_MIN_BYTES", "INSTALL_HINT",
    "ModelMismatchError", "MpiCommunicator", "MultiNodeError", "available",
    "create_communicator", "create_multi_node_optimizer", "global_except_hook",
]
