"""How idle OpenMP threads wait: asleep, so that they leave the CPUs to the rest of the step.

After a parallel region libgomp's worker threads spin before they sleep:
``GOMP_SPINCOUNT`` polls (300000 by default, several milliseconds; 30 billion
with ``OMP_WAIT_POLICY=active``; none with ``OMP_WAIT_POLICY=passive``).  In a
training step the optimizer update is followed by the forward and backward
passes, whose BLAS threads then compete with spinning cynag threads for the
same cores.  cynag therefore loads libgomp with :data:`DEFAULT_ENV`
(``OMP_WAIT_POLICY=passive``).  A short spin was measured too and lost: the
update comes after milliseconds of forward and backward, so its team has to
be woken anyway, and while the master spins at the end of the region the
woken worker can be queued behind it on the same CPU (2**16 elements on two
threads after 2 ms idle, 2-CPU machine: 0.07 ms passive, 0.14 ms with 1000
polls, 0.45 ms with 10000); back-to-back regions gained nothing with 1000
polls and 15 us with 10000.

libgomp reads these variables once, when it is loaded, and has no call to
change them later.  :func:`before_load` runs before cynag's extensions are
imported and, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
(theirs always win), puts ``OMP_WAIT_POLICY=passive`` in the environment;
:func:`after_load` takes it out again, so that OpenMP runtimes loaded later
by other libraries (a renamed libgomp copy, Intel's or LLVM's runtime)
and child processes see the environment the user gave.

If ``libgomp.so.1`` was already loaded by another library, the extensions of
a source build share that runtime, initialized with its default spin, which
cynag cannot change (a wheel repaired by auditwheel loads its own renamed
copy from ``cynag.libs/``, which no other library shares).  Then, unless the
user asked for threads (``set_num_threads``, ``CYNAG_NUM_THREADS``,
``OMP_NUM_THREADS``), the kernels run on one thread: no worker thread of
cynag's is left spinning.  (Ending the team after each region with
``omp_pause_resource_all`` was measured and rejected: a new thread waits for
a CPU far longer than a sleeping one woken, 1 to 28 ms per region on a
loaded 2-CPU machine.)

This module is pure Python and imports no extension: it must run first.
"""
import os
import re

#: The variable and value cynag sets while it loads libgomp, when the user
#: set neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``.
DEFAULT_ENV = ("OMP_WAIT_POLICY", "passive")

ENV_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# The soname the extensions of a source build link (``ldd
# cynag_kernels/_openmp_helpers*.so``); the dynamic loader reuses any object
# already loaded under it (PyTorch's CPU wheels load it under this name too).
# Renamed copies (``libgomp-<hash>.so.1``: some PyTorch builds', or the one a
# repaired wheel carries) are separate runtimes.
_LIBGOMP = re.compile(r"libgomp\.so\.1(\.\d+)*")


def _own_runtime(site=None):
    """The pattern of the file name of the libgomp cynag's extensions load.

    A wheel repaired by auditwheel carries its own renamed copy in
    ``cynag.libs/`` beside the packages (``libgomp-<hash>.so.1.0.0``): that
    one, and no other process-wide libgomp, is cynag's runtime.  Otherwise
    (a source build) the system's ``libgomp.so.1``.
    """
    if site is None:  # (the folder that holds the cynag_kernels package)
        site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = os.path.join(site, "cynag.libs")
    try:
        names = sorted(n for n in os.listdir(libs) if n.startswith("libgomp"))
    except OSError:
        names = []
    if names:
        return re.compile(re.escape(names[0]))
    return _LIBGOMP


_RUNTIME = _own_runtime()

_state = {
    "source": None,          # "cynag default" / "user environment" / "preloaded" / "no libgomp"
    "user_env": {},          # OMP_WAIT_POLICY / GOMP_SPINCOUNT as the user set them
    "set_by_cynag": None,    # the value cynag put in DEFAULT_ENV[0], while it is there
    "preloaded": [],         # libgomp.so.1 paths mapped before cynag's extensions
    "libgomp": [],           # libgomp.so.1 paths mapped after them
    "spin_unbounded": False,  # libgomp loaded first with its default spin
    "maps_readable": True,   # False: no /proc/self/maps, the runtime is not known
}

#: True when libgomp was loaded before cynag with a spin cynag could not
#: bound: the default thread count is then 1 (see cynag_kernels.threads).
spin_unbounded = False


def mapped_libgomp():
    """Paths of the objects of cynag's libgomp mapped in this process (``/proc/self/maps``):
    ``libgomp.so.1``, or a repaired wheel's own copy (see :func:`_own_runtime`).

    ``None`` where the maps cannot be read (not Linux).
    """
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    paths = []
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6:
            path = fields[5].strip()
            if _RUNTIME.fullmatch(os.path.basename(path)) and path not in paths:
                paths.append(path)
    return paths


def before_load():
    """Set the default wait before cynag's extensions load libgomp (see module docstring)."""
    user = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    preloaded = mapped_libgomp() or []
    _state["user_env"] = user
    _state["preloaded"] = preloaded
    if user:
        _state["source"] = "user environment"
    elif preloaded:
        _state["source"] = "preloaded"
    else:
        name, value = DEFAULT_ENV
        os.environ[name] = value
        _state["set_by_cynag"] = value
        _state["source"] = "cynag default"


def after_load():
    """Take cynag's default out of the environment again; decide on the fallback."""
    global spin_unbounded
    value = _state["set_by_cynag"]
    if value is not None and os.environ.get(DEFAULT_ENV[0]) == value:
        del os.environ[DEFAULT_ENV[0]]
    _state["set_by_cynag"] = None
    loaded = mapped_libgomp()
    _state["libgomp"] = loaded or []
    _state["maps_readable"] = loaded is not None
    if loaded is not None and not loaded:
        # Built without OpenMP, or against another runtime (LLVM's libomp,
        # which reads OMP_WAIT_POLICY too, when first called: cynag's
        # __init__ calls it while the setting is there).
        if _state["source"] == "cynag default":
            _state["source"] = "no libgomp"
    elif _state["source"] == "preloaded":
        spin_unbounded = _state["spin_unbounded"] = True


def wait_policy():
    """A dict describing the wait of idle OpenMP threads and where it came from."""
    source = _state["source"]
    user = dict(_state["user_env"])
    if source == "user environment":
        policy = " ".join("%s=%s" % kv for kv in sorted(user.items()))
        origin = "your environment (cynag leaves it as set)"
    elif source == "cynag default":
        policy = "%s=%s" % DEFAULT_ENV
        origin = "cynag default (set only while cynag loaded libgomp)"
        if not _state["maps_readable"]:
            origin = "cynag default, set while cynag initialized its OpenMP runtime"
    elif source == "preloaded":
        policy = ("libgomp default (GOMP_SPINCOUNT=300000), so cynag's default "
                  "is one thread")
        origin = "another library loaded %s before cynag" % _state["preloaded"][0]
    elif source == "no libgomp":
        policy = "%s=%s" % DEFAULT_ENV
        origin = ("cynag default, set while cynag initialized its OpenMP runtime, "
                  "which is not libgomp (or none: no OpenMP build)")
    else:
        policy, origin = "unknown", "not set up"
    return {
        "policy": policy,
        "source": source,
        "origin": origin,
        "cynag_default": "%s=%s" % DEFAULT_ENV,
        "OMP_WAIT_POLICY": user.get("OMP_WAIT_POLICY"),
        "GOMP_SPINCOUNT": user.get("GOMP_SPINCOUNT"),
        "spin_unbounded": _state["spin_unbounded"],
        "libgomp": list(_state["libgomp"]),
    }
