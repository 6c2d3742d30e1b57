"""Optimizer machinery, as in ``chainer.optimizer`` (Chainer v7).

* :class:`Hyperparameter` -- a set of hyperparameters that falls back to a
  parent (an update rule's falls back to its optimizer's).
* :class:`UpdateRule` -- how one parameter is updated: rule-level hooks,
  lazily created state, and the dispatch of :meth:`UpdateRule.update_core` to
  :meth:`~UpdateRule.update_core_cpu` (NumPy arrays) or
  :meth:`~UpdateRule.update_core_gpu` (CuPy arrays).
* :class:`Optimizer` / :class:`GradientMethod` -- target link, ``t``,
  ``epoch``, optimizer hooks with ``'pre'``/``'post'`` timing, and the update
  loop.
* :class:`HyperparameterProxy` -- ``optimizer.lr`` as an alias of
  ``optimizer.hyperparam.lr``.

cynag adds one guarantee to Chainer's behaviour: :meth:`GradientMethod.update`
checks every parameter (gradient shape and dtype, device, writeable arrays,
state, hyperparameters) before it changes anything, and raises an exception
that names the parameter by its path, so a step these checks refuse updates
nothing.  (An error raised later, by a hook or by what a hook set, leaves the
parameters before it updated, as in Chainer.)
"""
import collections
import copy
import itertools
import math
import numbers
import operator
import os
import warnings

import numpy

import cynag_kernels
from cynag import _backend
from cynag.link import Link
from cynag.parameter import Parameter
from cynag.serializer import Deserializer

_TIMINGS = ("pre", "post")
_GRAD = operator.attrgetter("grad")


class _Hookable:
    """Ordered ``'pre'`` and ``'post'`` hooks with Chainer's naming rules.

    Args:
        invalid_timing_fallback (bool): with ``timing='auto'``, a hook whose
            ``timing`` attribute is neither ``'pre'`` nor ``'post'`` is
            registered as ``'pre'`` with a warning (Chainer's optimizer
            behaviour); otherwise it is a ``ValueError``.
    """

    # Slots: the optimizer's step reads the hook dictionaries natively.
    __slots__ = ("_pre_update_hooks", "_post_update_hooks", "_invalid_timing_fallback",
                 "_count", "__dict__")

    def __init__(self, invalid_timing_fallback=False):
        self._count = 0  # hooks registered (read natively by the step)
        self._pre_update_hooks = collections.OrderedDict()
        self._post_update_hooks = collections.OrderedDict()
        self._invalid_timing_fallback = invalid_timing_fallback

    def add_hook(self, hook, name, timing):
        if not callable(hook):
            raise TypeError("hook function must be callable, got %r" % (hook,))
        if timing not in ("pre", "post", "auto"):
            raise ValueError("timing must be one of ('pre', 'post', 'auto'), got %r" % (timing,))
        if timing == "auto":
            timing = getattr(hook, "timing", "pre")
            if timing not in _TIMINGS:
                if not self._invalid_timing_fallback:
                    raise ValueError(
                        "hook %r has timing attribute %r; it must be 'pre' or 'post'"
                        % (name if name is not None else hook, timing))
                warnings.warn("Hook timing attribute not in ('pre', 'post'), "
                              "defaulting timing to 'pre'.")
                timing = "pre"
        if name is None:
            name = getattr(hook, "name", getattr(hook, "__name__", None))
            if name is None:
                raise ValueError("the name of the hook function is not specified")
        if not isinstance(name, str):
            raise TypeError("hook name must be a str, got %r" % (name,))
        if name in self._pre_update_hooks or name in self._post_update_hooks:
            raise KeyError('hook "{}" already exists'.format(name))
        if timing == "pre":
            self._pre_update_hooks[name] = hook
        else:
            self._post_update_hooks[name] = hook
        self._count = len(self._pre_update_hooks) + len(self._post_update_hooks)

    def remove_hook(self, name):
        if name in self._pre_update_hooks:
            del self._pre_update_hooks[name]
        else:
            del self._post_update_hooks[name]
        self._count = len(self._pre_update_hooks) + len(self._post_update_hooks)

    def hooks(self, timing):
        if timing == "pre":
            return self._pre_update_hooks
        if timing == "post":
            return self._post_update_hooks
        raise ValueError("timing must be either 'pre' or 'post', got %r" % (timing,))

    def call_hooks(self, timing, args):
        hooks = self.hooks(timing)
        if hooks:
            # Over the dictionary itself, as Chainer: a hook that adds or
            # removes a hook of the same timing ends the loop with
            # "RuntimeError: OrderedDict mutated during iteration".
            for hook in hooks.values():
                self.call_hook(hook, args)

    def call_hook(self, hook, args):
        hook(*args)


class Hyperparameter:
    """Set of hyperparameter entries, falling back to a parent.

    An attribute missing here is looked up in the parent.  The hyperparameter
    of each update rule has the optimizer's as its parent, so changing
    ``optimizer.hyperparam.lr`` changes every rule that has not set its own.

    Args:
        parent (Hyperparameter): parent hyperparameter.
    """

    def __init__(self, parent=None):
        self._parent = parent

    def __getattr__(self, name):
        if "_parent" not in self.__dict__:
            raise AttributeError("_parent is not set up yet")
        parent = self._parent
        if parent is None:
            raise AttributeError("hyperparameter %r is not set" % (name,))
        return getattr(parent, name)

    def __repr__(self):
        d = self.get_dict()
        return "Hyperparameter(%s)" % ", ".join("%s=%s" % (k, d[k]) for k in sorted(d))

    @property
    def parent(self):
        """Parent hyperparameter object."""
        return self._parent

    def get_dict(self):
        """All entries visible from this object (own ones override the parent's)."""
        d = {} if self._parent is None else self._parent.get_dict()
        for k, v in self.__dict__.items():
            if k != "_parent":
                d[k] = v
        return d


