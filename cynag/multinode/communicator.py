"""The MPI communicator of :mod:`cynag.multinode` (ChainerMN's interface).

Gradients are averaged with few messages: per device and dtype, the packed
gradients one bucket at a time, and each large gradient (or run of gradients
that lie back to back in one buffer, as in contiguous mode) in place, one
bucket-sized chunk at a time, without any copy.  A bucket is averaged by a
ring reduce-scatter over ``Sendrecv`` whose last addition is fused with the
multiplication by ``1.0 / size`` in the gradient's dtype, then a ring
allgather: the numbers of ChainerMN's communicators (``Allreduce``, then
``recvbuf *= 1.0 / comm.size``) without the separate pass.  float16
gradients travel as float32, as in ChainerMN, through ``Allreduce``, and
are multiplied while unpacked (rounded to float16 first, as NumPy does); so
is a bucket with a 0-d gradient (multiplied in float64 and rounded once, as
NumPy 1.x computes it).  With two processes the sum of two values does not
depend on the order of the operands, so the averaged gradients are
bit-identical to ChainerMN's ``naive`` communicator; with three or more the
order of the additions differs from MPI's, so results agree to rounding.

Before every collective operation on a model, the ranks exchange one small
message (an ``Allreduce`` of five integers): a hash of the model's layout
(paths, shapes, dtypes, kind of device), of which gradients take part, of
the operation, and a flag for a local error.  When they disagree, every rank
raises an exception naming the first differing parameter (or the failing
rank's error) instead of blocking in a mismatched collective.
"""
import collections
import operator
import pickle
import weakref
import zlib

import numpy

from cynag import _backend
from cynag._multi_tensor import list_namedparams
from cynag.multinode import _layout
from cynag.multinode._mpi import import_mpi
from cynag.optimizer import _param_label
from cynag.parameter import Parameter, _zero_grad

#: Default size of one message of gradients.  Measured on a 2-core machine
#: with MPICH's shared-memory transport: buckets of 1 to 16 MB reduce as fast
#: as each other and several times faster than one message of 64 MB, while a
#: bucket that fits the last-level cache keeps packing, reduction and
#: unpacking in cache.  See ``python -m cynag.multinode.bench``.
DEFAULT_BUCKET_BYTES = 4 * 1024 * 1024
#: Gradients (or runs of adjacent gradients) of at least this size are
#: reduced in place instead of being copied through the packing buffer.
DEFAULT_DIRECT_MIN_BYTES = 256 * 1024

#: Buckets are averaged by the ring (:meth:`MpiCommunicator._ring_mean`) when
#: each rank's piece of the bucket has at least this many bytes; smaller ones
#: by one ``Allreduce`` and a multiplication (fewer messages).
RING_MIN_BYTES = 32 * 1024
#: Message tags of the ring reduction (:meth:`MpiCommunicator._ring_mean`).
_TAG_REDUCE = 0x6379
_TAG_GATHER = 0x6380

_KIND_MEAN = 1
_KIND_BCAST = 2
_KIND_NAMES = {_KIND_MEAN: "average gradients (multi_node_mean_grad)",
               _KIND_BCAST: "broadcast parameters (bcast_data)"}
_GRAD = operator.attrgetter("grad")
_ARRAY = operator.attrgetter("array")
_TYPE_NUMS = {numpy.dtype(numpy.float16): 23, numpy.dtype(numpy.float32): 11,
              numpy.dtype(numpy.float64): 12}


class ModelMismatchError(ValueError):
    """The ranks' models (or what they asked to do with them) differ.

    Raised on every rank, with the same message, naming the first differing
    parameter.
    """


class MultiNodeError(RuntimeError):
    """Another rank failed before a collective operation; raised on the ranks that did not."""


def _read_attribute(params, attr, out):
    from cynag import _multi_tensor  # noqa: F401 - configures cynag._step
    from cynag._step import read_attribute

    read_attribute(params, attr, out)


def _kernels():
    from cynag_kernels import _pack

    return _pack


def _describe_entry(entry):
    if entry is None:
        return "no such initialized parameter"
    shape, dtype, kind = entry
    return "shape %s %s on %s" % (shape, numpy.dtype(dtype).name, kind)


