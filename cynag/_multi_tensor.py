"""The multi-tensor step of a :class:`~cynag.optimizer.GradientMethod`.

Every step, one native pass (:func:`cynag._step.scan`) reads the target's
parameter objects -- a :class:`cynag.Link`, a ``chainer.Link`` or any object
with Chainer's link interface -- and fills the step's table: for each
parameter, whether the multi-tensor kernel can update it and, if so, the
addresses of its arrays and its coefficients.  A parameter is updated by the
kernel (a ``FAST`` row) when its update rule can be replaced by the kernel
without any visible difference:

* the rule's class declares a multi-tensor kernel (``_multi_tensor_kind``),
  is registered with ``cynag.optimizer._register_kernel_rule`` and still has
  the ``update``, ``update_core``, ``update_core_cpu`` and
  ``update_core_gpu`` it was registered with (a patched class is classified
  again: the kind is kept with the class's version tag), neither the rule
  nor the parameter object was given an update method of its own, and the
  parameter's ``update()`` is ``update_rule.update(self)``;
* the rule is enabled, has no rule-level hooks and no float32 master copy in
  use, and its state holds exactly the kernel's entries (the first update,
  which creates the state, goes through the rule);
* its hyperparameters are Python floats and its loss scale ``None``, a float
  or an int, and the coefficients fit the compute type;
* its arrays are dense, aligned, in native byte order, writeable where
  written, and overlap no other parameter's arrays.

The other parameters are updated by their rules (``param.update()``) at
their place in the target's order: the kernel runs over the rows between two
of them, so the order of effects is Chainer's whatever the rules' hooks do
(the GPU tables, one launch per device and dtype, run first).
An optimizer without ``'pre'`` hooks, ``'post'`` hooks that may write
gradients or dynamic loss scaling first tries
the whole step in one native call (:func:`cynag._step.step`: scan, overlap
check, kernel, ``t``); it does it when every parameter is ``FAST`` and no
gradient is cleared, and otherwise changes nothing and the general path
goes on from its scan.
Nothing is cached from one step to the next: a step reads the objects as
they are.  Results are bit-identical to the per-parameter path on the CPU
(the kernels share their arithmetic).
"""
import os
import sys
import threading

import numpy

from cynag import _backend, _step, functional
from cynag.optimizer import (UpdateRule, _Hookable, _KERNEL_RULE_METHODS, _with_label,
                             _param_label)
from cynag.parameter import Parameter, _STANDARD_UPDATE, _zero_grad
from cynag_kernels import _nesterov_cpu
from cynag_kernels.multi_tensor import ITEM_ALIGN, ITEMS_PER_THREAD
from cynag_kernels.threads import get_num_threads, get_parallel_threshold

_DTYPES = {11: numpy.dtype(numpy.float32), 12: numpy.dtype(numpy.float64),
           23: numpy.dtype(numpy.float16)}
_KERNELS = {"nesterov_ag": _step.RULE_NESTEROV_AG}
_KERNEL_API = _nesterov_cpu.kernel_api()


def _chainer_parameter_class(tp):
    """True if ``tp`` is Chainer 7's ``chainer.Parameter`` itself, with the layout read natively."""
    if tp.__name__ != "Parameter" or tp.__module__ != "chainer.variable":
        return False
    try:
        import chainer
        from chainer import variable
    except Exception:  # pragma: no cover - Chainer half installed
        return False
    if not chainer.__version__.startswith("7.") or tp is not variable.Parameter:
        return False
    # The properties the native reader replicates must be Chainer 7's own.
    v = variable.Variable
    ok = (tp.array is v.array and tp.grad is v.grad and "_loss_scale" not in tp.__dict__
          and getattr(v, "_has_chainerx_array", None) is False)
    if ok:
        _step.set_chainer_variable(v)  # gradient variables are read natively too
    return ok


