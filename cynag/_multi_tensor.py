"""The multi-tensor plan of a :class:`~cynag.optimizer.GradientMethod`.

A plan splits the target's parameters into *groups*, each updated by one
native call (:class:`cynag_kernels.multi_tensor.CPUTable` on the CPU,
:class:`cynag_kernels.cuda.GPUTable` on a GPU), and the *rest*, updated one
by one through ``param.update()`` as in Chainer.  A parameter joins a group
when its update rule can be replaced by the group's kernel without any
visible difference:

* the rule's class declares a multi-tensor kernel (``_multi_tensor_kind``)
  and the parameter's class does not override ``update``;
* the rule is enabled, has no rule-level hooks and no float32 master copy
  in use, and its state exists and holds exactly the kernel's entries (the
  first update, which creates the state, goes through the rule);
* its hyperparameters and loss scale are Python floats whose coefficients
  fit the compute type;
* its arrays are dense, writeable where written, and overlap no other
  parameter's arrays.

Groups are keyed by device and dtype.  Results are bit-identical to the
per-parameter path on the CPU: the kernels share their arithmetic.  The
rules of a group keep their own ``t``: the group counts steps once and each
rule reads its ``t`` from that count (see ``UpdateRule.t``).

The plan is cached.  The change counters of :mod:`cynag._tracking` tell it
when it may still hold: when nothing changed, a step costs no Python work per
parameter; a replaced gradient or a new hyperparameter value rebuilds the
groups' tables only; anything else rebuilds the plan.  Plans over objects
cynag does not own (``chainer.Link`` parameters) are rebuilt at every step.
"""
import collections
import itertools
import operator

import numpy

from cynag import _backend, _tracking
from cynag.parameter import Parameter

_ARRAY = operator.attrgetter("_array")
_GRAD = operator.attrgetter("_grad")
_LOSS_SCALE = operator.attrgetter("_loss_scale")
_PARAM_UPDATE = Parameter.update
_DTYPES = frozenset(numpy.dtype(t) for t in (numpy.float16, numpy.float32, numpy.float64))


def _holder(hyperparam, name):
    """The Hyperparameter object whose own entry ``name`` a lookup finds."""
    hp = hyperparam
    while hp is not None:
        d = hp.__dict__
        if name in d:
            return hp
        hp = d.get("_parent")
    return None