def _ranks(ranks):
    ranks = sorted(ranks)
    return ("rank %d" % ranks[0]) if len(ranks) == 1 else (
        "ranks %s" % ", ".join(map(str, ranks)))


def describe_mismatch(infos):
    """The message of :class:`ModelMismatchError` from every rank's ``(kind, desc, missing)``."""
    lines = []
    kinds = [info[0] for info in infos]
    if len(set(kinds)) > 1:
        by_kind = collections.defaultdict(list)
        for r, k in enumerate(kinds):
            by_kind[k].append(r)
        lines.append("the ranks were asked to do different things: %s" % "; ".join(
            "%s %s" % (_ranks(rs), "to " + _KIND_NAMES.get(k, str(k)))
            for k, rs in sorted(by_kind.items())))
        if _KIND_BCAST in by_kind:
            lines.append("(the multi-node optimizer broadcasts when a rank's set of initialized "
                         "parameters changed since its last update)")
    configs = [info[3] if len(info) > 3 else None for info in infos]
    if any(c != configs[0] for c in configs):
        by_config = collections.OrderedDict()
        for r, c in enumerate(configs):
            by_config.setdefault(repr(c), []).append(r)
        lines.append("the ranks' communicator settings differ (set_config must be called "
                     "alike on every rank): %s" % "; ".join(
                         "%s on %s" % (c, _ranks(rs)) for c, rs in by_config.items()))
    maps = [dict((d[0], tuple(d[1:])) for d in info[1]) for info in infos]
    paths = sorted(set().union(*maps))
    for path in paths:
        vals = [m.get(path) for m in maps]
        if any(v != vals[0] for v in vals):
            groups = collections.OrderedDict()
            for r, v in enumerate(vals):
                groups.setdefault(v, []).append(r)
            lines.append("first differing parameter %r: %s" % (path, "; ".join(
                "%s on %s" % (_describe_entry(v), _ranks(rs)) for v, rs in groups.items())))
            break
    else:
        missing = [set(info[2] or ()) for info in infos]
        for path in sorted(set().union(*missing)):
            without = [r for r, m in enumerate(missing) if path in m]
            if len(without) != len(infos):
                lines.append(
                    "parameter %r has a gradient on %s but None on %s; with zero_fill=False a "
                    "gradient that is None on some ranks only cannot be averaged (ChainerMN "
                    "would block); pass zero_fill=True to treat it as zeros"
                    % (path, _ranks(set(range(len(infos))) - set(without)), _ranks(without)))
                break
    settings_only = len(lines) == 1 and lines[0].startswith("the ranks' communicator settings")
    if not lines:
        lines.append("the ranks' layouts differ (no differing parameter found)")
    return "cynag.multinode: %s: %s" % (
        "the ranks disagree" if settings_only else "the models differ between ranks",
        "; ".join(lines))