def _chainer_links():
    """Chainer 7's ``Link`` if Chainer is imported (its links listed natively), else None."""
    chainer = sys.modules.get("chainer")
    if chainer is None or not getattr(chainer, "__version__", "").startswith("7."):
        return None
    global _chainer_link
    if _chainer_link is None:
        try:
            from chainer import link
        except Exception:  # pragma: no cover - Chainer half installed
            return None
        _step.set_chainer_links(link.Link, link.Chain, link.ChainList)
        _chainer_link = link.Link
    return _chainer_link


_chainer_link = None


def list_params(target, names):
    """``list(target.params())``; a Chainer link's natively (``names``: see
    :func:`cynag._step.link_params`)."""
    link_cls = _chainer_links()
    if link_cls is not None and isinstance(target, link_cls):
        return _step.link_params(target, names)
    return list(target.params())


def list_namedparams(target, names):
    """``list(target.namedparams())``; a Chainer link's natively."""
    link_cls = _chainer_links()
    if link_cls is not None and isinstance(target, link_cls):
        return _step.link_namedparams(target, names)
    return list(target.namedparams())


def _chainer_update_as_defined(fn):
    """True if ``fn`` is ``chainer.Parameter.update`` as Chainer defines it (not
    replaced or wrapped since: its code is Chainer's own)."""
    code = getattr(fn, "__code__", None)
    if code is None or hasattr(fn, "__wrapped__") or code.co_name != "update":
        return False
    # (the file by its last two parts: a compiled file keeps the path it was
    # compiled at, which an installer may have moved)
    where = os.path.normcase(code.co_filename).replace(os.sep, "/")
    return (getattr(fn, "__qualname__", None) == "Parameter.update"
            and where.endswith("chainer/variable.py"))


def _standard_update(tp):
    """True if ``tp().update()`` is ``update_rule.update(self)`` (no override)."""
    from cynag.optimizer import _chainer_parameter_class

    for base in tp.__mro__:
        if base is Parameter:
            return tp.update is _STANDARD_UPDATE
        if base is _chainer_parameter_class(base):
            return tp.update is base.update and _chainer_update_as_defined(base.update)
    # Another class with Chainer's parameter interface: its update() calls
    # update_rule.update(self) (cynag's contract for Chainer-style links).
    return callable(getattr(tp, "update", None))


def _classify_param(tp):
    if tp is Parameter:
        kind = _step.PARAM_CYNAG
    elif _chainer_parameter_class(tp):
        kind = _step.PARAM_CHAINER
    else:
        kind = _step.PARAM_GENERIC
    if _standard_update(tp):
        kind |= _step.PARAM_UPDATE_OK
    return kind


def _classify_rule(tp):
    if not (isinstance(tp, type) and issubclass(tp, UpdateRule)):
        return _step.RULE_OTHER
    kind = tp.__dict__.get("_multi_tensor_kind")  # declared by the class itself
    methods = _KERNEL_RULE_METHODS.get(tp)
    if kind not in _KERNELS or methods is None:
        return _step.RULE_OTHER
    for name, method in methods.items():  # (a patched or wrapped one is called)
        if getattr(tp, name, None) is not method:
            return _step.RULE_OTHER
    # The properties the native reader bypasses must be UpdateRule's own.
    for name in ("enabled", "t", "hyperparam", "_state"):
        if getattr(tp, name) is not getattr(UpdateRule, name):
            return _step.RULE_OTHER
    return _KERNELS[kind]


_step.configure(Parameter, UpdateRule, _Hookable, _classify_param, _classify_rule)

FAST, GPU, REST, SKIP, NEEDS_GRAD = (_step.FAST, _step.GPU, _step.REST, _step.SKIP,
                                     _step.NEEDS_GRAD)


def _own_hook(hook):
    """True for cynag's hooks that read and write their own parameter only."""
    from cynag import optimizer_hooks as H

    if type(hook) in (H.WeightDecay, H.Lasso, H.GradientHardClipping, H.GradientLARS):
        return True
    return type(hook) is H.GradientNoise and hook.noise_func is H.exponential_decay_noise


