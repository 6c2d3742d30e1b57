"""NPZ checkpoints and plain dictionaries, compatible with Chainer's.

Keys are Chainer's (``t``, ``epoch``, ``l1/W/t``, ``l1/W/v``, ``l1/W`` ...),
so a checkpoint written by ``chainer.serializers.save_npz`` loads here and
one written here loads into Chainer.  Three deliberate differences make
checkpoints safe:

* **No pickle.**  cynag never writes pickled objects and reads with pickle
  disabled.  Chainer stores ``None`` (an uninitialized parameter) as a pickled
  object array; cynag records such keys, without pickle, in the array
  ``__cynag_none__`` (a list of key names) and loads them back as ``None``.
  Loading a file that holds a pickled object is refused with a message naming
  the key, unless the caller passes ``allow_pickle=True`` (only for files you
  trust: unpickling can run arbitrary code).
* **Atomic save.**  :func:`save_npz` to a path writes a temporary file in the
  same folder and renames it into place, so a crash or a full disk never
  leaves a truncated file where a good checkpoint was.
* **All or nothing load.**  :func:`load_npz` and :func:`deserialize` first
  read and check every value the object asks for (presence under
  ``strict=True``, shape, dtype kind, readable data), and only then assign:
  a bad file raises an error naming the key and leaves the object unchanged.
"""
import os
import sys
import tempfile

import numpy

from cynag import _backend
from cynag.serializer import Deserializer, Serializer

__all__ = ["CheckpointError", "CheckpointTypeError", "DictionarySerializer", "NONE_KEYS",
           "NpzDeserializer", "deserialize", "load_npz", "save_npz", "serialize"]

