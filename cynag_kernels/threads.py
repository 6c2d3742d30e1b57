"""How many OpenMP threads the CPU kernels use.

Resolution order, first match wins:

1. ``set_num_threads(n)`` (process-wide, until ``set_num_threads(None)``);
2. the ``CYNAG_NUM_THREADS`` environment variable, read once at import;
3. the OpenMP default: ``omp_get_max_threads()``, which reflects
   ``OMP_NUM_THREADS`` and a limit set through threadpoolctl.  When
   ``OMP_NUM_THREADS`` is not set it is capped by the number of CPUs this
   process may run on (CPU affinity and cgroup quota), as scikit-learn does.

Arrays with fewer elements than the *parallel threshold* are updated on the
calling thread without opening a parallel region: waking a thread team costs
microseconds, more than a small update.  The threshold defaults to
``DEFAULT_PARALLEL_THRESHOLD`` elements and is set by
``CYNAG_PARALLEL_THRESHOLD`` (read at import) or ``set_parallel_threshold``.

A build without OpenMP always uses one thread.

How idle threads wait between parallel regions (asleep at once by default,
so that they leave the CPUs to the rest of the training step) is set up
while the extensions load: see :mod:`cynag_kernels._wait_policy`.  Where
that could not apply (libgomp loaded first by another library) step 3 gives
one thread unless ``OMP_NUM_THREADS`` is set.
"""
import math
import operator
import os

import numpy

from cynag_kernels import _openmp_helpers, _wait_policy

#: Elements below which an update stays on one thread (see module docstring).
DEFAULT_PARALLEL_THRESHOLD = 1 << 16

_OPENMP = _openmp_helpers.openmp_enabled()


def _env_int(name, minimum):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(
            "environment variable %s must be an integer >= %d, got %r" % (name, minimum, raw)
        )
    return value


def _cgroup_cpu_limit():
    """CPU quota of this process's cgroup (v2 or v1), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def cpu_count():
    """CPUs this process may use: affinity mask, capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return min(n, limit) if limit else n


_CPU_COUNT = cpu_count()
_OMP_NUM_THREADS_SET = "OMP_NUM_THREADS" in os.environ
_env_threads = _env_int("CYNAG_NUM_THREADS", 1)
_fixed_threads = None
_env_threshold = _env_int("CYNAG_PARALLEL_THRESHOLD", 0)
_parallel_threshold = (DEFAULT_PARALLEL_THRESHOLD if _env_threshold is None
                       else _env_threshold)


def openmp_default_threads():
    """Threads OpenMP would use now (OMP_NUM_THREADS, threadpoolctl, CPUs)."""
    if not _OPENMP:
        return 1
    n = _openmp_helpers.omp_max_threads()
    if not _OMP_NUM_THREADS_SET:
        n = min(n, _CPU_COUNT)
    return max(1, n)


def _as_int(func, name, value):
    """``value`` as an int (NumPy integers accepted); TypeError for bool, float, ..."""
    if isinstance(value, (bool, numpy.bool_)):
        raise TypeError("%s: %s must be an int or None, got %r" % (func, name, value))
    try:
        return int(operator.index(value))
    except TypeError:
        raise TypeError("%s: %s must be an int or None, got %r" % (func, name, value)) from None


def get_num_threads():
    """Number of OpenMP threads the CPU kernels use for a large array."""
    if not _OPENMP:
        return 1
    if _fixed_threads is not None:
        return _fixed_threads
    if _env_threads is not None:
        return _env_threads
    if _spin_limits_default():
        return 1
    return openmp_default_threads()


def _spin_limits_default():
    """True when the OpenMP default gives way to one thread (see _wait_policy).

    libgomp loaded by another library before cynag keeps its default spin;
    unless ``OMP_NUM_THREADS`` asks for threads, cynag then opens no team
    whose idle threads would spin through the rest of the step.
    """
    return _OPENMP and _wait_policy.spin_unbounded and not _OMP_NUM_THREADS_SET


def set_num_threads(n):
    """Fix the number of threads used by the CPU kernels.

    Args:
        n (int or None): a positive count; a negative count counts back from
            the number of usable CPUs (``-1`` means all of them, ``-2`` all
            but one); ``None`` returns to ``CYNAG_NUM_THREADS`` or the OpenMP
            default.  ``0`` is an error.  In a build without OpenMP the
            setting is recorded but the kernels stay single-threaded.
    """
    global _fixed_threads
    if n is None:
        _fixed_threads = None
        return
    n = _as_int("set_num_threads", "n", n)
    if n == 0:
        raise ValueError("set_num_threads: n must not be 0 (use None for the default)")
    if n < 0:
        n = max(1, _CPU_COUNT + 1 + n)
    _fixed_threads = int(n)


def get_parallel_threshold():
    """Elements below which an update runs on the calling thread only."""
    return _parallel_threshold


def set_parallel_threshold(n_elements):
    """Set the parallel threshold (elements, >= 0; ``None`` returns to
    ``CYNAG_PARALLEL_THRESHOLD`` or the default, as :func:`set_num_threads`)."""
    global _parallel_threshold
    if n_elements is None:
        _parallel_threshold = (DEFAULT_PARALLEL_THRESHOLD if _env_threshold is None
                               else _env_threshold)
        return
    n_elements = _as_int("set_parallel_threshold", "n_elements", n_elements)
    if n_elements < 0:
        raise ValueError("set_parallel_threshold: n_elements must be >= 0, got %d" % n_elements)
    _parallel_threshold = n_elements


def threads_for(n_elements):
    """Threads to use for an update of ``n_elements`` elements."""
    if n_elements < _parallel_threshold:
        return 1
    return get_num_threads()


def thread_config():
    """A dict describing the current thread settings (for show_config)."""
    return {
        "openmp": _OPENMP,
        "num_threads": get_num_threads(),
        "source": (
            "set_num_threads" if _fixed_threads is not None
            else "CYNAG_NUM_THREADS" if _env_threads is not None
            else "one thread: libgomp was loaded before cynag, its idle threads would spin"
            if _spin_limits_default()
            else "OpenMP default"
        ),
        "CYNAG_NUM_THREADS": os.environ.get("CYNAG_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "omp_get_max_threads": _openmp_helpers.omp_max_threads(),
        "cpu_count": _CPU_COUNT,
        "parallel_threshold": _parallel_threshold,
        "wait_policy": _wait_policy.wait_policy(),
    }