class HyperparameterProxy:
    """Property that aliases an attribute of ``self.hyperparam``.

    Args:
        attr_name (str): name of the hyperparameter.
    """

    def __init__(self, attr_name):
        self._attr_name = attr_name
        self.__doc__ = "Alias to ``self.hyperparam.{}``".format(attr_name)

    def __get__(self, obj, type=None):
        if obj is None:
            return self
        return getattr(obj.hyperparam, self._attr_name)

    def __set__(self, obj, value):
        setattr(obj.hyperparam, self._attr_name, value)


def _is_deserializer(serializer):
    """True for cynag's deserializers and for Chainer's (e.g. a Trainer snapshot)."""
    return isinstance(serializer, Deserializer) or any(
        cls.__name__ == "Deserializer" for cls in type(serializer).__mro__)


def _with_label(error, label):
    """``error`` with ``label: `` in front of its message (same type when possible)."""
    try:
        labelled = type(error)("%s: %s" % (label, error.args[0] if len(error.args) == 1
                                           else error))
    except Exception:
        return error
    return labelled


def _param_label(param, path=None):
    if path is not None:
        return "parameter %r" % (path,)
    name = getattr(param, "name", None)
    return "parameter %r" % (name,) if name is not None else "parameter (unnamed)"


# Chainer's hooks that write gradients in place: every one they are called
# for, or every one when GradientClipping clips.
_CHAINER_GRAD_WRITERS = frozenset(["WeightDecay", "Lasso", "GradientHardClipping",
                                   "GradientNoise", "GradientLARS", "GradientClipping"])


def _writes_grads(hook):
    """True if ``hook`` may write gradients in place: cynag's and Chainer's
    hooks (and their subclasses) but for a hook that only reads.  A
    GradientClipping counts whether or not it will clip: whether it clips is
    known only when it runs, after other hooks or the update."""
    if getattr(hook, "_writes_grads", False):
        return True
    return any(c.__module__.startswith("chainer.optimizer_hooks")
               and c.__name__ in _CHAINER_GRAD_WRITERS for c in type(hook).__mro__)


def _grad_writer(hookable, post_only=False):
    """The name of the first hook of ``hookable`` (either timing, or only
    ``'post'``) that may write gradients, or None."""
    for hooks in ((hookable._post_update_hooks,) if post_only else
                  (hookable._pre_update_hooks, hookable._post_update_hooks)):
        for name, hook in hooks.items():
            if _writes_grads(hook):
                return name
    return None


def _read_only_grad(param):
    """True if a hook called for ``param`` may write a read-only gradient."""
    if param.array is None:
        return False  # (Chainer's uninitialized parameter cannot even give its grad)
    try:
        grad = param.grad
    except RuntimeError:  # (Chainer: a gradient never set; the hooks then fail as Chainer's)
        return False
    return isinstance(grad, numpy.ndarray) and not grad.flags.writeable


def _step_counter(value):
    from cynag._step import Counter

    return Counter(value)