#: Key under which the names of ``None`` values are stored (no pickle).
NONE_KEYS = "__cynag_none__"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded (corrupt, truncated, pickled or mismatching)."""


class CheckpointTypeError(CheckpointError, TypeError):
    """A stored value's type cannot be loaded into the object's (Chainer raises TypeError)."""


def _to_numpy(value):
    if _backend.is_cupy_array(value):
        return value.get()
    if isinstance(value, numpy.ndarray):
        return value
    return numpy.asarray(value)


class DictionarySerializer(Serializer):
    """Serializer into a flat dictionary of NumPy arrays.

    Args:
        target (dict): the dictionary to fill (a new one if ``None``).
        path (str): the base path of this serializer in the hierarchy.

    Attributes:
        target (dict): keys are paths (``'l1/W/v'``), values NumPy arrays (the
            parameters' and states' own arrays, not copies, as in Chainer;
            scalars become 0-d arrays) or ``numpy.asarray(None)`` for
            ``None``.  Feed it to :func:`save_npz` or keep it as is.
    """

    def __new__(cls, *args, **kwargs):
        # Also a chainer.serializer.Serializer when Chainer is loaded: Chainer's
        # objects (Trainer, LogReport, ...) tell saving from loading by it.
        if cls is DictionarySerializer:
            cls = _chainer_class(DictionarySerializer, "Serializer")
        return super().__new__(cls)

    def __init__(self, target=None, path=""):
        self.target = {} if target is None else target
        self.path = path

    def __getitem__(self, key):
        key = key.strip("/")
        return DictionarySerializer(self.target, self.path + key + "/")

    def __call__(self, key, value):
        key = key.lstrip("/")
        self.target[self.path + key] = (_to_numpy(value) if value is not None
                                        else numpy.asarray(None))
        return value


def serialize(obj, *, copy=False):
    """The state of ``obj`` as a flat dict of NumPy arrays (Chainer's keys).

    Args:
        obj: an object with a ``serialize`` method (optimizer, link, ...).
        copy (bool): copy the arrays, so that the dict is a snapshot that
            later training does not change.  Chainer's ``serialize`` returns
            the live arrays (the default here too).
    """
    s = DictionarySerializer()
    s.save(obj)
    if copy:
        return {k: v.copy() for k, v in s.target.items()}
    return s.target


def _is_none_array(a):
    return isinstance(a, numpy.ndarray) and a.dtype == object and a.shape == () \
        and a[()] is None


def _pickle_free(target):
    """``target`` with None values moved to the NONE_KEYS list; refuses other objects."""
    out, none_keys = {}, []
    for key, value in target.items():
        arr = _to_numpy(value) if value is not None else numpy.asarray(None)
        if arr.dtype == object:
            if _is_none_array(arr):
                none_keys.append(key)
                continue
            raise TypeError("cannot save key %r: it holds Python objects (dtype object), which "
                            "would need pickle; cynag writes numeric arrays only" % (key,))
        if key == NONE_KEYS:
            raise ValueError("key %r is reserved" % (NONE_KEYS,))
        out[key] = arr
    if none_keys:
        out[NONE_KEYS] = numpy.array(none_keys, dtype=str)
    return out


def save_npz(file, obj, compression=True):
    """Save ``obj`` (or a dict of arrays) to an NPZ file, without pickle.

    Args:
        file (str, path-like or file object): where to write.  A path is
            written atomically: a temporary file in the same folder, flushed
            to disk, then renamed over ``file``.
        obj: an object with a ``serialize`` method, or a dict (saved as is).
        compression (bool): use ``numpy.savez_compressed``.
    """
    if isinstance(obj, dict):
        target = obj
    else:
        s = DictionarySerializer()
        s.save(obj)
        target = s.target
    arrays = _pickle_free(target)
    write = numpy.savez_compressed if compression else numpy.savez
    if not isinstance(file, (str, bytes, os.PathLike)):
        write(file, **arrays)
        return
    path = os.fspath(file)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    # Through a symbolic link (e.g. latest.npz) to the file it names, which is
    # replaced; the link stays.
    target = os.path.realpath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".cynag-",
                                   suffix=".tmp")
    except OSError as e:
        raise _path_error(e, path, "cannot create a temporary file beside") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(target))
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise _path_error(e, path, "cannot rename the temporary file onto") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _path_error(error, path, what):
    """An OSError of the same type whose message names the user's path."""
    message = "%s %r: %s (save_npz writes a temporary file in the same folder and " \
              "renames it, so the folder must be writable)" % (what, path,
                                                              error.strerror or error)
    try:
        return type(error)(error.errno, message) if error.errno else type(error)(message)
    except Exception:  # pragma: no cover
        return error


def _file_mode(path):
    """Mode for the new file: the replaced file's, else what open() would give."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class _LoadContext:
    """State shared by an NpzDeserializer and its children during one load."""

    def __init__(self, npz, allow_pickle):
        self.npz = npz
        self.allow_pickle = allow_pickle
        self.validating = False
        self.cache = {}
        none = None
        try:
            if NONE_KEYS in npz:
                none = npz[NONE_KEYS]
        except Exception as e:
            raise CheckpointError("cannot read key %r: %s" % (NONE_KEYS, e)) from e
        self.none_keys = set() if none is None else {str(k) for k in numpy.ravel(none)}

    def read(self, key):
        """The stored array for ``key`` (None for a None value), cached."""
        if key in self.cache:
            return self.cache[key]
        if key in self.none_keys:
            value = None
        else:
            try:
                value = self.npz[key]
            except KeyError:
                raise
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise CheckpointError(
                        "key %r holds a pickled Python object (Chainer writes None this way); "
                        "cynag loads with pickle disabled. If you trust this file, pass "
                        "allow_pickle=True to load_npz (unpickling can run arbitrary code)"
                        % (key,)) from None
                raise CheckpointError("cannot read key %r: %s" % (key, e)) from e
            except Exception as e:  # zlib.error, BadZipFile, EOFError, OSError, ...
                raise CheckpointError("cannot read key %r (truncated or corrupt file?): %s: %s"
                                      % (key, type(e).__name__, e)) from e
            value = numpy.asarray(value)
            if value.dtype == object:
                if not self.allow_pickle:  # a dict target may hold object arrays
                    if not _is_none_array(value):
                        raise CheckpointError("key %r holds Python objects; pass "
                                              "allow_pickle=True to accept them" % (key,))
                if value.shape == () and value[()] is None:
                    value = None
        self.cache[key] = value
        return value

    def contains(self, key):
        return key in self.none_keys or key in self.npz


def _check_compatible(key, stored, value):
    """Raise if the stored array cannot be assigned to ``value``; no side effect."""
    if isinstance(value, numpy.ndarray) or _backend.is_cupy_array(value):
        if stored.shape != value.shape:
            raise CheckpointError("key %r has shape %s in the checkpoint but %s in the object"
                                  % (key, stored.shape, value.shape))
        kinds = stored.dtype.kind + value.dtype.kind
        if not (kinds[0] == kinds[1] or set(kinds) <= set("iu")) or not numpy.can_cast(
                stored.dtype, value.dtype, casting="same_kind"):
            raise CheckpointTypeError("key %r has dtype %s in the checkpoint but %s in the "
                                      "object (a different kind of number)"
                                      % (key, stored.dtype, value.dtype))
        return
    kind = stored.dtype.kind
    if value is None:
        # Becomes an array of the object (a state entry, an uninitialized
        # parameter): it must be numeric.
        if kind not in "biufc":
            raise CheckpointTypeError("key %r holds dtype %s, not a numeric array"
                                      % (key, stored.dtype))
        return
    if isinstance(value, str):
        if stored.shape != () or kind not in "US":
            raise CheckpointTypeError("key %r: expected a string, got an array of shape %s and "
                                      "dtype %s" % (key, stored.shape, stored.dtype))
        return
    if stored.size != 1 or kind not in "biufc":
        raise CheckpointTypeError("key %r: expected a scalar for %s, got an array of shape %s "
                                  "and dtype %s" % (key, type(value).__name__, stored.shape,
                                                    stored.dtype))
    # Chainer's rule: an integer into a Python int, otherwise a safe cast.
    if kind in "iu" and type(value) is int:
        return
    if not numpy.can_cast(stored.dtype, type(value), casting="safe"):
        raise CheckpointTypeError("key %r: cannot safely load dtype %s into a value of type %s"
                                  % (key, stored.dtype, type(value).__name__))


class NpzDeserializer(Deserializer):
    """Deserializer from an NPZ file (or any mapping of key to array).

    Args:
        npz: the result of ``numpy.load`` on an NPZ file, or a dict of arrays
            (e.g. from :func:`serialize`).
        path (str): the base path in the hierarchy to load from.
        strict (bool): a missing key is a ``KeyError``; with ``False`` the
            value is left as it is.
        ignore_names (str, callable or list of them): keys to skip (a name,
            or a predicate on the key).
        allow_pickle (bool): keyword-only; accept pickled object arrays from
            a mapping that holds them (the NPZ reading itself is decided by
            :func:`load_npz`).

    :meth:`load` is all or nothing: it reads and checks every value first and
    assigns only when all are good.  Calling ``obj.serialize(deserializer)``
    directly assigns as it goes, as Chainer does.
    """

    def __new__(cls, *args, **kwargs):
        # Also a chainer.serializer.Deserializer when Chainer is loaded, so
        # that Chainer's update rules recognise it (see _chainer_class).
        if cls is NpzDeserializer:
            cls = _chainer_class(NpzDeserializer, "Deserializer")
        return super().__new__(cls)

    def __init__(self, npz, path="", strict=True, ignore_names=None, *, allow_pickle=False,
                 _context=None):
        self.npz = npz
        self.path = path
        self.strict = strict
        self.ignore_names = [] if ignore_names is None else ignore_names
        self.allow_pickle = allow_pickle
        self._ctx = _context if _context is not None else _LoadContext(npz, allow_pickle)

    def __getitem__(self, key):
        key = key.strip("/")
        return type(self)(self.npz, self.path + key + "/", strict=self.strict,
                          ignore_names=self.ignore_names, allow_pickle=self.allow_pickle,
                          _context=self._ctx)

    def _ignored(self, key):
        names = self.ignore_names
        if not isinstance(names, (tuple, list)):
            names = (names,)
        for name in names:
            if isinstance(name, str):
                if key == name:
                    return True
            elif callable(name):
                if name(key):
                    return True
            else:
                raise ValueError("ignore_names needs to be a callable, string or list of them.")
        return False

    def __call__(self, key, value):
        key = self.path + key.lstrip("/")
        ctx = self._ctx
        if not self.strict and not ctx.contains(key):
            return value
        if self._ignored(key):
            return value
        if not ctx.contains(key):
            raise KeyError("checkpoint has no key %r" % (key,))
        stored = ctx.read(key)
        if stored is None:
            return None
        _check_compatible(key, stored, value)
        if ctx.validating and not isinstance(value, (str, bytes)):
            # Nothing changes in the first pass: the caller gets back its own
            # value (assigned in the second).  A string is returned as stored:
            # callers decode it (LogReport: json.loads(serializer('_log', ''))).
            return value
        if value is None:
            return stored.copy()
        if isinstance(value, numpy.ndarray):
            numpy.copyto(value, stored)
            return value
        if _backend.is_cupy_array(value):
            value.set(numpy.asarray(stored, dtype=value.dtype))
            return value
        # A scalar (possibly stored as a one-element array, as NumPy 1.x allows).
        return type(value)(stored.reshape(())[()])

    @property
    def checking(self):
        """True during the first pass of :meth:`load`, which reads and checks
        every value but assigns nothing: the caller gets its own value back,
        except a string, which it gets as stored (callers decode it, as
        Chainer's ``LogReport`` does); ``serialize`` methods with side effects
        can test this."""
        return self._ctx.validating

    def load(self, obj):
        """Load ``obj``: check every value first, then assign (all or nothing)."""
        self._ctx.validating = True
        try:
            obj.serialize(self)
        finally:
            self._ctx.validating = False
        obj.serialize(self)


_chainer_compatible = {}


def _chainer_class(cls, base_name):
    """``cls``, also a subclass of ``chainer.serializer.<base_name>`` if Chainer is loaded.

    Chainer's update rules and training objects tell loading from saving by
    ``isinstance(serializer, chainer.serializer.Deserializer)`` (or
    ``Serializer``); with this, cynag's savers and loaders handle Chainer's
    objects too.  Chainer is never imported here: only a Chainer the program
    already uses counts.
    """
    chainer_serializer = sys.modules.get("chainer.serializer")
    base = getattr(chainer_serializer, base_name, None)
    if base is None:
        return cls
    sub = _chainer_compatible.get((cls, base))
    if sub is None:
        sub = type(cls.__name__, (cls, base), {"__module__": __name__})
        _chainer_compatible[(cls, base)] = sub
    return sub


def deserialize(target, obj, path="", strict=True, ignore_names=None, *, allow_pickle=False):
    """Load ``obj`` from a flat dict of arrays (the inverse of :func:`serialize`).

    All or nothing, like :func:`load_npz`.
    """
    NpzDeserializer(target, path=path, strict=strict, ignore_names=ignore_names,
                    allow_pickle=allow_pickle).load(obj)


def load_npz(file, obj, path="", strict=True, ignore_names=None, *, allow_pickle=False):
    """Load ``obj`` from an NPZ file written by cynag or Chainer.

    Args:
        file (str, path-like or file object): the NPZ file.
        obj: an object with a ``serialize`` method (optimizer, link, ...).
        path (str): the path in the file under which ``obj`` was saved.
        strict (bool): a key the object asks for and the file lacks is a
            ``KeyError`` (``False``: keep the object's value).
        ignore_names (str, callable or list of them): keys to skip.
        allow_pickle (bool): keyword-only.  Chainer stores ``None`` as a
            pickled object; such a file is refused unless this is ``True``.
            Only for files you trust: unpickling can run arbitrary code.

    Raises:
        KeyError: a key is missing (``strict=True``).
        CheckpointError: the file is truncated or corrupt, holds a pickled
            object, or a value does not fit (shape, dtype kind).  The message
            names the key.  Nothing in ``obj`` has changed.
    """
    try:
        npz = numpy.load(file, allow_pickle=allow_pickle)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # BadZipFile, ValueError, EOFError, UnpicklingError, ...
        raise CheckpointError("cannot open %r as an NPZ checkpoint (truncated or corrupt?): "
                              "%s: %s" % (file, type(e).__name__, e)) from e
    if not isinstance(npz, numpy.lib.npyio.NpzFile):
        raise CheckpointError("%r is a .npy array, not an NPZ checkpoint" % (file,))
    with npz:
        NpzDeserializer(npz, path=path, strict=strict, ignore_names=ignore_names,
                        allow_pickle=allow_pickle).load(obj)
