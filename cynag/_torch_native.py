"""cynag.torch's native reader: ``_torch_native.cpp`` built against the installed PyTorch.

PyTorch's Python attributes cost 0.1-0.2 us each, and a step needs about
fifteen of them per parameter; the reader takes the same decisions from the
tensors in C++ (see the source).  It is compiled with
``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; ``pip install "cynag[torch]"`` brings ninja) the first time it is
wanted, and cached by PyTorch (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``), under a name derived from the source and
PyTorch's version.

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
import os
import threading

_lock = threading.Lock()
_module = None
_error = None
_thread = None


def mode():
    value = os.environ.get("CYNAG_TORCH_NATIVE", "background").strip().lower()
    if value in ("0", "off", "no", "false"):
        return "off"
    if value in ("1", "on", "yes", "true", "sync"):
        return "sync"
    return "background"


def _source():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_torch_native.cpp")) as f:
        return f.read()


def _build():
    import torch
    from torch.utils.cpp_extension import load_inline

    src = _source()
    digest = hashlib.sha1((src + torch.__version__).encode()).hexdigest()[:12]
    return load_inline("cynag_torch_native_%s" % digest, cpp_sources=src,
                       functions=["collect", "bump_steps"], extra_cflags=["-O2"],
                       verbose=False)


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