class UpdateRule:
    """Base class of update rules: how one parameter is updated.

    Hooks registered with :meth:`add_hook` are called as ``hook(rule, param)``
    before (``'pre'``) or after (``'post'``) the update of the parameter.  The
    state (e.g. NesterovAG's ``v``) is created by :meth:`init_state` at the
    first update.  Implementations override :meth:`update_core_cpu` and
    :meth:`update_core_gpu` (or :meth:`update_core`).

    Args:
        parent_hyperparam (Hyperparameter): hyperparameter that provides the
            default values.

    Attributes:
        enabled (bool): ``False`` freezes the parameter.
        hyperparam (Hyperparameter): hyperparameters of this rule.
        t (int): number of updates made by this rule.
    """

    is_elementwise = False

    # Slots hold what the optimizer's step reads natively at every step
    # (cynag._step); every other attribute lives in the instance dictionary.
    __slots__ = ("_enabled", "_t", "_state_dict", "_hyperparam", "_hookable",
                 "_use_fp32_update", "_fp32_param", "_checked", "_contiguous_state",
                 "_overridden", "__dict__", "__weakref__")

    def __setattr__(self, name, value):
        # An update method assigned to this object (``rule.update_core_cpu =
        # f``): the optimizer's native step, which reads the flag, leaves the
        # rule to it from then on, as Chainer's loop calls it.
        if name in _OVERRIDABLE:
            object.__setattr__(self, "_overridden", True)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        object.__delattr__(self, name)
        if name in _OVERRIDABLE and not any(n in self.__dict__ for n in _OVERRIDABLE):
            object.__setattr__(self, "_overridden", False)  # (the class's own again)

    def __init__(self, parent_hyperparam=None):
        self._state = None
        self.enabled = True
        self.hyperparam = Hyperparameter(parent_hyperparam)
        self.t = 0
        self._use_fp32_update = False
        self._fp32_param = None
        self._hookable = _Hookable()
        self._checked = False

    @property
    def state(self):
        """State dictionary (``None`` until the first update)."""
        return self._state

    @property
    def _state(self):
        return self._state_dict

    @_state.setter
    def _state(self, state):
        if state is not None and type(state) is not dict:
            state = dict(state)
        self._state_dict = state

    @property
    def enabled(self):
        """``False`` freezes the parameter."""
        return self._enabled

    @enabled.setter
    def enabled(self, flag):
        self._enabled = flag

    @property
    def hyperparam(self):
        """Hyperparameters of this rule (falling back to the optimizer's)."""
        return self._hyperparam

    @hyperparam.setter
    def hyperparam(self, hyperparam):
        self._hyperparam = hyperparam

    @property
    def t(self):
        """Number of updates made by this rule."""
        return self._t.value

    @t.setter
    def t(self, value):
        # (Chainer takes anything and fails at the next update, after the
        # parameters before this one were updated.)
        if not (isinstance(value, (numbers.Number, numpy.number, numpy.bool_)) or (
                isinstance(value, numpy.ndarray) and value.ndim == 0
                and value.dtype.kind in "biuf")):
            raise TypeError("update rule's t must be a number, got %r" % (value,))
        object.__setattr__(self, "_t", _step_counter(value))

    def __copy__(self):
        # A shallow copy counts its own steps (the counter is not shared).
        new = object.__new__(type(self))
        for name in UpdateRule.__slots__:
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                object.__setattr__(new, name, object.__getattribute__(self, name))
            except AttributeError:
                pass
        new.__dict__.update(self.__dict__)
        new._t = _step_counter(self._t.value)
        return new

    def add_hook(self, hook, name=None, timing="auto"):
        """Add a hook called as ``hook(rule, param)``.

        Args:
            hook (callable): the hook.
            name (str): registration name; defaults to ``hook.name``, then
                ``hook.__name__``.  A duplicate name is a ``KeyError``.
            timing (str): ``'pre'``, ``'post'``, or ``'auto'`` (the hook's
                ``timing`` attribute, ``'pre'`` if it has none).
        """
        self._hookable.add_hook(hook, name, timing)

    def remove_hook(self, name):
        """Remove the hook registered as ``name`` (``KeyError`` if none)."""
        self._hookable.remove_hook(name)

    @property
    def has_hooks(self):
        """True if any rule-level hook is registered."""
        return bool(self._hookable._pre_update_hooks or self._hookable._post_update_hooks)

    # -- checking ------------------------------------------------------------
    def check_param(self, param, path=None):
        """Raise if :meth:`update` could not update ``param``; changes nothing.

        The base implementation checks that the gradient (if any) matches the
        parameter in type, device, dtype and shape, that the parameter array
        is writeable, and that every state array lives on the parameter's
        device.  Exceptions name the parameter by ``path`` (or its name).
        """
        try:
            self._check_param(param)
        except Exception as e:
            raise _with_label(e, _param_label(param, path)) from None

    def _check_param(self, param):
        """The checks of :meth:`check_param`; messages without the parameter's name."""
        array = param.array
        grad = param.grad
        if array is None:
            if grad is not None:
                raise ValueError("param is uninitialized but has a gradient")
            return
        # With a float32 master copy the rule writes neither the array (it
        # assigns a new one) nor the gradient (it works on a float32 copy).
        copies = self._uses_fp32(param)
        self._check_arrays(array, grad, writes_array=not copies)
        if copies:
            master = self._fp32_param
            master_array = None if master is None else master.array
            if master_array is not None and master_array.shape != array.shape:
                # (the parameter's array was replaced; Chainer fails here too,
                # after the parameters before this one were updated)
                raise ValueError("param has shape %s but its float32 master copy has shape "
                                 "%s (use_fp32_update); reset rule._fp32_param to None "
                                 "with the state to start again"
                                 % (array.shape, master_array.shape))
        if isinstance(grad, numpy.ndarray) and not grad.flags.writeable and not copies:
            if getattr(param, "_loss_scale", None) is not None:
                raise ValueError("grad is read-only but must be divided by the loss scale "
                                 "in place")
            writer = _grad_writer(self._hookable) if self._hookable._count else None
            if writer is not None:
                raise ValueError("grad is read-only but the update rule's hook %r may "
                                 "write it" % (writer,))

    def _check_arrays(self, array, grad, writes_array=True):
        dev = _backend.device_of(array)
        if dev is None:
            raise TypeError("param array must be a numpy or cupy ndarray, got %s"
                            % type(array).__name__)
        if grad is not None:
            gdev = _backend.device_of(grad)
            if gdev is None:
                raise TypeError("grad must be a numpy or cupy ndarray, got %s%s"
                                % (type(grad).__name__,
                                   " (a NumPy scalar, not an array)"
                                   if isinstance(grad, numpy.generic) else ""))
            if gdev != dev:
                raise TypeError("param is a %s but grad is a %s; they must be on the same "
                                "device" % (_backend.describe(array), _backend.describe(grad)))
            if grad.dtype != array.dtype:
                raise TypeError("grad has dtype %s but param has dtype %s"
                                % (grad.dtype, array.dtype))
            if grad.shape != array.shape:
                raise ValueError("grad has shape %s but param has shape %s"
                                 % (grad.shape, array.shape))
        if dev == "cpu" and writes_array and not array.flags.writeable:
            raise ValueError("param is read-only (its array is not writeable)")
        for key, value in (self._state or {}).items():
            vdev = _backend.device_of(value)
            if vdev is not None and vdev != dev:
                raise TypeError("state %r is a %s but param is a %s"
                                % (key, _backend.describe(value), _backend.describe(array)))

    # -- updating ------------------------------------------------------------
    def update(self, param):
        """Call the hooks and update ``param`` (nothing if disabled).

        As in Chainer: increments :attr:`t`; with :meth:`use_fp32_update`
        and a float16 parameter, works on the float32 master copy (gradient
        converted to float32, result cast back into ``param.array``);
        creates the state on the first call; divides the gradient by the
        loss scale that produced it (``param._loss_scale``); then runs
        ``'pre'`` hooks, :meth:`update_core` and ``'post'`` hooks.
        """
        checked = self._checked
        if checked:  # (object.__setattr__: no flag to look at for this name)
            object.__setattr__(self, "_checked", False)
        if not self.enabled:
            return
        if not checked:
            self.check_param(param)
        array = param.array
        if _backend.is_cupy_array(array):
            # Everything below (state, master copy, loss scale) on its device.
            with _backend.device_of_array(array):
                self._update(param)
        else:
            self._update(param)

    def _update(self, param):
        object.__setattr__(self, "t", self._t.value + 1)  # (the property, not __setattr__)
        is_initialized = param.array is not None
        loss_scale = getattr(param, "_loss_scale", None)
        fp32_param = self._fp32_master(param) if self._uses_fp32(param) else None
        param_ = param if fp32_param is None else fp32_param
        if is_initialized:
            self._init_states(param_)
            if loss_scale is not None:
                _divide_grad(param_.grad, loss_scale)
        if self._hookable._pre_update_hooks:
            self._hookable.call_hooks("pre", (self, param_))
            try:
                self.update_core(param_)
            except (TypeError, ValueError) as e:
                # What a rule-level 'pre' hook set that the update cannot take
                # (the checks before the hooks passed): named, as Chainer does not.
                raise _with_label(e, _param_label(param)) from e
        else:
            self.update_core(param_)
        self._hookable.call_hooks("post", (self, param_))
        if fp32_param is not None:
            if is_initialized:
                param.array = fp32_param.array.astype(param.array.dtype)
            fp32_param.grad = None

    def _uses_fp32(self, param):
        """True if ``param`` is updated through a float32 master copy."""
        if not self._use_fp32_update:
            return False
        try:
            dtype = param.dtype
        except RuntimeError:  # uninitialized, dtype unknown
            return False
        return dtype == numpy.float16

    def _fp32_master(self, param):
        """The float32 master copy of ``param``, created (or initialized) lazily."""
        array = param.array
        master = self._fp32_param
        if master is None or (master.array is None and array is not None):
            # Of the parameter's framework: the rule's hooks get it (Chainer's
            # hooks read chainer.Parameter's device).
            cls = _chainer_parameter_class(type(param)) or Parameter
            if array is not None:
                master = cls(array.astype(numpy.float32), name=param.name)
            else:
                master = cls(_Float32Placeholder(), name=param.name)
            self._fp32_param = master
        if array is not None:
            master.grad = None if param.grad is None else param.grad.astype(numpy.float32)
        return master

    def update_core(self, param):
        """Update ``param`` on its device: CPU for NumPy arrays, GPU for CuPy arrays."""
        array = param.array
        if array is None or isinstance(array, numpy.ndarray):
            self.update_core_cpu(param)
        elif _backend.is_cupy_array(array):
            self.update_core_gpu(param)
        else:
            raise TypeError("%s: cannot update an array of type %s"
                            % (_param_label(param), type(array).__name__))

    def update_core_cpu(self, param):
        """Update ``param`` whose array is a NumPy array."""
        raise NotImplementedError

    def update_core_gpu(self, param):
        """Update ``param`` whose array is a CuPy array."""
        raise NotImplementedError

    def init_state(self, param):
        """Create the state entries for ``param`` (called at the first update)."""

    def _init_states(self, param):
        if self._state is None:
            self._state = {}
            self.init_state(param)

    def serialize(self, serializer):
        """Save or load :attr:`t` and the state, under Chainer's keys.

        Keys: ``t`` and one per state entry (``v`` for NesterovAG).  Loading
        into a rule whose state does not exist yet creates it from the
        checkpoint (when the optimizer serializes the rule, each entry is
        first checked against the state its parameter would get -- shape,
        kind of number -- and converted to that dtype and device); if the
        checkpoint has no state (the rule had never
        updated), the state stays uninitialized and is created at the first
        update.  A missing key is tolerated for a disabled rule, as in
        Chainer.  The parameters themselves are saved by the link.  The
        float32 master copy of :meth:`use_fp32_update` is not saved (as in
        Chainer); loading drops it, and the next update rebuilds it from the
        (loaded) parameter.
        """
        self.t = serializer("t", self.t)
        loading = _is_deserializer(serializer)
        if loading and not getattr(serializer, "checking", False):
            # The float32 master copy is not saved (as in Chainer); drop a
            # stale one so that the next update rebuilds it from the loaded
            # parameter instead of overwriting that parameter.
            self._fp32_param = None
        if self._state is None:
            if loading:
                # Find the state's keys by initializing a stand-in.
                keys = self._state_keys()
                checking = getattr(serializer, "checking", False)
                # The parameter, when the optimizer serializes this rule: the
                # loaded entries must fit the state it would create.
                param = self.__dict__.get("_param_being_loaded")
                like = {} if param is None else self._state_like(param)
                state = {}
                for key in keys:
                    try:
                        # While checking, a stand-in of the state's shape and
                        # dtype lets the deserializer compare; nothing is written.
                        value = serializer(key, like.get(key) if checking else None)
                    except KeyError:
                        if self.enabled:
                            raise
                        value = None
                    if checking:
                        continue  # read and check every key; assign nothing
                    if value is None:
                        state = None
                        break
                    if key in like:
                        value = _fit_loaded_state(
                            getattr(serializer, "path", "") + key, value, like[key], param,
                            self._loaded_state_dtypes(param, key))
                    state[key] = value
                if not checking:
                    if state:
                        # Contiguous mode: load into the state buffer's views.
                        views = getattr(self, "_contiguous_state", None) or {}
                        for key, value in list(state.items()):
                            view = views.get(key)
                            if (view is not None and type(view) is type(value)
                                    and getattr(value, "shape", None) == view.shape
                                    and getattr(value, "dtype", None) == view.dtype):
                                view[...] = value
                                state[key] = view
                    self._state = state if keys else None
        elif loading and not isinstance(serializer, Deserializer):
            # Another library's loader (Chainer's load_npz of a Trainer
            # snapshot) would broadcast a smaller array into the state, or
            # cast integers into it: the stored array must fit as cynag's
            # loader requires.
            from cynag.serializers import _check_compatible

            for key in self._state:
                value = self._state[key]
                if not (isinstance(value, numpy.ndarray) or _backend.is_cupy_array(value)):
                    self._state[key] = serializer(key, value)
                    continue
                stored = serializer(key, None)
                if stored is None:
                    # Absent (not strict: left as it is) or a stored None
                    # (Chainer's loader assigns it): its own answer.
                    self._state[key] = serializer(key, value)
                    continue
                stored = stored.get() if _backend.is_cupy_array(stored) else \
                    numpy.asarray(stored)
                _check_compatible(getattr(serializer, "path", "") + key, stored, value)
                if isinstance(value, numpy.ndarray):
                    numpy.copyto(value, stored)
                else:
                    value.set(numpy.asarray(stored, dtype=value.dtype))
        else:
            for key in self._state:
                self._state[key] = serializer(key, self._state[key])

    def _loaded_state_dtypes(self, param, key):
        """Dtypes besides the stand-in's (:meth:`_state_like`) that a state entry
        loaded into a rule without state keeps as stored (none by default:
        the entry is converted to the stand-in's dtype)."""
        return ()

    def _state_like(self, param):
        """``{key: stand-in}`` for the state ``init_state`` would create for ``param``.

        Each stand-in is a NumPy array of the entry's shape and dtype that
        holds no memory of its own (a checkpoint loaded into a rule without
        state is checked against it, and converted to its dtype and to the
        parameter's device).  Empty when ``param`` is uninitialized.
        """
        array = param.array
        if array is None or _backend.device_of(array) is None:
            return {}
        # The state of a float16 parameter updated through a float32 master
        # copy belongs to that copy.
        dtype = numpy.float32 if self._uses_fp32(param) else array.dtype
        target = Parameter(numpy.broadcast_to(numpy.empty((), dtype), array.shape))
        stand_in = copy.copy(self)
        stand_in._state = {}
        stand_in._contiguous_state = None
        stand_in.init_state(target)
        return {k: numpy.broadcast_to(numpy.empty((), v.dtype), v.shape)
                for k, v in stand_in._state.items()
                if isinstance(v, numpy.ndarray)}

    def _state_keys(self):
        """Names of the state entries, found by initializing a throw-away copy."""
        stand_in = copy.copy(self)
        stand_in._state = {}
        arr = numpy.empty(1, dtype=numpy.float32)
        dummy = Parameter(arr)
        dummy.grad = arr
        stand_in.init_state(dummy)
        return list(stand_in._state)

    def use_fp32_update(self, flag=True):
        """Update float16 parameters through a float32 master copy.

        The copy is created at the first update (also for a parameter that is
        uninitialized at setup, once it has an array); each step converts the
        gradient to float32, updates the copy in float32 and casts the result
        back into the parameter, as Chainer does.
        """
        self._use_fp32_update = flag


