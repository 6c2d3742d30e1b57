"""cynag.torch's native reader: ``_torch_native.cpp`` built against the installed PyTorch.

PyTorch's Python attributes cost 0.1-0.2 us each, and a step needs about
fifteen of them per parameter; the reader takes the same decisions from the
tensors in C++ (see the source).  It is compiled with
``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; ``pip install "cynag[torch]"`` brings ninja) the first time it is
wanted, and cached in ``cynag/`` under PyTorch's extension folder
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), under
a name derived from the source, PyTorch's version and Python's ABI.

``CYNAG_TORCH_NATIVE`` chooses when:

* ``background`` (default): the first optimizer starts the build in a
  thread and steps through the Python reader until it is loaded (the two
  take the same decisions: the results are the same);
* ``1``: build (or load from the cache) at once, in the calling thread; a
  failure raises;
* ``0``: never; the Python reader only.

:func:`status` says which reader steps use and why.
"""
import hashlib
import importlib.util
import os
import shutil
import sysconfig
import tempfile
import threading
import time

_lock = threading.Lock()
_module = None
_error = None
_thread = None
_SUFFIX = ".pyd" if os.name == "nt" else ".so"


def mode():
    value = os.environ.get("CYNAG_TORCH_NATIVE", "background").strip().lower()
    if value in ("0", "off", "no", "false"):
        return "off"
    if value in ("1", "on", "yes", "true", "sync"):
        return "sync"
    return "background"


def _source():
    """``_torch_native.cpp`` behind the kernel's C entry (``cynag_kernels/_kernel_api.h``),
    the one declaration of the struct it calls (both are in the build's cache key)."""
    import cynag_kernels

    with open(os.path.join(os.path.dirname(os.path.abspath(cynag_kernels.__file__)),
                           "_kernel_api.h")) as f:
        header = f.read()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_torch_native.cpp")) as f:
        return header + "\n" + f.read()


def _cache_root():
    """``cynag/`` in PyTorch's extension folder (``TORCH_EXTENSIONS_DIR`` if set)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return os.path.join(root, "cynag")


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remove_old_builds(root, age_s=24 * 3600):
    """Remove build folders that processes which ended while building left a day ago or more."""
    now = time.time()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        try:
            if ".build-" in entry and now - os.path.getmtime(path) > age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _build():
    """The reader module: loaded from the cache, or built and then cached.

    No lock is taken: a build runs in a folder of its own and its library is
    moved into the cache in one rename, so a process that dies while
    building (a short script that ends during the background build) leaves
    nothing that makes another wait.  (``load_inline``'s own folder lock,
    left behind by such a process, makes every later build wait forever.)
    """
    import torch
    from torch.utils.cpp_extension import load_inline

    src = _source()
    key = "%s\n%s\n%s" % (src, torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = "cynag_torch_native_%s" % digest
    root = _cache_root()
    cached = os.path.join(root, name + _SUFFIX)
    if os.path.exists(cached):
        try:
            return _load_file(name, cached)
        except ImportError:  # (a damaged file: built again below)
            pass
    os.makedirs(root, exist_ok=True)
    _remove_old_builds(root)
    work = tempfile.mkdtemp(prefix=name + ".build-", dir=root)
    try:
        module = load_inline(name, cpp_sources=src,
                             functions=["collect_groups", "step_groups", "bump_steps"],
                             extra_cflags=["-O2"], build_directory=work, verbose=False)
        built = os.path.join(work, name + _SUFFIX)
        staged = os.path.join(work, "staged" + _SUFFIX)
        shutil.copyfile(built, staged)
        os.replace(staged, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return module


def _build_into_globals():
    global _module, _error
    try:
        m = _build()
    except BaseException as e:  # no compiler, no ninja, an incompatible PyTorch ...
        _error = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1][:300]
                             if str(e).strip() else "")
        return
    _module = m


def get():
    """The loaded reader module, or None (then starts the build, per :func:`mode`)."""
    global _thread
    if _module is not None or _error is not None:
        return _module
    m = mode()
    if m == "off":
        return None
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if m == "sync":
            _build_into_globals()
            if _error is not None:
                raise RuntimeError("cynag.torch: building the native reader failed "
                                   "(CYNAG_TORCH_NATIVE=1): %s" % _error)
            return _module
        if _thread is None:
            _thread = threading.Thread(target=_build_into_globals,
                                       name="cynag-torch-native-build", daemon=True)
            _thread.start()
    return None


def wait(timeout=None):
    """Wait for a background build; returns the module or None."""
    t = _thread
    if t is not None:
        t.join(timeout)
    return _module


def status():
    """Which reader cynag.torch steps use, in words."""
    if mode() == "off":
        return "Python reader (CYNAG_TORCH_NATIVE=0)"
    if _module is not None:
        return "native reader (built against this PyTorch)"
    if _error is not None:
        return "Python reader (the native reader could not be built: %s)" % _error
    if _thread is not None:
        return "Python reader while the native reader builds"
    return "native reader, built on first use (CYNAG_TORCH_NATIVE=%s)" % mode()
