"""Which arrays a collective operation moves, and how: groups, segments, buckets.

A :class:`Layout` is a model's initialized parameters in ChainerMN's order
(``sorted(model.namedparams())``, by path), split into *groups* by device and
dtype.  Every rank builds its own layout; the ranks agree on it through its
:attr:`Layout.sig` (a hash of the paths, shapes, dtypes and kinds of device,
never of addresses or device numbers) before any message that depends on it.

Within a CPU group, per step, the arrays (gradients or parameters) are split
into *segments* (:class:`Segments`):

* *direct* regions: one large dense array, or a run of arrays that lie back
  to back in one buffer (contiguous mode: views of ``opt.contiguous_buffers``),
  reduced in place, without any copy;
* the *packed* rest: arrays concatenated (virtually) in layout order and
  moved through a reused staging buffer, one bucket at a time
  (:mod:`cynag_kernels._pack` packs and unpacks a bucket in one call).

Segments are reused while the same entries take part; a split with runs
(which depend on addresses) is recomputed when the arrays' addresses change.

A layout is kept across steps while its :class:`Snapshot` of
``model.namedparams()`` still holds: the caller lists ``namedparams()`` at
every step and :meth:`Snapshot.matches` compares, in one native pass, the
paths, the parameter objects and each parameter's array (None, or dtype and
shape) with those the layout was built from.  Nothing else is trusted: a
parameter added, removed, initialized or given an array of another shape or
dtype rebuilds the layout.
"""
import collections
import hashlib
import operator
import weakref
import zlib

import numpy

from cynag import _backend

FLOAT_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
                numpy.dtype(numpy.float64))
_PATH = operator.itemgetter(0)
_SIG_MASK = (1 << 62) - 1