class _OptimizerHookable(_Hookable):
    def __init__(self, optimizer):
        super().__init__(invalid_timing_fallback=True)
        self.optimizer = optimizer

    def call_hook(self, hook, args):
        self.optimizer.call_hook(hook)


def _is_link_like(obj):
    """A cynag Link, or any object with Chainer's params()/namedparams()."""
    return isinstance(obj, Link) or (callable(getattr(obj, "params", None))
                                     and callable(getattr(obj, "namedparams", None)))


class Optimizer:
    """Base class of optimizers.

    The target link is registered by :meth:`setup`; :meth:`update` updates its
    parameters.  Hooks registered by :meth:`add_hook` are called once per step
    as ``hook(optimizer)``, or, if ``hook.call_for_each_param`` is true, as
    ``hook(param.update_rule, param)`` for every parameter.

    Attributes:
        target: the link set by :meth:`setup` (a cynag link or any
            Chainer-style link, e.g. a ``chainer.Link``).
        t (int): number of update steps.
        epoch (int): current epoch, incremented by :meth:`new_epoch`.
        use_auto_new_epoch (bool): set by an updater that calls
            ``new_epoch(auto=True)`` itself.
    """

    target = None
    t = 0
    epoch = 0
    use_auto_new_epoch = False
    _loss_scale = None
    _loss_scale_max = 65504  # largest finite float16
    _loss_scaling_is_dynamic = False
    _loss_scaling_isnan = False
    _hookable = None

    def setup(self, link):
        """Set the target link, reset ``t``, ``epoch`` and hooks; return ``self``.

        ``link`` is a :class:`cynag.Link` or any object with Chainer's link
        interface (``params()``, ``namedparams()``, ``cleargrads()``), such as
        a ``chainer.Link``.
        """
        if not _is_link_like(link):
            raise TypeError("optimization target must be a link (an object with params() and "
                            "namedparams()), got %s" % type(link).__name__)
        self.target = link
        self.t = 0
        self.epoch = 0
        self._hookable = _OptimizerHookable(self)
        return self

    def update(self, lossfun=None, *args, **kwds):
        """Update the parameters (implemented by subclasses)."""
        raise NotImplementedError

    def new_epoch(self, auto=False):
        """Increment :attr:`epoch`.

        Args:
            auto (bool): ``True`` when called by an updater; it must then have
                set :attr:`use_auto_new_epoch`.  Calling with the other value
                than :attr:`use_auto_new_epoch` says is a ``RuntimeError``.
        """
        if auto:
            if not self.use_auto_new_epoch:
                raise RuntimeError("invalid new_epoch call with auto=True.\n"
                                   "Fix the updater to set optimizer.use_auto_new_epoch = True.")
        elif self.use_auto_new_epoch:
            raise RuntimeError("duplicated new_epoch with the updater.\n"
                               "Pass auto_new_epoch=False to the updater or stop calling "
                               "new_epoch outside the updater.")
        self.epoch += 1

    def _check_set_up(self):
        if self._hookable is None:
            raise RuntimeError("Optimizer is not set up. Call `setup` method.")

    def add_hook(self, hook, name=None, timing="auto"):
        """Register an optimizer hook.

        Args:
            hook (callable): called as ``hook(optimizer)``, or as
                ``hook(rule, param)`` for every parameter if
                ``hook.call_for_each_param`` is true.
            name (str): registration name; defaults to ``hook.name``, then
                ``hook.__name__``.  A duplicate name is a ``KeyError``.
            timing (str): ``'pre'`` (before the parameters are updated),
                ``'post'`` (after), or ``'auto'``: the hook's ``timing``
                attribute, ``'pre'`` if it has none (an invalid attribute
                warns and falls back to ``'pre'``, as in Chainer).
        """
        self._check_set_up()
        self._hookable.add_hook(hook, name, timing)

    def remove_hook(self, name):
        """Remove the hook registered as ``name``."""
        self._check_set_up()
        self._hookable.remove_hook(name)

    def call_hooks(self, timing="pre"):
        """Call the hooks of ``timing`` in registration order."""
        self._check_set_up()
        self._hookable.call_hooks(timing, ())

    def call_hook(self, hook):
        if getattr(hook, "call_for_each_param", False):
            for param in self.target.params():
                hook(param.update_rule, param)
        else:
            hook(self)

    def serialize(self, serializer):
        """Save or load :attr:`t`, :attr:`epoch` and every rule's ``t`` and state.

        Keys are Chainer's: ``t``, ``epoch`` and, for a parameter at path
        ``/l1/W``, ``l1/W/t`` and ``l1/W/v``.  The parameters themselves are
        not saved; serialize the link for them.  Use
        :func:`cynag.serializers.save_npz` / :func:`~cynag.serializers.load_npz`
        (all-or-nothing loading) rather than calling this directly.
        """
        self.t = serializer("t", self.t)
        self.epoch = serializer("epoch", self.epoch)
        for name, param in self.target.namedparams():
            rule = getattr(param, "update_rule", None)
            if rule is None:
                continue
            if isinstance(rule, UpdateRule):
                rule._param_being_loaded = param
                try:
                    rule.serialize(serializer[name])
                finally:
                    del rule._param_being_loaded
            else:
                rule.serialize(serializer[name])

    def loss_scaling(self, interval=1000, scale=None):
        """Configure loss scaling.

        Args:
            interval (int): with dynamic scaling, steps between doublings...
                precisely, the scale grows by ``2 ** (1 / interval)`` per
                step once a non-finite gradient has been seen (by 2 per step
                before that).
            scale (float): a static loss scale; ``None`` selects dynamic
                scaling, starting at 1: a step whose gradients are not all
                finite is skipped with a warning and halves the scale; the
                scale stays within ``[1, 65504]``.
        """
        if scale is None:
            self._loss_scaling_is_dynamic = True
            if interval < 1:
                raise ValueError("interval must be greater than or equal to 1."
                                 " Actual: {}".format(interval))
            self._loss_scale = 1.0
            self._loss_scaling_multiplier = math.pow(2.0, 1.0 / interval)
            self._loss_scaling_isnan_ever = False
        else:
            if scale <= 0:
                raise ValueError("loss_scale must be a positive number. "
                                 "Actual: {}".format(scale))
            self._loss_scale = scale

    def set_loss_scale(self, loss_scale):
        """Set a static loss scale (``None``: dynamic scaling)."""
        self.loss_scaling(scale=loss_scale)

    def check_nan_in_grads(self):
        """With dynamic scaling, look for non-finite gradients (warns for each)."""
        self._loss_scaling_isnan = False
        if not self._loss_scaling_is_dynamic:
            return
        for name, param in self.target.namedparams():
            grad = param.grad
            if grad is None:
                continue
            xp = _backend.array_module(grad)
            if not xp.all(xp.isfinite(grad)):
                self._loss_scaling_isnan = True
                self._loss_scaling_isnan_ever = True
                warnings.warn("Non finite number found in param.grad of {} (iteration: {}, "
                              "loss_scale: {})".format(name, self.t, self._loss_scale))

    def is_safe_to_update(self):
        """False when dynamic loss scaling found a non-finite gradient this step."""
        return not self._loss_scaling_isnan

    def update_loss_scale(self):
        """Adjust the dynamic loss scale after a step."""
        if not self._loss_scaling_is_dynamic:
            return
        if self._loss_scaling_isnan:
            multiplier = 0.5
        elif self._loss_scaling_isnan_ever:
            multiplier = self._loss_scaling_multiplier
        else:
            multiplier = 2.0
        self._loss_scale = max(1, min(self._loss_scale_max, self._loss_scale * multiplier))