class _Group:
    """Parameters updated together: same device and dtype, same kind of rule."""

    def __init__(self, key, kind, entries, owned):
        self.key = key
        self.kind = kind
        self.entries = entries          # [(index, path, param, rule)]
        self.owned = owned              # all params are cynag Parameters
        self.params = [e[2] for e in entries]
        self.rules = [e[3] for e in entries]
        self.table = None
        self.counter = _tracking.Counter()
        self.holders = None

    # -- table ---------------------------------------------------------------
    def _values(self):
        """``(lr, momentum, loss_scale, bad)``: per-entry values and the entries
        whose values the kernel cannot take (not Python floats)."""
        if self.holders is None:
            self.holders = [(_holder(r.hyperparam, "lr"), _holder(r.hyperparam, "momentum"))
                            for r in self.rules]
        bad = set()
        values = []
        for k, name in enumerate(("lr", "momentum")):
            vals = [None if h[k] is None else h[k].__dict__[name] for h in self.holders]
            if set(map(type, vals)) != {float}:
                bad.update(i for i, x in enumerate(vals) if type(x) is not float)
                vals = [x if type(x) is float else 0.0 for x in vals]
            values.append(vals)
        if self.owned:
            scales = list(map(_LOSS_SCALE, self.params))
        else:
            scales = [getattr(p, "_loss_scale", None) for p in self.params]
        kinds = set(map(type, scales))
        if kinds - {type(None), float, int}:
            bad.update(i for i, x in enumerate(scales) if type(x) not in (type(None), float, int))
            scales = [x if type(x) in (type(None), float, int) else None for x in scales]
        values.append(None if kinds == {type(None)} else scales)
        values.append(bad)
        return values

    def grads_changed(self):
        """True if some parameter's gradient is not the array the table points at."""
        table = self.table
        if table is None:
            return True
        grads = list(map(_GRAD, self.params)) if self.owned else [p.grad for p in self.params]
        return not all(map(operator.is_, grads, table._arrays[1]))

    def refresh_grads(self):
        """Point the table at the current gradients; False if that is not enough."""
        table = self.table
        if table is None:
            return False
        params = self.params
        grads = list(map(_GRAD, params)) if self.owned else [p.grad for p in params]
        if any(map(operator.is_, grads, itertools.repeat(None))):
            self.table = None
            return False
        table = table.with_grads(grads)
        if table.excluded:
            return False
        self.table = table
        return True

    def build_table(self):
        """Build the native table; return the entries it had to leave out.

        Returns ``None`` (and builds nothing) while some gradient is ``None``:
        the optimizer allocates it before the update and the table is built
        then.
        """
        params = self.params
        if self.owned:
            arrays, grads = list(map(_ARRAY, params)), list(map(_GRAD, params))
        else:
            arrays = [p.array for p in params]
            grads = [p.grad for p in params]
        self.table = None
        lr, momentum, scales, bad = self._values()
        if bad:
            return [self.entries[i] for i in sorted(bad)]
        vs = [r._state["v"] for r in self.rules]
        pending = [i for i, g in enumerate(grads) if g is None]
        if pending:
            # Check the others now; build the table once the optimizer has
            # allocated the missing gradients.
            keep = [i for i, g in enumerate(grads) if g is not None]
            sub = self._make_table([arrays[i] for i in keep], [grads[i] for i in keep],
                                   [vs[i] for i in keep], [lr[i] for i in keep],
                                   [momentum[i] for i in keep],
                                   None if scales is None else [scales[i] for i in keep])
            excluded = [self.entries[keep[i]] for i in sub.excluded]
            if excluded:
                return excluded
            # The parameters whose gradient is cleared: check their arrays
            # and state now, before the optimizer allocates anything.
            for i in pending:
                _, path, param, rule = self.entries[i]
                rule.check_param(param, path)
            return None
        table = self._make_table(arrays, grads, vs, lr, momentum, scales)
        excluded = [self.entries[i] for i in table.excluded]
        if excluded:
            return excluded
        self.table = table
        return []

    def _make_table(self, arrays, grads, vs, lr, momentum, scales):
        device = self.key[0]
        if device == "cpu":
            from cynag_kernels.multi_tensor import CPUTable

            return CPUTable(arrays, grads, vs, lr, momentum, scales, strict=False)
        else:
            from cynag_kernels.cuda import GPUTable

            return GPUTable(arrays, grads, vs, lr, momentum, scales, strict=False)

    def run(self, ops=None):
        if ops is None:
            self.table.run()
        else:
            self.table.run(ops=ops)
        self.counter.n += 1

    def fold_rows(self, hooks, rate):
        """The operation program of ``hooks`` for this group's pass, or None.

        None when the group cannot take them in its pass: loss scales that
        differ between its parameters (WeightDecay's rate depends on it), or,
        on the CPU, a coefficient NumPy would not round to the dtype (on a
        GPU, CuPy rounds every coefficient to the dtype).
        """
        if self.table is None:
            return None
        from cynag_kernels.hooks import gpu_row, op_row

        row_of = op_row if self.key[0] == "cpu" else gpu_row
        scales = list(map(_LOSS_SCALE, self.params)) if self.owned else \
            [getattr(p, "_loss_scale", None) for p in self.params]
        first = scales[0] if scales else None
        if any(s is not first and s != first for s in scales):
            return None
        ops = []
        if rate is not None:
            ops.append(("scale", rate))
        for hook in hooks:
            ops.extend(hook._ops(self.params[0]) if self.params else [])
        dtype = self.key[1]
        rows = [row_of(dtype, op) for op in ops]
        if any(r is None for r in rows):
            return None
        return numpy.array(rows, numpy.float64).reshape(-1, 4)

    def attach(self):
        stolen = False
        for rule in self.rules:
            if rule._t_counter is not None and rule._t_counter is not self.counter:
                stolen = True  # counted by another optimizer's plan until now
            rule._attach_t(self.counter)
        if stolen:
            # Let that plan notice and take its rules back (each optimizer
            # that updates a rule counts its steps, as in Chainer).
            _tracking.structure.bump()

    def detach(self):
        for rule in self.rules:
            if rule._t_counter is self.counter:
                rule._attach_t(None)


