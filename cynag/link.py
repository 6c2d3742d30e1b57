"""Containers of parameters: Link, Chain and ChainList, as in Chainer.

Parameters are registered by assignment inside ``init_scope()``; paths follow
Chainer: ``/W`` for a parameter of the link itself, ``/l1/W`` for a child
named ``l1`` of a :class:`Chain`, ``/0/W`` for the first child of a
:class:`ChainList`.  Children and parameters are visited in sorted name order
(list order for a ChainList), as Chainer visits them.
"""
import collections.abc
import contextlib
import copy
import operator
import warnings

import numpy

from cynag import _backend
from cynag.parameter import Parameter


class Link:
    """A building block holding parameters.

    Args:
        **params: ``name=shape`` or ``name=(shape, dtype)`` registers an
            uninitialized-valued (NaN) parameter of that shape, as in Chainer.
    """

    def __init__(self, **params):
        self._params = _Names()
        self._persistent = set()
        self._within_init_scope = False
        self.name = None
        for name, value in params.items():
            if (isinstance(value, tuple) and len(value) == 2
                    and not isinstance(value[1], (int, numpy.integer))):
                shape, dtype = value
            else:
                shape, dtype = value, numpy.float32
            self.add_param(name, shape, dtype=dtype)

    def __call__(self, *args, **kwargs):
        """Call :meth:`forward` (define it in a subclass), as Chainer's links do."""
        forward = getattr(self, "forward", None)
        if forward is None:
            raise TypeError("%s defines no forward() method" % type(self).__name__)
        return forward(*args, **kwargs)

    # -- registration ----------------------------------------------------
    @property
    def within_init_scope(self):
        """True inside :meth:`init_scope`."""
        return getattr(self, "_within_init_scope", False)

    @contextlib.contextmanager
    def init_scope(self):
        """Context in which assigning a Parameter (or a Link, for a Chain) registers it."""
        if "_params" not in self.__dict__:
            raise RuntimeError("Link.__init__() has not been called.")
        old = self.within_init_scope
        self._within_init_scope = True
        try:
            yield
        finally:
            self._within_init_scope = old

    def __setattr__(self, name, value):
        if self.within_init_scope and isinstance(value, Parameter):
            value.name = name
            self._params.add(name)
            self._persistent.discard(name)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self._params.discard(name)
        self._persistent.discard(name)
        super().__delattr__(name)

    def add_param(self, name, shape=None, dtype=numpy.float32, initializer=None):
        """Register a new parameter ``name`` (NaN-filled unless ``initializer`` says otherwise)."""
        if name in self.__dict__:
            raise AttributeError("cannot register a new parameter %s: attribute exists" % name)
        # As in Chainer: NaN-filled array and gradient of the given dtype
        # (or an uninitialized parameter without a shape).
        param = Parameter(_NaN(dtype) if initializer is None else initializer, shape)
        with self.init_scope():
            setattr(self, name, param)

    def add_persistent(self, name, value):
        """Register a persistent (non-parameter) value."""
        if name in self.__dict__:
            raise AttributeError("cannot register a new persistent value %s: attribute exists"
                                 % name)
        self._persistent.add(name)
        self._params.discard(name)
        super().__setattr__(name, value)

    def register_persistent(self, name):
        """Mark an existing attribute as persistent."""
        if not hasattr(self, name):
            raise AttributeError("cannot register non-existent attribute %s as a persistent value"
                                 % name)
        self._persistent.add(name)
        self._params.discard(name)

    # -- traversal -------------------------------------------------------
    def params(self, include_uninit=True):
        """All parameters under this link, in Chainer's order."""
        d = self.__dict__
        names = self._params
        if type(names) is _Names:
            params = names.values(d)
        else:
            params = [d[name] for name in sorted(names)]
        if include_uninit:
            return iter(params)
        return iter([param for param in params if param.array is not None])

    def namedparams(self, include_uninit=True):
        """All ``(path, parameter)`` pairs under this link."""
        d = self.__dict__
        names = self._params
        if type(names) is _Names:
            pairs = zip(names.paths(), names.values(d))
        else:
            pairs = (("/" + name, d[name]) for name in sorted(names))
        if include_uninit:
            return iter(list(pairs))
        return iter([pair for pair in pairs if pair[1].array is not None])

    def links(self, skipself=False):
        """This link (unless ``skipself``) and all links under it."""
        if not skipself:
            yield self

    def namedlinks(self, skipself=False):
        """All ``(path, link)`` pairs, this link being ``'/'``."""
        if not skipself:
            yield "/", self

    def children(self):
        """Direct child links."""
        return iter(())

    # -- copying between links --------------------------------------------
    def copyparams(self, link, copy_persistent=True):
        """Copy every parameter's array (and persistent value) of ``link``, a
        link of the same structure, into this one (Chainer's ``copyparams``)."""
        src = link.__dict__
        dst = self.__dict__
        for name in sorted(self._params):
            dst[name].copydata(src[name])
        if copy_persistent:
            for name in sorted(self._persistent):
                d, s = dst[name], src[name]
                if _backend.device_of(d) is not None and _backend.device_of(s) is not None:
                    _backend.copyto(d, s)
                else:
                    dst[name] = copy.deepcopy(s)

    def addgrads(self, link):
        """Add the gradients of ``link``, a link of the same structure, to this
        one's (Chainer's ``addgrads``)."""
        src = link.__dict__
        dst = self.__dict__
        for name in sorted(self._params):
            dst[name].addgrad(src[name])

    # -- gradients and update flags ----------------------------------------
    def cleargrads(self):
        """Set every gradient to ``None``."""
        for param in self.params():
            param.cleargrad()

    def zerograds(self):
        """Fill every gradient with zeros (deprecated in Chainer: use cleargrads)."""
        warnings.warn("Link.zerograds is deprecated. Use Link.cleargrads instead.",
                      DeprecationWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for param in self.params():
                param.zerograd()

    def enable_update(self):
        """Enable the update rule of every parameter."""
        for param in self.params():
            if param.update_rule is not None:
                param.update_rule.enabled = True

    def disable_update(self):
        """Disable (freeze) the update rule of every parameter."""
        for param in self.params():
            if param.update_rule is not None:
                param.update_rule.enabled = False

    @property
    def update_enabled(self):
        """True if at least one parameter has an enabled update rule."""
        return any(p.update_rule is not None and p.update_rule.enabled for p in self.params())

    def count_params(self):
        """Total number of elements of the parameters (uninitialized ones warn)."""
        size = 0
        for name, param in self.namedparams():
            if param.array is None:
                warnings.warn("Parameter '{}' has not been initialized, so the resulting count "
                              "will not include the number of parameters in it.".format(name))
                continue
            size += param.size
        return size

    def serialize(self, serializer):
        """Save or load the parameters (key: their name) and persistent values.

        Loading into an uninitialized parameter initializes it with the
        stored array's shape, as in Chainer.
        """
        d = self.__dict__
        for name in sorted(self._params):
            param = d[name]
            data = serializer(name, param.array)
            if param.array is None and data is not None:
                param.initialize(data.shape)
                param.array[...] = data
        for name in sorted(self._persistent):
            d[name] = serializer(name, d[name])

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%s" % (p.name, getattr(p, "shape", None)) for p in self.params()))


class _NaN:
    """Initializer that fills with NaN and carries the dtype (Chainer's NaN)."""

    def __init__(self, dtype):
        self.dtype = numpy.dtype(dtype)

    def __call__(self, array):
        array[...] = numpy.nan


class _Names(set):
    """The names of a link's parameters, with their sorted order kept until a change."""

    __slots__ = ("_sorted", "_paths", "_getter")

    def sorted(self):
        try:
            return self._sorted
        except AttributeError:
            self._sorted = tuple(sorted(self))
            return self._sorted

    def values(self, d):
        """``[d[name] for name in self.sorted()]``, in one native call."""
        try:
            getter = self._getter
        except AttributeError:
            names = self.sorted()
            if len(names) > 1:
                getter = operator.itemgetter(*names)
            else:
                getter = (lambda d, names=names: tuple(d[name] for name in names))
            self._getter = getter
        return list(getter(d))

    def paths(self):
        """``'/' + name`` for the sorted names."""
        try:
            return self._paths
        except AttributeError:
            self._paths = tuple("/" + name for name in self.sorted())
            return self._paths

    def _changed(method):
        def wrapper(self, *args):
            for attr in ("_sorted", "_paths", "_getter"):
                try:
                    delattr(self, attr)
                except AttributeError:
                    pass
            return method(self, *args)
        wrapper.__name__ = method.__name__
        return wrapper

    add = _changed(set.add)
    discard = _changed(set.discard)
    remove = _changed(set.remove)
    pop = _changed(set.pop)
    clear = _changed(set.clear)
    update = _changed(set.update)
    difference_update = _changed(set.difference_update)
    intersection_update = _changed(set.intersection_update)
    symmetric_difference_update = _changed(set.symmetric_difference_update)
    __ior__ = _changed(set.__ior__)
    __iand__ = _changed(set.__iand__)
    __isub__ = _changed(set.__isub__)
    __ixor__ = _changed(set.__ixor__)
    del _changed

    def __reduce__(self):
        return (_Names, (list(self),))


class Chain(Link):
    """A link made of named child links (registered in ``init_scope``).

    Args:
        **links: child links to register under their keyword names.
    """

    def __init__(self, **links):
        super().__init__()
        self._children = set()
        for name, link in links.items():
            self.add_link(name, link)

    def __getitem__(self, name):
        return getattr(self, name)

    def __setattr__(self, name, value):
        if self.within_init_scope and isinstance(value, Link):
            if hasattr(self, name):
                raise AttributeError("cannot register a new link %s: attribute exists" % name)
            value.name = name
            self._children.add(name)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self._children.discard(name)
        super().__delattr__(name)

    def add_link(self, name, link):
        """Register ``link`` as the child ``name``."""
        if name in self.__dict__:
            raise AttributeError("cannot register a new link %s: attribute exists" % name)
        if not isinstance(link, Link):
            raise TypeError("cannot register a non-link object as a child")
        with self.init_scope():
            setattr(self, name, link)

    def params(self, include_uninit=True):
        yield from super().params(include_uninit)
        d = self.__dict__
        for name in sorted(self._children):
            yield from d[name].params(include_uninit)

    def namedparams(self, include_uninit=True):
        yield from super().namedparams(include_uninit)
        d = self.__dict__
        for name in sorted(self._children):
            prefix = "/" + name
            for path, param in d[name].namedparams(include_uninit):
                yield prefix + path, param

    def links(self, skipself=False):
        if not skipself:
            yield self
        d = self.__dict__
        for name in sorted(self._children):
            yield from d[name].links()

    def namedlinks(self, skipself=False):
        if not skipself:
            yield "/", self
        d = self.__dict__
        for name in sorted(self._children):
            prefix = "/" + name
            yield prefix, d[name]
            for path, link in d[name].namedlinks(True):
                yield prefix + path, link

    def children(self):
        d = self.__dict__
        for name in sorted(self._children):
            yield d[name]

    def copyparams(self, link, copy_persistent=True):
        super().copyparams(link, copy_persistent)
        src, dst = link.__dict__, self.__dict__
        for name in sorted(self._children):
            dst[name].copyparams(src[name], copy_persistent)

    def addgrads(self, link):
        super().addgrads(link)
        src, dst = link.__dict__, self.__dict__
        for name in sorted(self._children):
            dst[name].addgrads(src[name])

    def serialize(self, serializer):
        super().serialize(serializer)
        d = self.__dict__
        for name in sorted(self._children):
            d[name].serialize(serializer[name])


class ChainList(Link, collections.abc.MutableSequence):
    """A link made of a list of child links, named ``'0'``, ``'1'``, ...

    Args:
        *links: initial child links.
    """

    def __init__(self, *links):
        super().__init__()
        self._children = []
        for link in links:
            self.add_link(link)

    def __setattr__(self, name, value):
        if self.within_init_scope and isinstance(value, Link):
            raise TypeError('cannot register a new link within a "with chainlist.init_scope():" '
                            "block.")
        super().__setattr__(name, value)

    def __setitem__(self, index, value):
        if isinstance(index, int):
            value.name = str(index)
            self._children[index] = value
        elif isinstance(index, slice):
            self._children[index] = value
            for i, c in enumerate(self._children):
                c.name = str(i)
        else:
            raise TypeError("ChainList indices must be integers or slices, not %s"
                            % type(index).__name__)

    def __getitem__(self, index):
        return self._children[index]

    def __delitem__(self, index):
        del self._children[index]
        for i, c in enumerate(self._children):
            c.name = str(i)

    def insert(self, index, link):
        """Insert ``link`` at ``index`` and renumber the children."""
        if not isinstance(link, Link):
            raise TypeError("cannot register a non-link object as a child")
        self._children.insert(index, link)
        for i, c in enumerate(self._children):
            c.name = str(i)

    def __iter__(self):
        return iter(self._children)

    def __len__(self):
        return len(self._children)

    def add_link(self, link):
        """Append ``link`` as the last child."""
        self.append(link)

    def params(self, include_uninit=True):
        yield from super().params(include_uninit)
        for link in self._children:
            yield from link.params(include_uninit)

    def namedparams(self, include_uninit=True):
        yield from super().namedparams(include_uninit)
        for idx, link in enumerate(self._children):
            prefix = "/%d" % idx
            for path, param in link.namedparams(include_uninit):
                yield prefix + path, param

    def links(self, skipself=False):
        if not skipself:
            yield self
        for child in self._children:
            yield from child.links()

    def namedlinks(self, skipself=False):
        if not skipself:
            yield "/", self
        for idx, child in enumerate(self._children):
            prefix = "/%d" % idx
            yield prefix, child
            for path, link in child.namedlinks(True):
                yield prefix + path, link

    def children(self):
        return iter(list(self._children))

    def copyparams(self, link, copy_persistent=True):
        super().copyparams(link, copy_persistent)
        for idx, child in enumerate(self._children):
            child.copyparams(link[idx], copy_persistent)

    def addgrads(self, link):
        super().addgrads(link)
        for idx, child in enumerate(self._children):
            child.addgrads(link[idx])

    def serialize(self, serializer):
        super().serialize(serializer)
        for idx, child in enumerate(self._children):
            child.serialize(serializer["%d" % idx])
