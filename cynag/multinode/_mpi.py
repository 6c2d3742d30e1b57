"""Access to mpi4py, imported only when a communicator is created."""

#: The pip command that installs what a communicator needs (mpi4py and MPICH).
INSTALL_HINT = 'pip install "cynag[mpi]"'


def import_mpi():
    """``mpi4py.MPI``, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "cynag.multinode needs mpi4py and an MPI library (%s); install them with: %s "
            "(mpi4py plus the MPICH wheel, which provides mpiexec)" % (e, INSTALL_HINT)) from e
    return MPI


def available():
    """True if mpi4py imports (and so a communicator can be created)."""
    try:
        import_mpi()
    except ImportError:
        return False
    return True