def _runs_python(param, rule):
    """True if updating ``param`` by its rule can run code other than cynag's own
    (code that might read or replace other parameters' arrays)."""
    if not isinstance(rule, UpdateRule) or type(rule).update is not UpdateRule.update:
        return True
    if rule.has_hooks:
        hookable = rule._hookable
        if not all(map(_own_hook, list(hookable._pre_update_hooks.values())
                       + list(hookable._post_update_hooks.values()))):
            return True
    return type(param) is not Parameter and not _standard_update(type(param))


class Plan:
    """One optimizer's step: the table of the current step (rebuilt at every step)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        # Held while a step (or describe) uses the table: the table holds raw
        # addresses, and another thread's step on the same optimizer would
        # refill or release it meanwhile.
        self.lock = threading.Lock()
        self.table = _step.StepTable()
        self.params = None
        self.gpu_tables = []
        self._paths = None
        self._names = {}  # the sorted name sets of a Chainer link (see _step.link_params)

    # -- collecting ----------------------------------------------------------
    def paths(self):
        """The parameters' paths (``namedparams()``), read when a message needs one."""
        if self._paths is None:
            self._paths = [path for path, _ in self.optimizer.target.namedparams()]
        return self._paths

    def _path(self, i):
        paths = self.paths()
        return paths[i] if i < len(paths) else None

    def _list(self):
        params = list_params(self.optimizer.target, self._names)
        self.params = params
        self._paths = None
        table = self.table
        table.reserve(len(params))
        table.release()
        return params

    def step(self):
        """The usual step in one native call (:func:`cynag._step.step`); True if it ran.

        For an optimizer without ``'pre'`` hooks, ``'post'`` hooks that may
        write gradients or dynamic loss scaling.
        If it did not run, nothing changed and the table holds the scan:
        go on with ``collect(scanned=True)``.
        """
        return _step.step(self._list(), self.table, get_num_threads(),
                          get_parallel_threshold(), ITEMS_PER_THREAD, ITEM_ALIGN, _KERNEL_API)

    def collect(self, scanned=False):
        """Scan the target and check every parameter; raise before anything changes.

        Leaves cleared gradients as they are (see :meth:`reallocate`).
        ``scanned``: :meth:`step` has just scanned the table.
        """
        table = self.table
        if not scanned:
            _step.scan(self._list(), table)
        if table.n_fast < table.n:  # (all FAST: nothing else to look at)
            self._gpu_rows()
            self._check_rows((REST, NEEDS_GRAD))

    def read_only_grads(self):
        """``(path, param)`` of the rows whose gradient is a read-only NumPy array
        (the scan's flag); made only when asked (an optimizer with a hook
        that may write gradients)."""
        table = self.table
        rows = numpy.flatnonzero(table.flags[:table.n] & _step.GRAD_READ_ONLY).tolist()
        return [(self._path(i), self.params[i]) for i in rows]

    def _recount(self):
        table = self.table
        table.n_fast = int((table.codes[:table.n] == FAST).sum())

    def _gpu_rows(self):
        """Group the ``GPU`` rows into GPU tables (rows they cannot take go to ``REST``)."""
        table = self.table
        codes = table.codes[:table.n]
        self.gpu_tables = []
        rows = numpy.flatnonzero(codes == GPU)
        if not len(rows):
            return
        params = self.params
        groups = {}
        for i in rows.tolist():
            array = params[i].array
            if not _backend.is_cupy_array(array) or array.dtype not in _DTYPES.values():
                codes[i] = REST
                continue
            groups.setdefault((array.device.id, array.dtype), []).append(i)
        from cynag_kernels.cuda import GPUTable

        for key, idx in groups.items():
            ps = [params[i] for i in idx]
            rules = [table.rule(i) for i in idx]
            coef = table.coef
            scales = [None if not coef[i, 5] else _loss_scale_of(params[i]) for i in idx]
            gt = GPUTable([p.array for p in ps], [p.grad for p in ps],
                          [r._state_dict["v"] for r in rules],
                          [float(coef[i, 0]) for i in idx], [float(coef[i, 1]) for i in idx],
                          None if not any(s is not None for s in scales) else scales,
                          strict=False)
            for k in gt.excluded:
                codes[idx[k]] = REST
            if gt.excluded:
                self._recount()
            kept = [i for k, i in enumerate(idx) if k not in set(gt.excluded)]
            if kept:
                self.gpu_tables.append((key, gt, kept))

    def _check_rows(self, codes_to_check):
        """``rule.check_param`` of the rows with these codes (named errors)."""
        table = self.table
        codes = table.codes[:table.n]
        mask = codes == codes_to_check[0]
        for c in codes_to_check[1:]:
            mask |= codes == c
        params = self.params
        for i in numpy.flatnonzero(mask).tolist():
            param = params[i]
            rule = getattr(param, "update_rule", None)
            check = getattr(rule, "check_param", None)  # Chainer's rules have none
            if check is None or not rule.enabled:
                continue
            try:
                check(param)
            except Exception:
                check(param, self._path(i))  # the same error, named by path
                raise
            if codes[i] == REST:
                object.__setattr__(rule, "_checked", True)  # update() need not check again

    def reallocate(self):
        """Zeros for the cleared gradients (as Chainer's first reallocation), then the
        rows that waited for them, and the overlap check of the whole table."""
        table = self.table
        n = table.n
        params = self.params
        cleared = numpy.flatnonzero(table.flags[:n] & _step.CLEARED) if table.n_cleared else ()
        if len(cleared):
            for i in cleared.tolist():
                _zero_grad(params[i])
            waiting = numpy.flatnonzero(table.codes[:n] == NEEDS_GRAD)
            if len(waiting):
                _step.scan(params, table, waiting)
                codes = table.codes[:n]
                codes[waiting[codes[waiting] == NEEDS_GRAD]] = REST
                self._recount()
                self._gpu_rows()
        self._mark_overlaps()

    def _mark_overlaps(self):
        table = self.table
        codes = table.codes[:table.n]
        extras = []
        params = self.params
        others = numpy.flatnonzero(codes != FAST).tolist() if table.n_fast < table.n else []
        if len(others) == table.n:
            return
        for i in others:
            param = params[i]
            array = param.array
            if array is None:
                continue
            extras.append(array)
            if codes[i] != SKIP or getattr(param, "update_rule", None) is not None:
                extras.append(param.grad)
            rule = getattr(param, "update_rule", None)
            state = getattr(rule, "state", None) if rule is not None else None
            if state:
                extras.extend(state.values())
        moved = _step.mark_overlaps(table, extras)
        if moved:
            self._recount()
            self._check_rows((REST,))

    # -- hooks folded into the pass -----------------------------------------
    def can_fold(self):
        """True if folded hooks cannot fail: every gradient is writeable."""
        table = self.table
        codes = table.codes[:table.n]
        params = self.params
        for i in range(table.n):
            if codes[i] == FAST:
                g = table.kept(i, 1)
            else:
                try:
                    g = params[i].grad
                except Exception:
                    # (Chainer: the gradient of a parameter never given one.)
                    # The hooks then run as usual and raise where Chainer's do.
                    return False
                a = params[i].array
                if g is not None and a is not None and \
                        getattr(g, "shape", None) != getattr(a, "shape", None):
                    return False  # (a frozen parameter's array replaced: same)
            if isinstance(g, numpy.ndarray):
                if not g.flags.writeable:
                    return False
            elif g is not None and not _backend.is_cupy_array(g):
                return False
        # Rules that run code of their own would see the hooks' effects late.
        for i in numpy.flatnonzero(codes == REST).tolist():
            if _runs_python(params[i], getattr(params[i], "update_rule", None)):
                return False
        return True

    def fold_prepare(self, fold):
        """Run the folded hooks where they cannot join the update pass; return the
        operation programs of the dtypes whose pass takes them.

        Called where the optimizer would call the hooks (before ``t`` is
        incremented).  A GradientClipping first in ``fold`` takes its norm
        now.
        """
        from cynag.optimizer_hooks import GradientClipping
        from cynag_kernels.hooks import op_row

        hooks = list(fold)
        rate = None
        if hooks and isinstance(hooks[0], GradientClipping):
            rate = hooks[0]._rate(self.optimizer)
            hooks = hooks[1:]
        table = self.table
        n = table.n
        codes = table.codes[:n]
        params = self.params
        programs = {}
        folded_rows = numpy.zeros(n, bool)
        fast = numpy.flatnonzero(codes == FAST)
        for type_num in numpy.unique(table.type_nums[fast]).tolist() if len(fast) else []:
            rows = fast[table.type_nums[fast] == type_num]
            ls = table.coef[rows, 4:6]
            if not (ls == ls[0]).all():
                continue  # WeightDecay's rate depends on the loss scale
            first = params[rows[0]]
            ops = [("scale", rate)] if rate is not None else []
            for hook in hooks:
                ops.extend(hook._ops(first))
            dtype = _DTYPES[type_num]
            program = [op_row(dtype, op) for op in ops]
            if any(r is None for r in program):
                continue
            programs[type_num] = numpy.array(program, numpy.float64).reshape(-1, 4)
            folded_rows[rows] = True
        from cynag_kernels.hooks import gpu_row

        for key, gt, kept in self.gpu_tables:
            scales = [_loss_scale_of(params[i]) for i in kept]
            if any(x is not scales[0] and x != scales[0] for x in scales):
                continue
            ops = [("scale", rate)] if rate is not None else []
            for hook in hooks:
                ops.extend(hook._ops(params[kept[0]]))
            program = [gpu_row(key[1], op) for op in ops]
            if any(r is None for r in program):
                continue
            programs[("gpu", key)] = numpy.array(program, numpy.float64).reshape(-1, 4)
            folded_rows[kept] = True
        one_by_one = [(i, params[i]) for i in numpy.flatnonzero(~folded_rows).tolist()]
        _apply_hooks(one_by_one, hooks, rate)
        return programs

    # -- updating ------------------------------------------------------------
    def run(self, programs=None):
        """Update every parameter once, in the target's order.

        The kernel updates the ``FAST`` rows between two rows updated by
        their rules; ``programs`` (from :meth:`fold_prepare`) are the hook
        operations each dtype's pass applies first.  Returns True if some
        rule ran code other than cynag's own.
        """
        table = self.table
        n = table.n
        params = self.params
        codes = table.codes[:n]
        ran_python = False
        for key, gt, kept in self.gpu_tables:
            functional.nesterov_ag_table(
                gt, ops=None if programs is None else programs.get(("gpu", key)))
            for i in kept:
                rule = table.rule(i)
                rule.t = rule.t + 1
        rest = numpy.flatnonzero(codes == REST).tolist()
        lo = 0
        k = 0
        while True:
            r = rest[k] if k < len(rest) else n
            self._run_fast(lo, r, programs)
            if r >= n:
                break
            param = params[r]
            rule = getattr(param, "update_rule", None)
            python = _runs_python(param, rule)
            param.update()
            lo = r + 1
            k += 1
            if python and lo < n:
                ran_python = True
                # Its code may have replaced later arrays: read them again.
                later = numpy.flatnonzero(codes[lo:] == FAST) + lo
                if len(later):
                    _step.scan(params, table, later)
                    codes[later[codes[later] == NEEDS_GRAD]] = REST
                    self._recount()
                    self._mark_overlaps()
                    rest = rest[:k] + numpy.flatnonzero(codes[lo:] == REST).tolist()
                    rest[k:] = [x + lo for x in rest[k:]]
        return ran_python

    def _run_fast(self, lo, hi, programs):
        if hi <= lo:
            return
        table = self.table
        scratch = table.kernel_scratch
        for type_num in self._type_nums(lo, hi):
            functional.nesterov_ag_rows(
                table, lo, hi, type_num, scratch,
                ops=None if programs is None else programs.get(type_num))
        _step.bump_t(table, lo, hi, FAST)

    def _type_nums(self, lo, hi):
        """The dtypes (NumPy type numbers) of the ``FAST`` rows in ``[lo, hi)``."""
        table = self.table
        tn = table.type_nums[lo:hi]
        first = int(tn[0]) if hi > lo else -1
        if first >= 0 and lo == 0 and hi == table.n and table.n_fast == table.n \
                and (tn == first).all():
            return (first,)
        fast = table.codes[lo:hi] == FAST
        return sorted(set(numpy.unique(tn[fast]).tolist()))

    def release(self):
        """Drop the step's references to arrays and rules."""
        self.table.release()
        self.params = None
        self.gpu_tables = []
        self._paths = None

    def describe(self):
        """A summary of the step: groups (device, dtype, kind, tensors) and the rest's paths."""
        lock = self.acquire()
        try:
            return self._describe()
        finally:
            lock.release()

    def acquire(self):
        """Take the plan's lock and return it; RuntimeError if it is held."""
        lock = self.lock
        if not lock.acquire(blocking=False):
            raise RuntimeError("this optimizer's multi-tensor step is in use (an update() in "
                               "another thread, or a 'pre' hook calling update() or "
                               "multi_tensor_plan()); one optimizer updates in one thread at "
                               "a time")
        return lock

    def _describe(self):
        self.collect()
        try:
            self.optimizer._check_grads_for_hooks(self)  # (as update() checks)
            table = self.table
            n = table.n
            codes = table.codes[:n]
            self._mark_overlaps()
            groups = {}
            fast = numpy.flatnonzero(codes == FAST)
            from cynag_kernels.multi_tensor import CPUTable

            for type_num in numpy.unique(table.type_nums[fast]).tolist() if len(fast) else []:
                rows = fast[table.type_nums[fast] == type_num]
                cpu = CPUTable.from_rows(table.ptrs[rows], table.sizes[rows], table.coef[rows],
                                         _DTYPES[type_num])
                groups[("cpu", str(_DTYPES[type_num]))] = [len(rows), cpu.n_elements,
                                                           cpu.n_tensors]
            for (dev, dtype), gt, kept in self.gpu_tables:
                groups[("gpu:%d" % dev, str(dtype))] = [len(kept), gt.n_elements, gt.n_tensors]
            for i in numpy.flatnonzero(codes == NEEDS_GRAD).tolist():
                array = self.params[i].array
                key = (_backend.device_of(array) or "cpu", str(array.dtype))
                g = groups.setdefault(key, [0, 0, None])
                g[0] += 1
                g[2] = None  # built at the update, once the gradient exists
            paths = self.paths()
            return {
                "groups": [{"device": dev, "dtype": dtype, "kind": "nesterov_ag",
                            "params": cnt, "table_rows": rows, "elements": elements}
                           for (dev, dtype), (cnt, elements, rows) in groups.items()],
                "rest": [paths[i] for i in numpy.flatnonzero(
                    (codes != FAST) & (codes != GPU) & (codes != NEEDS_GRAD)).tolist()],
            }
        finally:
            self.release()