class MpiCommunicator:
    """ChainerMN's communicator interface over mpi4py, with packed gradient averaging.

    Create it with :func:`cynag.multinode.create_communicator`.  Every
    process of ``mpi_comm`` must create it (collective: the ranks exchange
    their host names to find ``intra_rank`` and ``inter_rank``).

    Attributes:
        mpi_comm: the ``mpi4py.MPI.Comm`` used.
        bucket_bytes (int): bytes per message of gradients.
        direct_min_bytes (int): gradients (or runs of adjacent ones) of at
            least this many bytes are reduced in place, without packing.
    """

    def __init__(self, mpi_comm=None, name="mpi", bucket_bytes=None, direct_min_bytes=None):
        MPI = import_mpi()
        self._MPI = MPI
        self.mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.name = name
        self._configs = {"batched_copy": True}
        self.bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else int(bucket_bytes)
        self.direct_min_bytes = (DEFAULT_DIRECT_MIN_BYTES if direct_min_bytes is None
                                 else int(direct_min_bytes))
        if self.bucket_bytes < 8:
            raise ValueError("bucket_bytes must be at least 8, got %d" % self.bucket_bytes)
        self._layouts = collections.OrderedDict()
        self._finalizers = {}  # id(model) -> weakref.finalize dropping its layout
        self._names = {}  # (see cynag._step.link_namedparams)
        self._ctl = numpy.zeros(5, numpy.int64)
        self._settings_sig = (None, 0)   # ((bucket_bytes, direct_min_bytes), its hash)
        # The ring's point-to-point messages travel on a private duplicate, so
        # that no receive the program posts on mpi_comm (ANY_TAG) can take them.
        self._ring_comm = self.mpi_comm.Dup()
        self._staging = {}          # packing buffers, per dtype
        self._ring_tmp = {}         # receive buffers of the ring reduction, per dtype
        self._device_ops = None
        self._init_ranks()

    # -- ranks -------------------------------------------------------------
    def _init_ranks(self):
        comm = self.mpi_comm
        names = comm.allgather(self._MPI.Get_processor_name())
        by_name = collections.OrderedDict()
        for r, n in enumerate(names):
            by_name.setdefault(n, []).append(r)
        me = names[comm.rank]
        self._intra_rank = by_name[me].index(comm.rank)
        self._intra_size = len(by_name[me])
        self._inter_rank = list(by_name).index(me)
        self._inter_size = len(by_name)

    @property
    def rank(self):
        """Rank of this process in the communicator."""
        return self.mpi_comm.rank

    @property
    def size(self):
        """Number of processes."""
        return self.mpi_comm.size

    @property
    def intra_rank(self):
        """Rank of this process among those on its machine."""
        return self._intra_rank

    @property
    def intra_size(self):
        """Number of processes on this machine."""
        return self._intra_size

    @property
    def inter_rank(self):
        """Rank of this machine (machines ordered by their first process)."""
        return self._inter_rank

    @property
    def inter_size(self):
        """Number of machines."""
        return self._inter_size

    def __repr__(self):
        return "<cynag.multinode %s communicator: rank %d of %d>" % (self.name, self.rank,
                                                                     self.size)

    # -- configuration -------------------------------------------------------
    def set_config(self, name, value=True, **kwargs):
        """Set ``'batched_copy'`` (accepted, as in ChainerMN; cynag always packs),
        ``'bucket_bytes'`` or ``'direct_min_bytes'``."""
        if name == "batched_copy":
            self._configs["batched_copy"] = value
        elif name == "bucket_bytes":
            if int(value) < 8:
                raise ValueError("bucket_bytes must be at least 8, got %r" % (value,))
            self.bucket_bytes = int(value)
            self._drop_caches()
        elif name == "direct_min_bytes":
            self.direct_min_bytes = int(value)
            self._drop_caches()
        else:
            raise ValueError("Unknown config: {}".format(name))

    def get_config(self, name=None):
        """A configuration value, or all of them as a dict with ``name=None``."""
        configs = dict(self._configs, bucket_bytes=self.bucket_bytes,
                       direct_min_bytes=self.direct_min_bytes)
        if name is None:
            return configs
        return configs[name]

    def _drop_caches(self):
        self._layouts.clear()
        self._staging.clear()
        self._ring_tmp.clear()

    def split(self, color, key):
        """A communicator over ``mpi_comm.Split(color, key)``, with the same settings."""
        return self.__class__(mpi_comm=self.mpi_comm.Split(color, key), name=self.name,
                              bucket_bytes=self.bucket_bytes,
                              direct_min_bytes=self.direct_min_bytes)

    def finalize(self):
        """Release the NCCL communicators and the buffers (the MPI communicators are
        left to MPI); the communicator stays usable, as ChainerMN's does."""
        self._drop_caches()
        if self._device_ops is not None:
            self._device_ops.finalize()
            self._device_ops = None

    # -- objects ---------------------------------------------------------------
    def send_obj(self, obj, dest, tag=0):
        """Send a picklable object to ``dest``."""
        self.mpi_comm.send(obj, dest=dest, tag=tag)

    def recv_obj(self, source, status=None, tag=None):
        """Receive an object sent by :meth:`send_obj` (any tag by default)."""
        if tag is None:
            tag = self._MPI.ANY_TAG
        return self.mpi_comm.recv(source=source, status=status, tag=tag)

    def bcast_obj(self, obj, max_buf_len=256 * 1024 * 1024, root=0):
        """Broadcast a picklable object from ``root``; returns it on every rank.

        Large objects travel in chunks of ``max_buf_len`` bytes (as in
        ChainerMN, so that pickles over 2 GiB work).
        """
        comm = self.mpi_comm
        data = None
        head = None
        if comm.rank == root:
            # The root's chunk size is every rank's (as ChainerMN sends it).
            try:
                if not 0 < max_buf_len < 2 ** 31 - 1:
                    raise ValueError("max_buf_len must be in (0, 2**31 - 1), got %r"
                                     % (max_buf_len,))
                data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
                head = (len(data), max_buf_len, None)
            except Exception as e:
                failure = e
                head = (0, 0, "%s: %s" % (type(e).__name__, e))
        total, max_buf_len, error = comm.bcast(head, root=root)
        if error is not None:
            if comm.rank == root:
                raise failure
            raise MultiNodeError("cynag.multinode: bcast_obj failed on the root (rank %d): %s"
                                 % (root, error))
        if comm.rank != root:
            data = bytearray(total)
        view = memoryview(data)
        for lo in range(0, total, max_buf_len):
            chunk = view[lo:lo + max_buf_len]
            if comm.rank == root:
                comm.Bcast([bytearray(chunk), self._MPI.BYTE], root=root)
            else:
                comm.Bcast([chunk, self._MPI.BYTE], root=root)
        if comm.rank == root:
            return obj
        return pickle.loads(data)

    def gather_obj(self, obj, root=0):
        """Gather one object per rank at ``root`` (a list there, None elsewhere)."""
        return self.mpi_comm.gather(obj, root=root)

    def allreduce_obj(self, obj):
        """Sum of ``obj`` over the ranks (any objects ``+`` works on), on every rank."""
        return self.mpi_comm.allreduce(obj)

    # -- layouts -----------------------------------------------------------------
    def _forget(self, key):
        self._layouts.pop(key, None)
        self._finalizers.pop(key, None)

    def _layout(self, model, items=None):
        """The :class:`~cynag.multinode._layout.Layout` of ``model`` now.

        ``items``: ``list(model.namedparams())`` if the caller has it.  The
        cached layout is reused only when ``namedparams()`` lists the same
        paths and parameter objects, with arrays of the same dtypes and
        shapes (checked in one native pass; see ``_layout.Snapshot``).
        """
        if items is None:
            items = list_namedparams(model, self._names)
        layout = self._layouts.get(id(model))
        if layout is not None and layout.still_valid(model, items):
            return layout
        layout = _layout.Layout(model, _layout.collect(model, items), gpu_kind=self._gpu_kind,
                                snapshot=_layout.Snapshot(items))
        key = id(model)
        fin = self._finalizers.get(key)
        if fin is None or not fin.alive:
            # (dropped with the model: the layout holds its parameters; one
            # finalizer per model, which also forgets itself)
            try:
                self._finalizers[key] = weakref.finalize(model, self._forget, key)
            except TypeError:
                pass  # (a model without weak references: kept until pushed out)
        self._layouts[key] = layout
        self._layouts.move_to_end(id(model))
        while len(self._layouts) > 4:
            self._layouts.popitem(last=False)
        return layout

    def _agree(self, kind, layout, h, error, hs, missing=None):
        """The control message: raise on every rank unless all agree and none failed.

        Returns whether the ranks also split the arrays into the same
        segments (``hs``, see :func:`cynag.multinode._layout.compute_segments`).
        """
        MPI = self._MPI
        ctl = self._ctl
        # The settings decide how many messages of which sizes follow.
        settings = (self.bucket_bytes, self.direct_min_bytes)
        if self._settings_sig[0] != settings:
            self._settings_sig = (settings, _layout.stable_hash(settings))
        h ^= self._settings_sig[1]
        ctl[0] = h
        ctl[1] = -h
        ctl[2] = 0 if error is None else 1
        ctl[3] = hs
        ctl[4] = -hs
        self.mpi_comm.Allreduce(MPI.IN_PLACE, ctl, op=MPI.MAX)
        if ctl[2]:
            msgs = self.mpi_comm.allgather(
                None if error is None else "%s: %s" % (type(error).__name__, error))
            if error is not None:
                raise error
            failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
            raise MultiNodeError("cynag.multinode: %s failed before %s: %s" % (
                _ranks([r for r, _ in failed]), _KIND_NAMES[kind],
                "; ".join("rank %d: %s" % (r, m) for r, m in failed)))
        if ctl[0] != -ctl[1]:
            infos = self.mpi_comm.allgather(
                (kind, layout.arrays_desc, None if missing is None else missing(),
                 {"bucket_bytes": self.bucket_bytes,
                  "direct_min_bytes": self.direct_min_bytes}))
            raise ModelMismatchError(describe_mismatch(infos))
        return ctl[3] == -ctl[4]

    # -- gradients ---------------------------------------------------------------
    def multi_node_mean_grad(self, model, zero_fill=False):
        """Average the gradients of ``model``'s parameters over all processes, in place.

        As ChainerMN: the parameters are taken in ``sorted(namedparams())``
        order, uninitialized ones are skipped; with ``zero_fill`` a ``None``
        gradient becomes zeros first (and so receives the mean of the other
        ranks' gradients), without it that parameter is skipped (it must then
        be ``None`` on every rank: otherwise every rank raises
        :class:`ModelMismatchError`, where ChainerMN would block).  The
        gradients keep their arrays (contiguous mode keeps its views).
        """
        self._mean_grad(model, zero_fill, None)

    def _layout_or_agree(self, kind, model, items=None):
        """:meth:`_layout`; an error reading the model is raised on every rank
        (the others would wait for this one's messages)."""
        try:
            return self._layout(model, items)
        except Exception as e:
            self._agree(kind, None, 0, e, 0)
            raise  # (not reached: _agree raised)

    def _mean_grad(self, model, zero_fill, items):
        layout = self._layout_or_agree(_KIND_MEAN, model, items)
        error = None
        prepared = []
        plans = []
        try:
            for group in layout.groups:
                prep = self._prepare(group, zero_fill, mean=True)
                prepared.append(prep)
                plans.append(self._plan(group, "mean", prep[0], prep[1], True))
        except Exception as e:  # reported to the other ranks, then raised
            error = e
        h = layout.sig ^ (_KIND_MEAN << 3)
        if any(p[1] is not None for p in prepared):
            crc = 0
            for group, p in zip(layout.groups, prepared):
                if p[1] is not None:
                    crc = zlib.crc32(p[1].tobytes(), zlib.crc32(group.paths[0].encode(), crc))
            h ^= (crc << 20) | 1

        def missing():
            out = []
            for group, p in zip(layout.groups, prepared):
                if p[1] is not None:
                    out.extend(group.paths[i] for i in numpy.flatnonzero(~p[1]))
            return out

        if not self._agree(_KIND_MEAN, layout, h, error, _plans_sig(plans), missing):
            # the ranks split the arrays differently (addresses differ): by sizes only
            plans = [self._plan(group, "mean", p[0], p[1], False)
                     for group, p in zip(layout.groups, prepared)]
        if self.size == 1:
            return  # the mean of one value is the value (x * 1.0 == x in every dtype)
        for group, (arrays, active, fixups), plan in zip(layout.groups, prepared, plans):
            if active is not None and not active.any():
                continue  # (every gradient of the group skipped)
            if group.is_cpu:
                self._mean_cpu(group, arrays, plan)
            else:
                self._device().mean(group, arrays, plan)
            for dst, tmp in fixups:
                dst[...] = tmp

    def allreduce_grad(self, model, zero_fill=False):
        """Alias of :meth:`multi_node_mean_grad` (ChainerMN's older name)."""
        self.multi_node_mean_grad(model, zero_fill)

    def _prepare(self, group, zero_fill, mean):
        """Arrays of one group for this step: ``(arrays, active or None, fixups)``.

        The gradients (``mean``) or parameter arrays are read from the
        parameters, checked and their addresses recorded in ``group.ptrs``
        in one native pass (``_pack.gather``).  ``active`` is None when
        every entry takes part.  ``fixups`` are ``(original, dense copy)``
        pairs for arrays that are not dense; the copy is written back after
        the operation.  Raises (naming the parameter) for arrays that cannot
        take part.
        """
        params = group.params
        if group.dtype not in _layout.FLOAT_DTYPES:
            arrays = list(map(_GRAD if mean else _ARRAY, params))
            if mean and not zero_fill and all(a is None for a in arrays):
                # Skipped, as every parameter without a gradient (ChainerMN
                # skips such integer parameters too).
                return arrays, numpy.zeros(group.n, bool), []
            if mean:
                raise TypeError("%s: cannot average gradients of dtype %s (float16, float32 "
                                "and float64 are supported)"
                                % (_param_label(params[0], group.paths[0]), group.dtype))
            return arrays, None, []
        if not group.is_cpu:
            arrays = list(map(_GRAD if mean else _ARRAY, params))
            return self._device().prepare(group, arrays, zero_fill, mean)
        K = _kernels()
        typenum = _TYPE_NUMS[group.dtype]
        writeable = mean or self.rank != 0
        arrays = [None] * group.n
        # One native pass reads the attributes (cynag's and Chainer's parameters
        # without their properties), one checks the arrays' headers.
        _read_attribute(params, "grad" if mean else "array", arrays)
        nbad = K.scan(arrays, typenum, group.sizes, group.ptrs, group.codes, writeable,
                      group.shape_at, group.dims)
        if not nbad:
            return arrays, None, []
        active = numpy.ones(group.n, bool)
        fixups = []
        for i in numpy.flatnonzero(group.codes).tolist():
            code = group.codes[i]
            a = arrays[i]
            param = params[i]
            label = _param_label(param, group.paths[i])
            what = "grad" if mean else "param"
            if code == K.NONE:
                if zero_fill:
                    arrays[i] = _zero_grad(param)
                else:
                    active[i] = False
            elif code == K.NOT_DENSE:
                tmp = numpy.array(a, order="C", copy=True)
                arrays[i] = tmp
                fixups.append((a, tmp))
            elif code == K.NOT_NDARRAY:
                raise TypeError("%s: %s is a %s but param is a %s; they must be on the same "
                                "device" % (label, what, _backend.describe(a),
                                            _backend.describe(param.array)))
            elif code == K.BAD_DTYPE:
                raise TypeError("%s: grad has dtype %s but param has dtype %s"
                                % (label, a.dtype, group.dtype))
            elif code == K.BAD_SIZE:
                raise ValueError("%s: grad has shape %s but param has shape %s"
                                 % (label, a.shape, group.shapes[i]))
            elif code == K.READ_ONLY:
                raise ValueError("%s: %s is read-only; it is %s in place"
                                 % (label, what, "averaged" if mean else "overwritten"))
        if fixups or zero_fill:
            K.scan(arrays, typenum, group.sizes, group.ptrs, group.codes, writeable,
                   group.shape_at, group.dims)
        return arrays, (None if active.all() else active), fixups

    def _ring_buffer(self, dtype, n):
        buf = self._ring_tmp.get(dtype)
        if buf is None or buf.size < n:
            buf = self._ring_tmp[dtype] = numpy.empty(n, dtype)
        return buf

    def _staging_buffer(self, dtype, n):
        buf = self._staging.get(dtype)
        if buf is None or buf.size < n:
            buf = self._staging[dtype] = numpy.empty(n, dtype)
        return buf

    def _plan(self, group, purpose, arrays, active, allow_runs):
        """How ``group``'s arrays travel this step (cached while their addresses hold)."""
        if group.dtype not in _layout.FLOAT_DTYPES:
            return None
        if not group.is_cpu:
            return self._device().plan(group, arrays, active, allow_runs)
        if active is None:
            active = _all_true(group.n)
        key = (purpose, allow_runs)
        seg = group.cache.get(key)
        if seg is None or not seg.matches(group.ptrs, active):
            half = group.dtype == numpy.float16
            itemsize = 4 if half else group.dtype.itemsize
            seg = _layout.compute_segments(
                group, arrays, group.ptrs, active, self.direct_min_bytes,
                max(1, self.bucket_bytes // itemsize),
                allow_direct=not (half and purpose == "mean"), allow_runs=allow_runs)
            group.cache[key] = seg
        return seg

    def _mean_cpu(self, group, arrays, seg):
        K = _kernels()
        MPI = self._MPI
        comm = self.mpi_comm
        dtype = group.dtype
        half = dtype == numpy.float16
        recip = 1.0 / comm.size
        scale = float(dtype.type(recip))
        step = max(1, self.bucket_bytes // (4 if half else dtype.itemsize))
        # The ring pays 2 * (size - 1) messages per bucket: only for buckets
        # whose pieces are large enough to move at full speed.
        ring_min = RING_MIN_BYTES * comm.size // (4 if half else dtype.itemsize)
        for kind, payload in seg.direct:
            v = payload if kind == "run" else arrays[payload].ravel(order="K")
            n = v.size
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                if hi - lo >= ring_min:
                    self._ring_mean(v, lo, hi, scale)
                else:
                    comm.Allreduce(MPI.IN_PLACE, v[lo:hi])
                    K.scale(v, lo, hi, scale)
        if not seg.total:
            return
        # The addresses scan() found in this step (the arrays are held in
        # ``arrays``): packing by address costs no Python object per array.
        ptrs = group.ptrs if seg.all_packed else group.ptrs[seg.packed]
        plist = None
        cdtype = numpy.dtype(numpy.float32) if half else dtype
        buf = self._staging_buffer(cdtype, min(seg.total, step))
        typenum = _TYPE_NUMS[dtype]
        offsets = seg.offsets
        for lo, hi, first, last, scalars in seg.buckets:
            K.pack_at(ptrs, buf, offsets, first, last, lo, hi, typenum)
            if half or scalars or hi - lo < ring_min:
                # float16 is rounded to float16 before the multiplication, and a
                # 0-d gradient is multiplied in float64 (NumPy 1.x): both from the sum.
                comm.Allreduce(MPI.IN_PLACE, buf[:hi - lo])
                K.unpack_at(ptrs, buf, offsets, first, last, lo, hi, True, scale, typenum)
            else:
                self._ring_mean(buf, 0, hi - lo, scale)
                K.unpack_at(ptrs, buf, offsets, first, last, lo, hi, False, 1.0, typenum)
            if scalars and plist is None:
                plist = arrays if seg.all_packed else [arrays[i] for i in seg.packed.tolist()]
            for k, off in scalars:
                # NumPy 1.x multiplies a 0-d array by a Python float in float64.
                total = buf[off]
                if half:
                    total = numpy.float16(total)
                plist[k][()] = numpy.float64(total) * recip

    def _ring_mean(self, v, lo, hi, scale):
        """``v[lo:hi] = (sum over the ranks of v[lo:hi]) * scale``, in place.

        A ring reduce-scatter (``size - 1`` exchanges with the neighbours;
        the last addition of each chunk is fused with the multiplication by
        ``scale``, so the mean costs no pass of its own), then a ring
        allgather of the reduced chunks: the same traffic as MPI's
        bandwidth-optimal ``Allreduce``, without a separate scaling pass.
        Every chunk is reduced on one rank and copied to the others, so all
        ranks hold the same bits; with two ranks each element is
        ``(a + b) * scale``, exactly what ``Allreduce`` and then
        ``*= scale`` give.
        """
        K = _kernels()
        comm = self._ring_comm
        size, rank = comm.size, comm.rank
        n = hi - lo
        bounds = [lo + n * i // size for i in range(size + 1)]
        tmp = self._ring_buffer(v.dtype, -(-n // size))
        right, left = (rank + 1) % size, (rank - 1) % size
        for s in range(size - 1):
            c_send, c_recv = (rank - s) % size, (rank - s - 1) % size
            r0, r1 = bounds[c_recv], bounds[c_recv + 1]
            t = tmp[:r1 - r0]
            comm.Sendrecv(v[bounds[c_send]:bounds[c_send + 1]], right, _TAG_REDUCE,
                          t, left, _TAG_REDUCE)
            K.add_into(v, r0, r1, t, scale, s == size - 2)
        for s in range(size - 1):
            c_send, c_recv = (rank + 1 - s) % size, (rank - s) % size
            comm.Sendrecv(v[bounds[c_send]:bounds[c_send + 1]], right, _TAG_GATHER,
                          v[bounds[c_recv]:bounds[c_recv + 1]], left, _TAG_GATHER)

    # -- parameters ----------------------------------------------------------------
    def bcast_data(self, model):
        """Copy rank 0's parameter values into every rank's ``model``, in place.

        As ChainerMN (``sorted(namedparams())``, initialized parameters), with
        the arrays packed into a few messages; the models must have the same
        parameters (paths, shapes, dtypes) on every rank, otherwise every
        rank raises :class:`ModelMismatchError` naming the first differing
        one.
        """
        layout = self._layout_or_agree(_KIND_BCAST, model)
        error = None
        prepared = []
        plans = []
        try:
            for group in layout.groups:
                prep = self._prepare(group, False, mean=False)
                prepared.append(prep)
                plans.append(self._plan(group, "bcast", prep[0], None, True))
        except Exception as e:
            error = e
        if not self._agree(_KIND_BCAST, layout, layout.sig ^ (_KIND_BCAST << 3), error,
                           _plans_sig(plans)):
            plans = [self._plan(group, "bcast", p[0], None, False)
                     for group, p in zip(layout.groups, prepared)]
        if self.size == 1:
            return
        for group, (arrays, _, fixups), plan in zip(layout.groups, prepared, plans):
            if group.dtype not in _layout.FLOAT_DTYPES:
                self._bcast_each(arrays)
            elif group.is_cpu:
                self._bcast_cpu(group, arrays, plan)
            else:
                self._device().bcast(group, arrays, plan)
            if self.rank != 0:
                for dst, tmp in fixups:
                    dst[...] = tmp

    def broadcast_data(self, model):
        """Alias of :meth:`bcast_data` (ChainerMN's older name)."""
        self.bcast_data(model)

    def _bcast_each(self, arrays):
        for a in arrays:
            if _backend.is_cupy_array(a):
                self._device().bcast_one(a)
                continue
            buf = numpy.ascontiguousarray(a)
            self.mpi_comm.Bcast([buf.reshape(-1).view(numpy.uint8), self._MPI.BYTE], root=0)
            if self.rank != 0 and buf is not a:
                a[...] = buf

    def _bcast_cpu(self, group, arrays, seg):
        K = _kernels()
        MPI = self._MPI
        comm = self.mpi_comm
        root = self.rank == 0
        itemsize = group.dtype.itemsize
        step = max(1, self.bucket_bytes // itemsize)
        for kind, payload in seg.direct:
            v = payload if kind == "run" else arrays[payload].ravel(order="K")
            n = v.size
            for lo in range(0, n, step):
                comm.Bcast([v[lo:min(n, lo + step)].view(numpy.uint8), MPI.BYTE], root=0)
        if not seg.total:
            return
        plist = arrays if seg.all_packed else [arrays[i] for i in seg.packed.tolist()]
        buf = self._staging_buffer(group.dtype, min(seg.total, step))
        offsets = seg.offsets
        for lo, hi, first, last, _ in seg.buckets:
            if root:
                K.pack(plist, buf, offsets, first, last, lo, hi)
            comm.Bcast([buf[:hi - lo].view(numpy.uint8), MPI.BYTE], root=0)
            if not root:
                K.unpack(plist, buf, offsets, first, last, lo, hi)

    # -- GPU -----------------------------------------------------------------------
    def _gpu_kind(self):
        return self._device().kind

    def _device(self):
        if self._device_ops is None:
            from cynag.multinode._device import DeviceOps

            self._device_ops = DeviceOps(self)
        return self._device_ops


def _plans_sig(plans):
    """One 62-bit number for the segments of every group (what the ranks compare)."""
    crc = 0
    for plan in plans:
        crc = zlib.crc32(b"%d;" % (-1 if plan is None else plan.sig), crc)
    return crc


_TRUE = {}


def _all_true(n):
    a = _TRUE.get(n)
    if a is None:
        a = _TRUE[n] = numpy.ones(n, bool)
        a.flags.writeable = False
    return a