class Plan:
    """Groups and rest of one optimizer's target, rebuilt when something changed."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.target = None
        self.snapshot = None
        self.groups = []
        self.rest = []          # [(index, path, param, rule)] in the target's order
        self.initialized = []   # the target's initialized parameters, in order
        self.owned = False      # every parameter is a cynag Parameter

    # -- building ------------------------------------------------------------
    @staticmethod
    def _key(param, rule):
        """Group key of ``param``, or None if it must be updated on its own."""
        # Declared by the rule's own class: a subclass may change the update.
        kind = type(rule).__dict__.get("_multi_tensor_kind")
        if kind is None or not rule.enabled or rule.has_hooks:
            return None
        if type(param).update is not _PARAM_UPDATE and isinstance(param, Parameter):
            return None
        array = param.array
        if array is None:
            return None
        state = rule._state
        if state is None or len(state) != 1 or "v" not in state:
            return None
        dtype = getattr(array, "dtype", None)
        if dtype not in _DTYPES:
            return None
        if rule._use_fp32_update and dtype == numpy.float16:
            return None
        if isinstance(array, numpy.ndarray):
            return ("cpu", dtype, kind)
        if _backend.is_cupy_array(array):
            return ("gpu:%d" % array.device.id, dtype, kind)
        return None

    def _detach(self):
        for group in self.groups:
            group.detach()
        self.groups = []

    def build(self):
        """Group the target's parameters and check the rest (may raise)."""
        self._detach()
        self.snapshot = None
        target = self.optimizer.target
        grouped = {}
        rest = []
        owned = True
        initialized = []
        for index, (path, param) in enumerate(target.namedparams()):
            if not isinstance(param, Parameter):
                owned = False
            if param.array is not None:
                initialized.append(param)
            rule = getattr(param, "update_rule", None)
            key = None if rule is None else self._key(param, rule)
            entry = (index, path, param, rule)
            if key is None:
                rest.append(entry)
            else:
                grouped.setdefault(key, []).append(entry)
        # A rule shared by several parameters counts a step for each of them
        # (as in Chainer): such parameters are updated one by one.
        rule_uses = collections.Counter(id(e[3]) for entries in grouped.values()
                                        for e in entries)
        if any(count > 1 for count in rule_uses.values()):
            for key in list(grouped):
                shared = [e for e in grouped[key] if rule_uses[id(e[3])] > 1]
                if shared:
                    rest.extend(shared)
                    grouped[key] = [e for e in grouped[key] if rule_uses[id(e[3])] == 1]
                    if not grouped[key]:
                        del grouped[key]
        groups = []
        for key, entries in grouped.items():
            group = _Group(key, key[2], entries,
                           owned and all(isinstance(e[2], Parameter) for e in entries))
            excluded = group.build_table()
            if excluded:
                keep = set(id(e) for e in excluded)
                rest.extend(excluded)
                entries = [e for e in entries if id(e) not in keep]
                if not entries:
                    continue
                group = _Group(key, key[2], entries, group.owned)
                if group.build_table():  # pragma: no cover - the same arrays passed before
                    rest.extend(group.entries)
                    continue
            groups.append(group)
        groups, moved = _separate_from_rest(groups, rest)
        rest.extend(moved)
        rest.sort(key=operator.itemgetter(0))
        self.rest = rest
        self.owned = owned
        self.initialized = initialized
        self.signature = None if owned else self._foreign_signature(
            [param for _, param in target.namedparams()])
        self.target = target
        self.groups = groups
        for group in groups:
            group.attach()
        self.check_rest()
        self.snapshot = _tracking.snapshot()

    @staticmethod
    def _foreign_signature(params):
        """What a step depends on that a ``chainer.Parameter`` does not report."""
        # ids, not objects: chainer.Variable refuses ==.  The plan keeps the
        # parameters and the tables keep their arrays alive, so no id is reused.
        return ([id(p) for p in params], [id(p.array) for p in params],
                [id(getattr(p, "update_rule", None)) for p in params],
                [getattr(p, "_loss_scale", None) for p in params])

    def current_params(self):
        """The target's initialized parameters if the plan is current, else None."""
        if (self.snapshot is None or not self.owned or self.target is not self.optimizer.target
                or _tracking.structure.n != self.snapshot[0]):
            return None
        return self.initialized

    def check_rest(self):
        """Check the parameters updated one by one, as ``check_params`` does."""
        checked = []
        for _, path, param, rule in self.rest:
            check = getattr(rule, "check_param", None)  # Chainer's rules have none
            if check is not None and rule.enabled:
                check(param, path)
                checked.append(rule)
        for rule in checked:
            rule._checked = True

    def _refresh(self, snapshot):
        """Update the groups' tables after gradients or values changed (True: done)."""
        if _tracking.hyper.n != snapshot[2]:
            for group in self.groups:
                if group.build_table():
                    return False
            return True
        for group in self.groups:
            if group.refresh_grads():
                continue
            if group.build_table():  # None: a gradient is still None (built later)
                return False
        return True

    def prepare(self, final=False):
        """Make the plan current and check every parameter; raise on bad input.

        Nothing is modified except the plan itself.  The arrays are checked
        again at every call (an array can be made read-only or reshaped in
        place).  ``final``: the update follows at once and only the
        optimizer's reallocation of cleared gradients happened since the
        previous call: build the tables that waited for those.
        """
        snapshot = self.snapshot
        if (snapshot is None or self.target is not self.optimizer.target
                or _tracking.structure.n != snapshot[0]):
            self.build()
            return
        if not self.owned:
            # Parameters cynag does not own report no change: compare.
            if not final and self._foreign_signature(
                    [param for _, param in self.target.namedparams()]) != self.signature:
                self.build()
                return
            for group in self.groups:
                if group.grads_changed() and not group.refresh_grads() \
                        and group.build_table():
                    self.build()
                    return
        if _tracking.snapshot() != snapshot:
            if not self._refresh(snapshot):
                self.build()
                return
            self.snapshot = _tracking.snapshot()
        for group in self.groups:
            if group.table is None:
                if final:  # a cleared gradient was allocated: build its table
                    self.build()
                    return
            elif not final and not group.table.verify():
                # An array was changed in place (made read-only, reshaped):
                # regroup, and let the parameter's own check name it.
                self.build()
                return
        if not final:  # (after the previous call only cleared gradients became zeros)
            self.check_rest()

    # -- updating ------------------------------------------------------------
    def can_fold(self):
        """True if folded hooks cannot fail: every gradient is writeable.

        Otherwise the optimizer calls the hooks as usual, so that the error
        (and what was changed before it) is Chainer's.
        """
        from cynag_kernels import _nesterov_cpu

        for group in self.groups:
            table = group.table
            if table is None:
                return False
            if group.key[0] == "cpu" and not _nesterov_cpu.arrays_writeable(
                    list(table._arrays[1])):
                return False
        for _, _, param, _ in self.rest:
            g = param.grad
            if isinstance(g, numpy.ndarray):
                if not g.flags.writeable:
                    return False
            elif g is not None and not _backend.is_cupy_array(g):
                return False
        return True

    def fold_prepare(self, fold):
        """Run the folded hooks where they cannot join the update pass; return the
        operation programs of the groups whose pass takes them.

        Called where the optimizer would call the hooks (before ``t`` is
        incremented).  A GradientClipping first in ``fold`` takes its norm
        now.  The returned dict maps groups to ``(rows, hooks, rate)``.
        """
        from cynag.optimizer_hooks import GradientClipping

        hooks = list(fold)
        rate = None
        if hooks and isinstance(hooks[0], GradientClipping):
            rate = hooks[0].rate(self.optimizer)
            hooks = hooks[1:]
        programs = {}
        one_by_one = []
        for group in self.groups:
            rows = group.fold_rows(hooks, rate)
            if rows is None:
                one_by_one.extend(group.entries)
            programs[group] = rows  # None: applied already
        one_by_one.extend(self.rest)
        one_by_one.sort(key=operator.itemgetter(0))
        _apply_hooks(one_by_one, hooks, rate)
        return {"programs": programs, "hooks": hooks, "rate": rate}

    def run(self, folded=None):
        """Update every parameter once: one native call per group, then the rest.

        ``folded``: the result of :meth:`fold_prepare`; each group runs its
        operation program in its pass (a group rebuilt since then applies
        the hooks first, one parameter at a time).
        """
        for group in self.groups:
            if group.table is None:  # pragma: no cover - prepare() builds it
                raise RuntimeError("multi-tensor plan used before its tables were built")
        programs = {} if folded is None else folded["programs"]
        for group in self.groups:
            if folded is not None and group not in programs:
                # Rebuilt since fold_prepare(): the hooks as the optimizer calls them.
                _apply_hooks(group.entries, folded["hooks"], folded["rate"])
            group.run(programs.get(group))
        for _, _, param, _ in self.rest:
            param.update()

    def release(self):
        """Give the rules their own ``t`` back (the plan is dropped)."""
        self._detach()
        self.snapshot = None
        self.rest = []

    def describe(self):
        """A summary of the plan: groups (key, tensors, table rows, elements) and rest."""
        return {
            "groups": [{"device": g.key[0], "dtype": str(g.key[1]), "kind": g.kind,
                        "params": len(g.params),
                        "table_rows": None if g.table is None else g.table.n_tensors,
                        "elements": None if g.table is None else g.table.n_elements}
                       for g in self.groups],
            "rest": [e[1] for e in self.rest],
        }