def stable_hash(obj):
    """A 62-bit hash of ``repr(obj)``, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(obj).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SIG_MASK


def _kernels():
    from cynag_kernels import _pack

    return _pack


def collect(model, items=None):
    """``[(path, param)]`` of ``model``'s initialized parameters, sorted by path.

    As ChainerMN's ``sorted(model.namedparams())`` with ``param.data is not
    None``; a parameter reachable under two paths is kept once (at its first
    path).  ``items``: ``list(model.namedparams())`` if the caller has it.
    """
    if items is None:
        items = list(model.namedparams())
    items = sorted(items, key=_PATH)
    seen = set()
    out = []
    for path, param in items:
        if param.array is None or id(param) in seen:
            continue
        seen.add(id(param))
        out.append((path, param))
    return out


class Snapshot:
    """``list(model.namedparams())`` as it was, and what each parameter's array was.

    ``arrays=True`` records each array's dtype and shape (None, a NumPy
    array, or another array type, whose type, dtype, shape and device are
    checked in Python); ``arrays=False`` only whether it is None (what
    ChainerMN's multi-node optimizer compares).
    """

    def __init__(self, items, arrays=True):
        K = _kernels()
        self.keys = []
        self.objs = []
        kinds = []
        shape_at = [0]
        dims = []
        self.others = []       # (index, key) of arrays that are not NumPy arrays
        for i, (path, param) in enumerate(items):
            self.keys.append(path)
            self.objs.append(param)
            a = param.array
            if a is None:
                kinds.append(K.KIND_NONE)
            elif not arrays:
                kinds.append(K.KIND_SET)
            elif isinstance(a, numpy.ndarray):
                kinds.append(a.dtype.num)
                dims.extend(a.shape)
            else:
                kinds.append(K.KIND_OTHER)
                self.others.append((i, _other_key(a)))
            shape_at.append(len(dims))
        self.kinds = numpy.array(kinds, numpy.int32)
        self.shape_at = numpy.array(shape_at, numpy.int64)
        self.dims = numpy.array(dims, numpy.int64)

    def matches(self, items):
        """True if ``items`` (``list(model.namedparams())`` now) is what was recorded."""
        from cynag import _multi_tensor  # noqa: F401 - configures cynag._step
        from cynag._step import read_attribute

        values = [None] * len(self.objs)
        if len(items) == len(self.objs):
            read_attribute(self.objs, "array", values)
        if not _kernels().same_entries(items, self.keys, self.objs, "array", self.kinds,
                                       self.shape_at, self.dims, values):
            return False
        for i, key in self.others:
            if _other_key(self.objs[i].array) != key:
                return False
        return True


def _other_key(a):
    return (type(a), tuple(a.shape), numpy.dtype(a.dtype), _backend.device_of(a))


class Group:
    """The parameters of one layout that share a device and a dtype."""

    def __init__(self, key, indices, params, paths):
        self.key = key                      # (device, dtype)
        self.device, self.dtype = key
        self.indices = indices              # positions in the layout
        self.params = params
        self.paths = paths
        self.shapes = [p.array.shape for p in params]
        self.sizes = numpy.array([p.array.size for p in params], numpy.int64)
        self.scalar = numpy.array([len(s) == 0 for s in self.shapes], bool)
        # The shapes for the arrays' check (_pack.scan): of entry i,
        # dims[shape_at[i]:shape_at[i + 1]].
        self.shape_at = numpy.cumsum([0] + [len(s) for s in self.shapes]).astype(numpy.int64)
        self.dims = numpy.array([d for s in self.shapes for d in s], numpy.int64)
        self.n = len(params)
        self.ptrs = numpy.zeros(self.n, numpy.int64)
        self.codes = numpy.zeros(self.n, numpy.int8)
        self.cache = {}                     # per-purpose Segments, keyed by purpose

    @property
    def is_cpu(self):
        return self.device == "cpu"


class Layout:
    """The initialized parameters of a model, sorted by path, grouped by device and dtype."""

    def __init__(self, model, items, gpu_kind=None, snapshot=None):
        """``items``: from :func:`collect`; ``snapshot``: the :class:`Snapshot` of
        ``model.namedparams()`` they come from (None: the layout is never reused)."""
        # (weakly: a communicator's cache of layouts must not keep models alive)
        try:
            self._model = weakref.ref(model)
        except TypeError:
            self._model = lambda model=model: model
        self.snapshot = snapshot
        self.paths = [path for path, _ in items]
        self.params = [p for _, p in items]
        self.arrays_desc = []
        groups = collections.OrderedDict()
        for i, (path, param) in enumerate(items):
            array = param.array
            device = _backend.device_of(array)
            dtype = numpy.dtype(array.dtype)
            if device is None:
                kind = "?"
            elif device == "cpu":
                kind = "cpu"
            else:  # the transport is part of what the ranks must agree on
                kind = gpu_kind() if gpu_kind is not None else "gpu"
            self.arrays_desc.append((path, tuple(array.shape), dtype.str, kind))
            groups.setdefault((device, dtype), []).append(i)
        self.groups = [
            Group(key, idx, [self.params[i] for i in idx], [self.paths[i] for i in idx])
            for key, idx in groups.items()]
        self.sig = stable_hash(self.arrays_desc)

    def still_valid(self, model, items):
        """True if ``model``, whose ``namedparams()`` are now ``items``, still has
        exactly these parameters (with arrays of these shapes and dtypes)."""
        return (model is self._model() and self.snapshot is not None
                and self.snapshot.matches(items))


class Segments:
    """How one CPU group's arrays are moved in one step (see the module docstring).

    Attributes:
        ptrs: the addresses these segments were computed for.
        direct: ``[(kind, payload)]``: ``('run', 1-d view)`` for a run of
            arrays in one buffer, ``('one', index)`` for a single large
            array (viewed as 1-d at each step).
        packed: indices (into the group) of the packed arrays, in order.
        offsets: int64 cumulative sizes of the packed arrays (``n + 1``).
        buckets: ``[(lo, hi, first, last, scalars)]``: element range of the
            packed vector, the packed arrays it touches, and the 0-d arrays
            in it as ``(position in packed, offset - lo)``.
        total: elements in the packed vector.
    """

    def __init__(self, ptrs, active, direct, packed, sizes, scalar, bucket_elems):
        self.ptrs = ptrs.copy()
        self.active = active.copy()
        # the caller's mask itself when it cannot change (the shared all-True
        # mask is read-only): the same object again needs no comparison
        self._active_obj = None if active.flags.writeable else active
        self.direct = direct
        self.has_runs = any(kind == "run" for kind, _ in direct)
        self.packed = packed
        self.all_packed = len(packed) == len(ptrs)
        psizes = sizes[packed] if len(packed) else numpy.zeros(0, numpy.int64)
        self.offsets = numpy.zeros(len(packed) + 1, numpy.int64)
        numpy.cumsum(psizes, out=self.offsets[1:])
        self.total = int(self.offsets[-1])
        self.buckets = []
        step = max(1, int(bucket_elems))
        pscalar = scalar[packed] if len(packed) else numpy.zeros(0, bool)
        scalar_pos = numpy.flatnonzero(pscalar)
        for lo in range(0, self.total, step):
            hi = min(self.total, lo + step)
            # arrays touching [lo, hi): the first whose end is past lo, up to
            # the last whose start is before hi
            first = int(numpy.searchsorted(self.offsets, lo, side="right")) - 1
            last = int(numpy.searchsorted(self.offsets, hi, side="left"))
            scalars = [(int(k), int(self.offsets[k]) - lo) for k in scalar_pos
                       if lo <= self.offsets[k] < hi]
            self.buckets.append((lo, hi, first, last, scalars))

    def matches(self, ptrs, active):
        """True if this split still applies to arrays at ``ptrs`` taking part as ``active``.

        Only runs depend on addresses; a split without runs depends on the
        sizes and ``active`` alone, so new gradient arrays (a backward pass
        makes them at every step) keep it.
        """
        if active is not self._active_obj and not numpy.array_equal(self.active, active):
            return False
        if not self.has_runs:
            return True
        return self.ptrs.shape == ptrs.shape and numpy.array_equal(self.ptrs, ptrs)


def _run_view(arrays, run, ptr0, count, dtype):
    """A 1-d view over ``count`` elements at ``ptr0`` spanning ``arrays[run]``, or None.

    Only when every array of the run is a view of one C-contiguous NumPy
    buffer that holds the whole span (as the views of contiguous mode are).
    """
    base = getattr(arrays[run[0]], "base", None)
    if not isinstance(base, numpy.ndarray) or not base.flags.c_contiguous:
        return None
    for i in run[1:]:
        if arrays[i].base is not base:
            return None
    bptr = base.__array_interface__["data"][0]
    nbytes = count * dtype.itemsize
    if ptr0 < bptr or ptr0 + nbytes > bptr + base.nbytes:
        return None
    return numpy.ndarray((count,), dtype, buffer=base, offset=ptr0 - bptr)


def compute_segments(group, arrays, ptrs, active, direct_min_bytes, bucket_elems,
                     allow_direct=True, allow_runs=True):
    """Split ``group``'s ``arrays`` (only the ``active`` ones; all dense) into segments.

    Everything the other ranks must do alike follows the layout order:
    direct entries are listed by the layout index of their first array, and
    a run is a sequence of *consecutive* arrays of the layout that lie back
    to back in memory.  The result's :attr:`Segments.sig` describes the
    split; the ranks compare it before using it (runs depend on addresses,
    which differ between processes) and fall back to ``allow_runs=False``,
    which depends on the sizes only, when it differs.

    Args:
        group: the :class:`Group`.
        arrays: one array (or None) per group entry.
        ptrs: their data addresses (int64; entries not active are ignored).
        active: boolean mask of the entries that take part.
        direct_min_bytes: a run or array of at least this many bytes is
            moved in place; smaller ones are packed.
        bucket_elems: elements per bucket of the packed vector.
        allow_direct: False to pack everything (float16 gradients, which
            travel as float32).
        allow_runs: False to consider each array on its own.
    """
    sizes = group.sizes
    itemsize = group.dtype.itemsize
    use = active & (sizes > 0)
    direct = []
    sig = []
    in_direct = numpy.zeros(group.n, bool)
    if allow_direct:
        cand = numpy.flatnonzero(use & ~group.scalar)
        if len(cand):
            nb = sizes[cand] * itemsize
            if allow_runs:
                p = ptrs[cand]
                adjacent = (p[1:] == p[:-1] + nb[:-1]) & (cand[1:] == cand[:-1] + 1)
                starts = numpy.concatenate(([0], numpy.flatnonzero(~adjacent) + 1))
            else:
                starts = numpy.arange(len(cand))
            ends = numpy.concatenate((starts[1:], [len(cand)]))
            run_bytes = numpy.add.reduceat(nb, starts)
            large = numpy.flatnonzero(run_bytes >= direct_min_bytes)
            for s, e, rb in zip(starts[large].tolist(), ends[large].tolist(),
                                run_bytes[large].tolist()):
                run = cand[s:e].tolist()
                if len(run) > 1:
                    view = _run_view(arrays, run, int(ptrs[run[0]]), int(rb // itemsize),
                                     group.dtype)
                    if view is not None:
                        direct.append(("run", view))
                        sig.append((run[0], run[-1]))
                        in_direct[run] = True
                        continue
                for i in run:  # alone, or adjacent by chance: each large one alone
                    if sizes[i] * itemsize >= direct_min_bytes:
                        direct.append(("one", i))
                        sig.append((i,))
                        in_direct[i] = True
    packed = numpy.flatnonzero(use & ~in_direct)
    seg = Segments(ptrs, active, direct, packed, sizes, group.scalar, bucket_elems)
    seg.sig = zlib.crc32(repr((sig, len(packed))).encode())
    return seg
