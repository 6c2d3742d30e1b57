"""cynag.Parameter: an array, its gradient and its update rule."""
import functools
import warnings

import numpy

from cynag import _backend


def _generate_array(initializer, shape, dtype=None):
    """Array of ``shape`` filled by ``initializer`` (Chainer's conventions)."""
    if initializer is None:
        arr = numpy.full(shape, numpy.nan, dtype=dtype or numpy.float32)
    elif isinstance(initializer, numpy.ndarray) or _backend.is_cupy_array(initializer):
        # Chainer wraps the array in a Constant initializer, whose dtype is
        # the default float32 (not the array's).
        xp = _backend.array_module(initializer)
        arr = xp.empty(shape, dtype=dtype or numpy.float32)
        arr[...] = initializer
    elif numpy.isscalar(initializer):
        arr = numpy.full(shape, initializer, dtype=dtype or numpy.float32)
    elif callable(initializer):
        arr = numpy.empty(shape, dtype=getattr(initializer, "dtype", None) or dtype
                          or numpy.float32)
        initializer(arr)
    else:
        raise TypeError("invalid initializer: %r" % (initializer,))
    return arr


class _UpdateMethod:
    """``Parameter.update``: the method, or what was assigned to the object."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls=None):
        if obj is None:
            return self.func
        try:
            return obj._update_override  # (a slot: set only by an assignment)
        except AttributeError:
            return self.func.__get__(obj, cls)

    def __set__(self, obj, value):
        obj._update_override = value

    def __delete__(self, obj):
        try:
            del obj._update_override
        except AttributeError:
            raise AttributeError("update") from None


class Parameter:
    """An array to be optimized, with its gradient and update rule.

    Mirrors ``chainer.Parameter`` for what an optimizer needs.

    Args:
        initializer: the data array itself (a NumPy or CuPy array, used as
            is; with ``shape`` it is a fill pattern and the array is float32,
            as in Chainer), a scalar (fill value, float32), a callable that fills a given
            array (it may carry a ``dtype`` attribute), or ``None``.  With
            ``shape`` given the array is created at once (``None`` fills it
            with NaN, as Chainer does); without ``shape`` a non-array
            initializer leaves the parameter uninitialized until
            :meth:`initialize`.
        shape (tuple of ints or None): shape of the array to create.
        name (str): name of the parameter; set by the link on registration.
            ``Parameter(array, 'W')`` is accepted as a short form of
            ``Parameter(array, name='W')``.
        array: keyword alias of ``initializer`` for an existing array.

    Attributes:
        array: the parameter array (``None`` while uninitialized); ``data``
            is an alias.
        grad: the gradient array, or ``None`` (cleared).
        update_rule: the :class:`~cynag.optimizer.UpdateRule` set by an
            optimizer's ``setup``.
    """

    # Slots hold what the optimizer's step reads natively at every step
    # (cynag._step); every other attribute lives in the instance dictionary.
    __slots__ = ("_array", "_grad", "_update_rule", "_loss_scale_value", "_update_override",
                 "__dict__", "__weakref__")

    def __init__(self, initializer=None, shape=None, name=None, *, array=None):
        if isinstance(shape, str) and name is None:
            shape, name = None, shape
        if array is not None:
            if initializer is not None:
                raise TypeError("Parameter: give either initializer or array, not both")
            initializer = array
        self.name = name
        self._grad_view = None  # contiguous mode: this gradient's slice of the buffer
        self._update_rule = None
        self._loss_scale_value = None
        self.initializer = initializer
        is_array = isinstance(initializer, numpy.ndarray) or _backend.is_cupy_array(initializer)
        if shape is None:
            if is_array:
                self._array = initializer
                self._grad = None
            else:
                if initializer is not None and not (numpy.isscalar(initializer)
                                                    or callable(initializer)):
                    raise TypeError("invalid initializer: %r" % (initializer,))
                self._array = None
                self._grad = None
            # what initialize() gives the gradient: NaN until cleared/zeroed
            self._grad_fill = numpy.nan
        else:
            self._array = _generate_array(initializer, shape)
            xp = _backend.array_module(self._array)
            self._grad = xp.full_like(self._array, numpy.nan)
            self._grad_fill = numpy.nan

    # -- arrays ------------------------------------------------------------
    @property
    def array(self):
        """The parameter array."""
        return self._array

    @array.setter
    def array(self, value):
        self._array = value

    data = array

    @property
    def grad(self):
        """The gradient array (``None`` when cleared)."""
        return self._grad

    @grad.setter
    def grad(self, value):
        view = self._grad_view
        if view is not None and value is not None and value is not view:
            if (type(value) is type(view) and value.shape == view.shape
                    and value.dtype == view.dtype
                    and _backend.device_of(value) == _backend.device_of(view)):
                # Contiguous mode: the gradient lives in the gradient buffer.
                view[...] = value
                value = view
        self._grad = value

    @property
    def update_rule(self):
        """The update rule set by an optimizer's ``setup`` (or ``None``)."""
        return self._update_rule

    @update_rule.setter
    def update_rule(self, rule):
        self._update_rule = rule

    @property
    def _loss_scale(self):
        """Loss scale of the backward pass that produced :attr:`grad` (or ``None``)."""
        return self._loss_scale_value

    @_loss_scale.setter
    def _loss_scale(self, value):
        self._loss_scale_value = value

    @property
    def is_initialized(self):
        return self._array is not None

    @property
    def shape(self):
        return None if self._array is None else self._array.shape

    @property
    def ndim(self):
        return None if self._array is None else self._array.ndim

    @property
    def size(self):
        return None if self._array is None else self._array.size

    @property
    def dtype(self):
        if self._array is not None:
            return self._array.dtype
        dtype = getattr(self.initializer, "dtype", None)
        if dtype is not None:
            return numpy.dtype(dtype)
        raise RuntimeError("the dtype of parameter %r is not determined yet: it is "
                           "uninitialized and no dtype was given" % (self.name,))

    @property
    def xp(self):
        """numpy or cupy, after the array."""
        return _backend.array_module(self._array)

    @property
    def device(self):
        """The array's device (``None`` while uninitialized): Chainer's device
        object when Chainer is imported (Chainer's optimizer hooks read it), else
        a :class:`cynag._backend.Device` (``name`` ``'@numpy'`` or ``'@cupy:N'``,
        ``xp``)."""
        return _backend.device_object(self._array)

    def copydata(self, var):
        """Copy ``var``'s array into this one (Chainer's ``Variable.copydata``).

        An uninitialized side is initialized with the other's shape first;
        nothing happens if both are.  Across devices the values are copied.
        """
        src = var.array
        dst = self._array
        if src is None:
            if dst is None:
                return
            var.initialize(self.shape)
            src = var.array
        if dst is None:
            self.initialize(src.shape)
            dst = self._array
        _backend.copyto(dst, src)

    def addgrad(self, var):
        """Add ``var``'s gradient to this one (Chainer's ``Variable.addgrad``).

        Nothing if ``var`` has no gradient; an uninitialized parameter is
        initialized with ``var``'s shape; a gradient of another shape or dtype
        than the array raises, as in Chainer; a cleared gradient becomes ``var``'s
        own array (shared, as Chainer shares its gradient variable), else a
        new array ``var.grad + self.grad`` on this parameter's device.
        """
        src = var.grad
        if src is None:
            return
        if self._array is None:
            self.initialize(var.shape)
        # (Chainer checks the gradient it assigns against the array)
        if getattr(src, "shape", None) != self._array.shape:
            raise ValueError("addgrad: the gradient of shape %s does not fit parameter %r of "
                             "shape %s" % (getattr(src, "shape", None), self.name,
                                           self._array.shape))
        if getattr(src, "dtype", None) != self._array.dtype:
            raise TypeError("addgrad: the gradient of dtype %s does not fit parameter %r of "
                            "dtype %s" % (getattr(src, "dtype", None), self.name,
                                          self._array.dtype))
        src = _backend.to_device_of(src, self._array)
        dst = self._grad
        self.grad = src if dst is None else src + dst

    def initialize(self, shape):
        """Create the array of an uninitialized parameter from its initializer."""
        self._array = _generate_array(self.initializer, shape,
                                      getattr(self.initializer, "dtype", None))
        if self._grad_fill is None:
            self._grad = None
        else:
            self._grad = numpy.full_like(self._array, self._grad_fill)

    # -- gradients ---------------------------------------------------------
    def cleargrad(self):
        """Set the gradient to ``None`` (the optimizer reallocates it as zeros)."""
        self._grad = None
        if self._array is None:
            self._grad_fill = None

    def zerograd(self):
        """Fill the gradient with zeros, allocating it if needed.

        .. deprecated:: mirrors Chainer; prefer :meth:`cleargrad`.
        """
        warnings.warn("Parameter.zerograd is deprecated. Use Parameter.cleargrad instead.",
                      DeprecationWarning, stacklevel=2)
        if self._array is None:
            self._grad_fill = 0
            return
        if self._grad is None:
            _zero_grad(self)
        else:
            self._grad.fill(0)

    def _fitting_grad_view(self):
        """Contiguous mode: the gradient buffer's view, if it still fits the array.

        None outside contiguous mode, and when the array was replaced by one
        of another shape, dtype, kind or device (the parameter then gets
        gradients of its own, as any other)."""
        view = self._grad_view
        array = self._array
        if view is None or array is None:
            return None
        if (type(array) is type(view) and array.shape == view.shape
                and array.dtype == view.dtype
                and _backend.device_of(array) == _backend.device_of(view)):
            return view
        return None

    def update(self):
        """Update the array with the attached update rule (if any).

        As in Chainer, the optimizer's step calls it for each parameter; one
        assigned to a parameter object (``param.update = f``) replaces it for
        that parameter, and ``del param.update`` restores it.
        """
        if self.update_rule is not None:
            self.update_rule.update(self)

    # A data descriptor, so that ``param.update = f`` on one object is seen by
    # the optimizer's native step (a slot it reads); on the class it is the
    # function itself (``Parameter.update(p)`` works).
    update = _UpdateMethod(update)

    def __repr__(self):
        if self._array is None:
            return "Parameter(name=%r, uninitialized)" % (self.name,)
        return "Parameter(name=%r, shape=%s, dtype=%s)" % (self.name, self._array.shape,
                                                          self._array.dtype)


#: ``Parameter.update`` as defined (the optimizer's native step stands in for
#: it only while the class still has this one).
_STANDARD_UPDATE = Parameter.__dict__["update"].func


def _zero_grad(param):
    """Zeros as ``param``'s gradient, on its device; returns the gradient.

    For any parameter (cynag's, Chainer's, duck-typed); in contiguous mode a
    cynag parameter gets its slice of the gradient buffer back.  What
    ``reallocate_cleared_grads`` and ``zero_fill`` allocate.
    """
    view = param._fitting_grad_view() if isinstance(param, Parameter) else None
    if view is not None:
        view.fill(0)
        param.grad = view
        return view
    param.grad = _backend.zeros_like(param.array)
    return param.grad