def _byte_bounds(a):
    """``(lo, hi)`` addresses spanned by a NumPy array, or None."""
    if not isinstance(a, numpy.ndarray) or a.size == 0:
        return None
    return numpy.lib.array_utils.byte_bounds(a) if hasattr(numpy.lib, "array_utils") \
        else numpy.byte_bounds(a)


def _separate_from_rest(groups, rest):
    """Move out of the CPU groups every entry whose memory a rest parameter touches.

    Groups are updated before the rest; a grouped array that overlaps an
    array of a parameter updated one by one would see the updates in
    another order than Chainer's.  Returns the groups (rebuilt where
    needed) and the entries moved out.
    """
    spans = []
    for _, _, param, rule in rest:
        arrays = [getattr(param, "array", None), getattr(param, "grad", None)]
        state = getattr(rule, "state", None) if rule is not None else None
        if state:
            arrays.extend(state.values())
        for a in arrays:
            b = _byte_bounds(a)
            if b is not None:
                spans.append(b)
    if not spans:
        return groups, []
    spans = numpy.array(spans, numpy.int64)
    order = numpy.argsort(spans[:, 0])
    rlo, rhi = spans[order, 0], numpy.maximum.accumulate(spans[order, 1])
    kept, moved = [], []
    for group in groups:
        table = group.table
        if table is None or group.key[0] != "cpu":
            kept.append(group)
            continue
        lo, hi, rows = table.entry_bounds()
        # An entry's span [lo, hi) meets a rest span if some rest span that
        # starts before hi ends after lo.
        k = numpy.searchsorted(rlo, hi, side="left") - 1
        hit = (k >= 0) & (rhi[numpy.maximum(k, 0)] > lo)
        bad = rows[hit.any(axis=1)]
        if not len(bad):
            kept.append(group)
            continue
        bad_set = set(bad.tolist())
        moved.extend(group.entries[i] for i in sorted(bad_set))
        entries = [e for i, e in enumerate(group.entries) if i not in bad_set]
        if entries:
            new = _Group(group.key, group.kind, entries, group.owned)
            if new.build_table():  # pragma: no cover - the same arrays passed before
                moved.extend(new.entries)
            else:
                kept.append(new)
    return kept, moved


def _apply_hooks(entries, hooks, rate):
    """Apply folded optimizer hooks to the parameters of ``entries`` as the optimizer
    calls them: the clipping scale on every gradient, then each hook on every
    parameter in turn, in the target's order (the order matters when
    gradients share memory, e.g. a parameter registered in two links)."""
    if rate is not None:
        from cynag.optimizer_hooks import _apply

        for _, _, param, _ in entries:
            g = param.grad
            if g is not None and param.array is not None:
                _apply(g, None, [("scale", rate)])
    for hook in hooks:
        for _, _, param, rule in entries:
            hook(rule, param)


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
