"""Abort every process of an MPI job when one of them has an uncaught exception.

Without it, an exception on one rank ends that process while the others wait
forever in their next collective operation.  :func:`add_hook` (as in
``chainermn.global_except_hook``) installs a ``sys.excepthook`` that prints the
traceback, then a banner naming the rank, and calls ``MPI_Abort`` on
``COMM_WORLD``, which ends the whole job with a non-zero exit status.

Setting ``CYNAG_FORCE_ABORT_ON_EXCEPTION`` (or ChainerMN's
``CHAINERMN_FORCE_ABORT_ON_EXCEPTION``) to a non-empty value in every process
installs it when :mod:`cynag.multinode` is imported.
"""
import os
import sys
import time
import warnings

_orig_except_hook = None
#: Seconds between printing the exception and calling ``MPI_Abort``.
ABORT_DELAY_S = 0.5


def _global_except_hook(exctype, value, traceback):
    """Print the exception, then call ``MPI_Abort`` (installed as ``sys.excepthook``)."""
    try:
        if _orig_except_hook:
            _orig_except_hook(exctype, value, traceback)
        else:
            sys.__excepthook__(exctype, value, traceback)
    finally:
        try:
            import mpi4py.MPI

            rank = mpi4py.MPI.COMM_WORLD.Get_rank()
        except Exception:
            rank = "?"
        sys.stderr.write("\n")
        sys.stderr.write("******************************************\n")
        sys.stderr.write("cynag.multinode:\n")
        sys.stderr.write("   Uncaught exception on rank {}.\n".format(rank))
        sys.stderr.write("   Calling MPI_Abort() to shut down MPI...\n")
        sys.stderr.write("******************************************\n")
        sys.stderr.write("\n\n")
        sys.stderr.flush()
        # The launcher forwards this process's output asynchronously, and
        # MPI_Abort ends its forwarding too: give it a moment to pass the
        # traceback and the banner on (MPICH's mpiexec lost the banner
        # without it, now and then).
        time.sleep(ABORT_DELAY_S)
        try:
            import mpi4py.MPI

            mpi4py.MPI.COMM_WORLD.Abort(1)
        except Exception:
            sys.stderr.write("Sorry, failed to stop MPI and the process may hang.\n")
            sys.stderr.flush()
            raise


def _add_hook_if_enabled():
    for var in ("CYNAG_FORCE_ABORT_ON_EXCEPTION", "CHAINERMN_FORCE_ABORT_ON_EXCEPTION"):
        if os.environ.get(var):
            add_hook()
            return


def add_hook():
    """Install the hook (once; a second call warns and does nothing)."""
    global _orig_except_hook
    if _orig_except_hook is not None:
        warnings.warn("cynag.multinode.global_except_hook.add_hook() seems to be called "
                      "multiple times. Ignoring.", stacklevel=2)
        return
    _orig_except_hook = sys.excepthook
    sys.excepthook = _global_except_hook


def remove_hook():
    """Put back the ``sys.excepthook`` that :func:`add_hook` replaced."""
    global _orig_except_hook
    if _orig_except_hook is None:
        return
    sys.excepthook = _orig_except_hook
    _orig_except_hook = None