def multi_tensor_default():
    """Whether new optimizers use the multi-tensor path: ``CYNAG_MULTI_TENSOR`` (default 1)."""
    raw = os.environ.get("CYNAG_MULTI_TENSOR", "1").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError("environment variable CYNAG_MULTI_TENSOR must be 0 or 1, got %r" % raw)


class GradientMethod(Optimizer):
    """Base class of single-gradient optimizers built from update rules.

    Subclasses override :meth:`create_update_rule`.  :attr:`hyperparam` is
    the parent of every rule's hyperparameter.

    Attributes:
        hyperparam (Hyperparameter): default hyperparameters of the rules.
    """

    def __init__(self):
        super().__init__()
        self.hyperparam = Hyperparameter()
        self._use_fp32_update = False
        self._use_multi_tensor = multi_tensor_default()
        self._plan = None

    def __getstate__(self):
        # The step's table points into arrays by address: a copy
        # (copy.deepcopy, pickle) makes its own.
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.__dict__.get("contiguous_buffers"):
            # A copy does not keep NumPy views: pack the copy's arrays into
            # its own buffers (at once if the copied target is complete,
            # else before the first update).
            from cynag import contiguous as _contiguous

            try:
                self.contiguous_buffers = _contiguous.pack(self.target)
            except Exception:
                self._repack = True

    def setup(self, link, contiguous=False):
        """Set the target and give every parameter a fresh update rule; return ``self``.

        Args:
            link: the target (a cynag link or a Chainer-style link).
            contiguous (bool): also move the parameters, gradients and the
                optimizer state into one buffer per device and dtype (see
                :func:`cynag.contiguous.pack`), so that a step is a single
                pass over memory.
        """
        self._plan = None
        super().setup(link)
        for param in link.params():
            param.update_rule = self.create_update_rule()
            if self._use_fp32_update:
                param.update_rule.use_fp32_update()
        self.contiguous_buffers = None
        if contiguous:
            from cynag import contiguous as _contiguous

            self.contiguous_buffers = _contiguous.pack(link)
        return self

    def use_multi_tensor(self, flag=True):
        """Update the parameters with one native call per device and dtype (default: on).

        With the multi-tensor step (see :mod:`cynag._multi_tensor`), one
        native pass over the parameter objects at every step finds the
        parameters whose rules the kernel can stand in for (same class,
        enabled, without rule-level hooks or float32 master copies, dense
        arrays, ...) and updates them in one native call per dtype; the
        others are updated by their rules at their place in the target's
        order.  Results are the same either way (bit for bit on the CPU);
        ``use_multi_tensor(False)`` selects Chainer's per-parameter loop.
        """
        self._use_multi_tensor = bool(flag)
        self._plan = None

    def multi_tensor_plan(self):
        """How the next step would update the parameters, for inspection.

        A dict: ``groups`` (device, dtype, number of parameters and elements
        of each multi-tensor group) and ``rest`` (paths of the parameters
        updated by their rules or not at all).  Checks every parameter (as
        :meth:`update` does) and changes nothing.  ``None`` when the
        multi-tensor path is off.
        """
        plan = self._current_plan()
        if plan is None:
            return None
        return plan.describe()

    def _current_plan(self):
        if self.__dict__.get("_repack"):
            from cynag import contiguous as _contiguous

            self._repack = False
            self.contiguous_buffers = _contiguous.pack(self.target)
        if not self._use_multi_tensor:
            return None
        self._check_set_up()
        plan = self._plan
        if plan is None:
            from cynag._multi_tensor import Plan

            plan = self._plan = Plan(self)
        return plan

    def _namedparams(self, include_uninit=True):
        return self.target.namedparams(include_uninit)

    def reallocate_cleared_grads(self):
        """Allocate zeros for every gradient cleared to ``None``.

        Called before and after the hooks of every step.  Uninitialized
        parameters are skipped.
        """
        from cynag import _multi_tensor, _step  # noqa: F401 (configures _step)
        from cynag.parameter import _zero_grad

        params = list(self.target.params())
        cleared = []
        _step.cleared(params, cleared)
        for i in cleared:
            _zero_grad(params[i])

    def call_hook(self, hook):
        super().call_hook(hook)
        self.reallocate_cleared_grads()

    def check_params(self):
        """Raise, naming the parameter by its path, if a step could not apply.

        Checks every parameter with an enabled update rule (see
        :meth:`UpdateRule.check_param`).  Changes nothing.
        """
        self._check_set_up()
        checked = []
        for path, param in self._namedparams():
            rule = getattr(param, "update_rule", None)
            check = getattr(rule, "check_param", None)  # Chainer's rules have none
            if check is not None and rule.enabled:
                check(param, path)
                checked.append(rule)
        for rule in checked:
            object.__setattr__(rule, "_checked", True)  # update() need not check again

    def update(self, lossfun=None, *args, **kwds):
        """Update the parameters from a loss function or from computed gradients.

        With ``lossfun``: ``loss = lossfun(*args, **kwds)``, the target's
        gradients are cleared (``cleargrads()``, or ``zerograds()`` after
        ``use_cleargrads(False)``), and ``loss.backward(loss_scale=...)`` is
        called.  Then, in Chainer's order: cleared gradients are reallocated as
        zeros, ``'pre'`` hooks run, :attr:`t` is incremented, every parameter
        is updated by its rule, gradients are reallocated again and ``'post'``
        hooks run.

        Every parameter is checked before any change (see
        :meth:`check_params`): a bad gradient, a read-only array, mixed
        devices or a bad hyperparameter raise an exception that names the
        parameter, and leave every parameter, gradient and state as it was.
        """
        self._check_set_up()
        if lossfun is not None:
            use_cleargrads = getattr(self, "_use_cleargrads", True)
            loss = lossfun(*args, **kwds)
            if use_cleargrads:
                self.target.cleargrads()
            else:
                self.target.zerograds()
            loss.backward(loss_scale=self._loss_scale)
            del loss
            # A Chainer backward pass records its loss scale on every
            # parameter it reaches; for cynag's parameters cynag does (not
            # needed while no scale was ever set: every record is None).
            if self._loss_scale is not None or self.__dict__.get("_scale_recorded"):
                self._scale_recorded = True
                for param in self.target.params():
                    if isinstance(param, Parameter):
                        param._loss_scale = self._loss_scale
        plan = self._current_plan()
        if plan is None:
            self._update_per_param()
            return
        lock = plan.acquire()
        try:
            self._update_multi(plan)
        except BaseException:
            plan.release()
            raise
        finally:
            lock.release()
        # (the table is released: the 'post' hooks may even describe the plan)
        self.call_hooks("post")
        self.update_loss_scale()

    def _check_grads_for_hooks(self, plan=None, post_only=False):
        """Raise, naming the parameter, if an optimizer hook (either timing, or
        only ``'post'``) may write a read-only gradient: before anything
        changes (cleared gradients included).

        ``plan``: the multi-tensor step whose scan flagged the read-only
        gradients; without it every parameter is looked at.
        """
        hookable = self._hookable
        if not (hookable._post_update_hooks or (
                hookable._pre_update_hooks and not post_only)):
            return
        writer = _grad_writer(hookable, post_only)
        if writer is None:
            return
        for path, param in (self._namedparams() if plan is None else plan.read_only_grads()):
            if _read_only_grad(param):
                raise ValueError("%s: grad is read-only but the optimizer hook %r may write it"
                                 % (_param_label(param, path), writer))

    def _update_per_param(self):
        """Chainer's loop: every parameter updated by its rule."""
        self.check_params()
        self._check_grads_for_hooks()
        self.reallocate_cleared_grads()
        self.check_nan_in_grads()
        if self._hookable._pre_update_hooks:
            self.call_hooks("pre")
            # Hooks may have replaced gradients or hyperparameters: check
            # again, before anything is updated.
            self.check_params()
            self._check_grads_for_hooks(post_only=True)
        self.t += 1
        if self.is_safe_to_update():
            for param in self.target.params():
                param.update()  # a checked rule skips its own check once
        self.reallocate_cleared_grads()
        self.call_hooks("post")
        self.update_loss_scale()

    def _update_multi(self, plan):
        """The same steps up to the 'post' hooks, with the multi-tensor step of
        :mod:`cynag._multi_tensor` (the caller holds the plan's lock, and then
        runs the 'post' hooks)."""
        scanned = False
        hookable = self._hookable
        if not hookable._pre_update_hooks and not self._loss_scaling_is_dynamic and (
                not hookable._post_update_hooks or _grad_writer(hookable) is None):
            # Nothing runs between the reading and the update: if every
            # parameter is the kernel's, one native call does the step.
            if plan.step():
                self.t += 1  # (no rule of the kernel reads it)
                plan.release()
                return
            scanned = True
        plan.collect(scanned)  # checks everything; raises before any change
        self._check_grads_for_hooks(plan)
        plan.reallocate()   # Chainer's first reallocation of cleared gradients
        self.check_nan_in_grads()
        programs = None
        if self._hookable._pre_update_hooks:
            hooks = list(self._hookable._pre_update_hooks.values())
            fold = ()
            if self.is_safe_to_update():
                from cynag._multi_tensor import foldable_suffix

                n_fold = foldable_suffix(hooks)
                if n_fold:
                    # Their operations run in the update pass (same results).
                    hooks, fold = hooks[:len(hooks) - n_fold], hooks[len(hooks) - n_fold:]
            if hooks:
                # Over the dictionary itself, as Chainer (see _Hookable.call_hooks):
                # asking for the hooks after those called raises if one of them
                # added or removed a 'pre' hook.
                pre = self._hookable._pre_update_hooks
                it = iter(pre.values())
                for _ in range(len(hooks)):
                    self.call_hook(next(it))
                rest = list(it)
                if len(rest) != len(fold) or any(a is not b for a, b in zip(rest, fold)):
                    # One of them replaced a later hook (same name): Chainer calls
                    # the new one; so are the rest called, in the dictionary.
                    fold = ()
                    it = iter(pre.values())
                    for _ in range(len(hooks)):
                        next(it)
                    for hook in it:
                        self.call_hook(hook)
                # Hooks may have replaced gradients or hyperparameters: read
                # and check everything again, before anything is updated.
                plan.collect()
                plan.reallocate()
            if fold and not plan.can_fold():
                for hook in fold:  # as usual: errors are then Chainer's
                    self.call_hook(hook)
                plan.collect()
                plan.reallocate()
            elif fold:
                programs = plan.fold_prepare(fold)
            # A hook may have made a gradient read-only that a 'post' hook writes.
            self._check_grads_for_hooks(plan, post_only=True)
        self.t += 1
        if self.is_safe_to_update():
            if plan.run(programs):
                self.reallocate_cleared_grads()  # a rule's own code may have cleared some
        plan.release()  # (before the 'post' hooks, which update() calls: they may replace anything)

    def use_cleargrads(self, use=True):
        """Choose ``cleargrads`` (default) or ``zerograds`` in :meth:`update`.

        .. deprecated:: Chainer v2; kept for compatibility.
        """
        warnings.warn("GradientMethod.use_cleargrads is deprecated.", DeprecationWarning,
                      stacklevel=2)
        self._use_cleargrads = use

    def create_update_rule(self):
        """Create the update rule of one parameter (overridden by each method)."""
        raise NotImplementedError

    def use_fp32_update(self, flag=True):
        """Update float16 parameters through float32 master copies (see UpdateRule)."""
        self._use_fp32_update = flag
        link = getattr(self, "target", None)
        if link is not None:
            for param in link.params():
                param.update_rule.use_fp32_update()


