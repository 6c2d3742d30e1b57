"""Contiguous mode: a link's parameters, gradients and state in one buffer each.

``optimizer.setup(link, contiguous=True)`` (or :func:`pack` after
``setup``) moves, for every device and dtype, the arrays of the link's
parameters into one buffer, the gradients into a second and the optimizer's
state (NesterovAG's ``v``) into a third; each parameter's array, gradient and
state become views of those buffers, laid out in the link's parameter order.
The multi-tensor update then sees one run of memory per buffer and updates a
whole (device, dtype) group in a single pass, as if the model were one
tensor.

When to use it: models with many small parameters (hundreds of arrays of a
few hundred elements), where even one native call per group spends time
walking its table, and code that wants the gradients as one flat array
(``buffers[k].grad``), e.g. to reduce them across processes in one message.
For a few large arrays it changes nothing measurable.

What it changes:

* ``param.array`` is a view of the parameter buffer.  Assigning a new array
  to ``param.array`` is allowed but takes that parameter out of the single
  pass (it is still updated correctly).
* For a :class:`cynag.Parameter`, assigning a gradient of the same shape,
  dtype and device copies it into the parameter's slice of the gradient
  buffer: ``param.grad`` stays the view (so ``param.grad is g`` is false
  after ``param.grad = g``).  ``cleargrad()`` sets it to ``None`` as usual;
  the optimizer (or ``zerograd()``) gives the zero-filled view back.
* The state is created as views of the state buffer at the first update, as
  zeros, exactly when Chainer creates it.
* Parameters that are uninitialized when the link is packed, or whose dtype
  the kernels do not update, are left as they are.

A ``chainer.Link`` can be packed too; its parameters' arrays become views,
but Chainer's backward pass replaces the gradients with new arrays, so only
the parameters and the state stay contiguous.
"""
import collections

import numpy

from cynag import _backend
from cynag.parameter import Parameter

#: Byte alignment of the start of every buffer (a cache line).
ALIGNMENT = 64

_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
           numpy.dtype(numpy.float64))

#: One (device, dtype) group of a packed link.
ContiguousBuffers = collections.namedtuple(
    "ContiguousBuffers", ["device", "dtype", "paths", "param", "grad", "state"])
ContiguousBuffers.__doc__ = """Buffers of one (device, dtype) group of a packed link.

Attributes:
    device (str): ``'cpu'`` or ``'gpu:N'``.
    dtype (numpy.dtype): the arrays' dtype.
    paths (list of str): parameter paths, in buffer order.
    param, grad: 1-d arrays holding every parameter / gradient of the group.
    state (dict): ``{'v': 1-d array}`` for NesterovAG: the state buffer.
"""


def _aligned_empty(like, n, dtype):
    """An uninitialized 1-d array of ``n`` elements starting on a cache line."""
    if _backend.is_cupy_array(like):
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(n, dtype)  # CuPy's allocator aligns to 256 bytes
    nbytes = n * dtype.itemsize
    raw = numpy.empty(nbytes + ALIGNMENT, numpy.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype)


def _shared_arrays(arrays):
    """For each array: None (packed on its own), the id of an earlier identical array
    (shares that array's slice), or False (overlaps another array without being
    it: not packed)."""
    out = [None] * len(arrays)
    first = {}
    spans = []
    for i, a in enumerate(arrays):
        if id(a) in first:
            out[i] = id(a)
            continue
        first[id(a)] = i
        if isinstance(a, numpy.ndarray) and a.size:
            lo, hi = _bounds(a)
            spans.append((lo, hi, i))
    spans.sort()
    end, owner = None, None
    for lo, hi, i in spans:
        if end is not None and lo < end:
            out[i] = False
            out[owner] = False
        if end is None or hi > end:
            end, owner = hi, i
    for i, a in enumerate(arrays):
        if out[i] is not None and out[i] is not False and out[first[out[i]]] is False:
            out[i] = False
    return out


def _bounds(a):
    if hasattr(numpy.lib, "array_utils"):
        return numpy.lib.array_utils.byte_bounds(a)
    return numpy.byte_bounds(a)


def pack(link):
    """Move ``link``'s parameters, gradients and state into contiguous buffers.

    Call it after the optimizer's ``setup`` (``setup(link, contiguous=True)``
    does).  Values are kept: every array's contents are copied into its
    slice.  Returns a list of :class:`ContiguousBuffers`, one per (device,
    dtype) group.
    """
    groups = collections.OrderedDict()
    seen = set()
    members_all = []
    for path, param in link.namedparams():
        if id(param) in seen:
            continue
        seen.add(id(param))
        array = param.array
        device = _backend.device_of(array)
        if device is None or array.dtype not in _DTYPES:
            continue
        if isinstance(array, numpy.ndarray) and type(array) is not numpy.ndarray:
            continue  # an ndarray subclass (matrix, masked array) keeps its own array
        members_all.append((path, param))
    shared = _shared_arrays([p.array for _, p in members_all])
    for (path, param), share in zip(members_all, shared):
        if share is False:
            continue  # overlaps another parameter's array without being it: left as is
        array = param.array
        groups.setdefault((_backend.device_of(array), array.dtype), []).append(
            (path, param, share))
    result = []
    for (device, dtype), members in groups.items():
        like = members[0][1].array
        total = sum(p.array.size for _, p, _ in members)
        ptotal = sum(p.array.size for _, p, share in members if share is None)
        pbuf = _aligned_empty(like, ptotal, dtype)
        gbuf = _aligned_empty(like, total, dtype)
        vbuf = _aligned_empty(like, total, dtype)
        vbuf.fill(0)
        offset = poffset = 0
        views = {}
        for path, param, share in members:
            array = param.array
            n = array.size
            gview = gbuf[offset:offset + n].reshape(array.shape)
            vview = vbuf[offset:offset + n].reshape(array.shape)
            offset += n
            if share is None:
                pview = pbuf[poffset:poffset + n].reshape(array.shape)
                poffset += n
                pview[...] = array
                views[id(array)] = pview
            else:
                # Parameters holding one array object keep holding one array
                # (each update applies to it in turn, as in Chainer).
                pview = views[share]
            grad = param.grad
            gview.fill(0)
            if grad is not None and getattr(grad, "shape", None) == array.shape:
                gview[...] = grad
            param.array = pview
            if isinstance(param, Parameter):
                param._grad_view = gview
            if grad is not None:
                param.grad = gview
            rule = getattr(param, "update_rule", None)
            if rule is not None:
                state = getattr(rule, "state", None)
                v = None if not state else state.get("v")
                if v is not None and getattr(v, "shape", None) == array.shape \
                        and getattr(v, "dtype", None) == dtype:
                    vview[...] = v
                    rule.state["v"] = vview
                rule._contiguous_state = {"v": vview}
        result.append(ContiguousBuffers(device, dtype, [path for path, _, _ in members],
                                        pbuf, gbuf, {"v": vbuf}))
    return result
