"""Which device an array lives on, without importing CuPy."""
import sys

import numpy


def is_cupy_array(a):
    """True for a ``cupy.ndarray`` (checked by type, CuPy is never imported)."""
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "device")


def device_of(a):
    """``'cpu'`` for NumPy arrays, ``'gpu:N'`` for CuPy arrays, else None."""
    if isinstance(a, numpy.ndarray):
        return "cpu"
    if is_cupy_array(a):
        return "gpu:%d" % a.device.id
    return None


def array_module(a):
    """numpy for NumPy arrays, cupy for CuPy arrays (imported only then)."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return numpy


def describe(a):
    """Short description of an array for error messages."""
    if a is None:
        return "None"
    dev = device_of(a)
    if dev is None:
        return type(a).__name__
    return "%s array on %s" % (type(a).__module__.split(".")[0], dev)


def zeros_like(a):
    """Zeros shaped like ``a``, on ``a``'s device (for CuPy, not the current one)."""
    if is_cupy_array(a):
        import cupy

        with cupy.cuda.Device(a.device.id):
            return cupy.zeros_like(a)
    return numpy.zeros_like(a)


def device_of_array(a):
    """Context manager making ``a``'s GPU current (``a`` is a CuPy array)."""
    import cupy

    return cupy.cuda.Device(a.device.id)


class Device:
    """Where a parameter's array lives, as Chainer's device objects describe it.

    ``name`` is Chainer's specifier (``'@numpy'``, ``'@cupy:N'``), ``xp`` the
    array module.  :func:`device_object` returns Chainer's own device object
    instead when Chainer is imported (so that Chainer's optimizer hooks and
    ``chainer.using_device`` take it).
    """

    __slots__ = ("name", "xp")

    def __init__(self, name, xp):
        self.name = name
        self.xp = xp

    def __eq__(self, other):
        return isinstance(other, Device) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def __str__(self):
        return self.name

    def __repr__(self):
        return "<cynag device %s>" % self.name


def device_object(a):
    """The device of array ``a`` (None for None): Chainer's device object if
    Chainer is imported, else a :class:`Device`."""
    if a is None:
        return None
    dev = device_of(a)
    if dev is None:
        raise TypeError("not a NumPy or CuPy array: %s" % type(a).__name__)
    name = "@numpy" if dev == "cpu" else "@cupy:%s" % dev[4:]
    chainer = sys.modules.get("chainer")
    if chainer is not None and hasattr(chainer, "get_device"):
        return chainer.get_device(name)
    return Device(name, array_module(a))


def to_device_of(a, like):
    """``a`` on the device of ``like`` (itself if it is there already)."""
    dev = device_of(like)
    if device_of(a) == dev:
        return a
    if dev == "cpu":
        return a.get()
    import cupy

    with cupy.cuda.Device(like.device.id):
        return cupy.asarray(a)


def copyto(dst, src):
    """Copy ``src``'s values into ``dst``, across devices if needed."""
    if isinstance(dst, numpy.ndarray):
        numpy.copyto(dst, src.get() if is_cupy_array(src) else src)
        return
    import cupy

    with cupy.cuda.Device(dst.device.id):
        cupy.copyto(dst, cupy.asarray(src))