#: The update methods an UpdateRule object may be given of its own (see
#: UpdateRule.__setattr__).
_OVERRIDABLE = frozenset(("update", "update_core", "update_core_cpu", "update_core_gpu"))

#: Update-rule classes whose update a multi-tensor kernel replaces, with their
#: update methods as defined: cynag._multi_tensor gives a rule of such a class
#: to the kernel only while the class still has these (a patched or wrapped
#: method is called, as Chainer calls it).
_KERNEL_RULE_METHODS = {}


def _register_kernel_rule(cls):
    """Class decorator: record ``cls``'s update methods (see _KERNEL_RULE_METHODS)."""
    _KERNEL_RULE_METHODS[cls] = {name: getattr(cls, name) for name in (
        "update", "update_core", "update_core_cpu", "update_core_gpu")}
    return cls


def _chainer_parameter_class(tp):
    """``chainer.Parameter`` if ``tp`` is it or a subclass of it, else None."""
    for base in tp.__mro__:
        if base.__name__ == "Parameter" and base.__module__ == "chainer.variable":
            return base
    return None


class _Float32Placeholder:
    """Initializer of a not-yet-initialized float32 master copy (carries the dtype)."""

    dtype = numpy.dtype(numpy.float32)

    def __call__(self, array):
        raise RuntimeError("the float32 master copy is created from the parameter's array")