def _loss_scale_of(param):
    return getattr(param, "_loss_scale", None)


def _apply_hooks(entries, hooks, rate):
    """Apply folded optimizer hooks to the parameters of ``entries`` ((index, param)
    pairs in the target's order) as the optimizer calls them: the clipping scale
    on every gradient, then each hook on every parameter in turn."""
    if rate is not None:
        from cynag.optimizer_hooks import _apply

        for _, param in entries:
            if param.array is None:
                continue
            g = param.grad
            if g is not None:
                _apply(g, None, [("scale", rate)])
    for hook in hooks:
        for _, param in entries:
            hook(getattr(param, "update_rule", None), param)


def foldable_suffix(hooks):
    """How many of the last optimizer 'pre' hooks the multi-tensor pass can run.

    The per-element cynag hooks (WeightDecay, Lasso, GradientHardClipping:
    their exact classes, called for each parameter) at the end of the list,
    and a GradientClipping right before them (its norm is taken on the
    gradients as they are when it would run).
    """
    from cynag.optimizer_hooks import (GradientClipping, GradientHardClipping, Lasso,
                                       WeightDecay)

    n = 0
    for hook in reversed(hooks):
        if type(hook) in (WeightDecay, Lasso, GradientHardClipping) \
                and hook.call_for_each_param is True:
            n += 1
            continue
        if type(hook) is GradientClipping and not getattr(hook, "call_for_each_param", False):
            n += 1
        break
    return n