def _fit_loaded_state(key, value, like, param, kept=()):
    """A state entry loaded into a rule without state, as the rule would hold it.

    It must have the shape of ``like`` (the entry ``init_state`` would
    create) and the same kind of number; it is converted to that dtype (as
    loading into an existing state converts), unless its own dtype is one of
    ``kept``, and put on the parameter's device.
    """
    from cynag.serializers import CheckpointError, CheckpointTypeError

    shape = getattr(value, "shape", None)
    if shape != like.shape:
        raise CheckpointError("key %r has shape %s in the checkpoint but the state of a "
                              "parameter of shape %s needs %s"
                              % (key, shape, param.array.shape, like.shape))
    dtype = getattr(value, "dtype", None)
    if dtype is None or dtype.kind != like.dtype.kind:
        raise CheckpointTypeError("key %r has dtype %s in the checkpoint but the state needs "
                                  "%s (a different kind of number)" % (key, dtype, like.dtype))
    if _backend.is_cupy_array(param.array):
        import cupy

        with _backend.device_of_array(param.array):
            return cupy.asarray(value, dtype=like.dtype)
    if not isinstance(value, numpy.ndarray):  # e.g. a CuPy array from another loader
        value = value.get() if hasattr(value, "get") else numpy.asarray(value)
    if value.dtype in kept:
        return value.copy() if not value.flags.writeable else value
    return value.astype(like.dtype, copy=False)


def _divide_grad(grad, scale):
    """``grad /= scale`` in place, with NumPy 1.x's promotion (as in Chainer)."""
    from cynag.functional import _divide

    _divide(grad, scale)


# (the kernels' own check: the one definition of what they take)
_check_scalar = cynag_kernels.check_real_scalar
