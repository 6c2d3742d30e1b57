"""The optimizer's step against the per-parameter path, step by step, bit for bit.

A hypothesis state machine drives two twin models -- one optimized with the
multi-tensor step (cynag/_multi_tensor.py: one native pass over the
parameter objects, the kernel's table), one with Chainer's per-parameter
loop (``use_multi_tensor(False)``) -- through random sequences of what
training code does between steps: gradients replaced by new arrays, by the
same arrays or by ``None``, shared between parameters, edited in place;
parameter arrays replaced (same and other shape or dtype); per-rule and
optimizer-wide hyperparameter changes (floats, ints, NumPy scalars); hooks
added and removed (optimizer-level and rule-level, folded or not); rules
enabled and disabled; parameters added later, lazily initialized;
``use_fp32_update``; static and dynamic loss scaling; contiguous mode;
checkpoint loads.  After every step the two models' arrays, gradients,
states, counters and loss scales must be identical, and an update that
raises must raise the same error in both and change no parameter, state
or counter.

The same machine runs on cynag's links, on duck-typed links and on
``chainer.Link`` models (in the Chainer 7.8.1 environment, see
``test_state_machine_on_chainer_links``).
"""
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import cynag
from cynag import optimizer_hooks as H
from cynag import serializers

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition,  # noqa: E402
                                 rule, run_state_machine_as_test)

DTYPES = [np.float32, np.float64, np.float16]
SHAPES = [(3,), (2, 3), (4,), (1,), ()]
N_START = 6
MAX_PARAMS = 10


class _CynagKind:
    name = "cynag"
    chain = cynag.Chain
    chainlist = cynag.ChainList

    @staticmethod
    def link():
        return cynag.Link()

    @staticmethod
    def param(array):
        return cynag.Parameter(array)

    @staticmethod
    def lazy_param(dtype):
        return cynag.Parameter(_Fill(dtype))

    @staticmethod
    def initialize(param, shape):
        param.initialize(shape)


class _Fill:
    """Deterministic initializer with a dtype (for lazily initialized parameters)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def __call__(self, array):
        array[...] = (np.arange(array.size, dtype=np.float64).reshape(array.shape) % 7 - 3) / 8


class _DuckParam:
    """A parameter class that is neither cynag's nor Chainer's."""

    def __init__(self, array):
        self.array = array
        self.grad = None
        self.update_rule = None
        self.name = None
        self._loss_scale = None
        self._init = None

    data = property(lambda self: self.array)

    def update(self):
        if self.update_rule is not None:
            self.update_rule.update(self)

    def cleargrad(self):
        self.grad = None

    def initialize(self, shape):
        self.array = np.empty(shape, self._init.dtype)
        self._init(self.array)
        self.grad = None

    @property
    def dtype(self):
        if self.array is not None:
            return self.array.dtype
        return self._init.dtype


class _DuckLink:
    def __init__(self):
        self._params = {}

    def add(self, name, param):
        param.name = name
        self._params[name] = param

    def params(self, include_uninit=True):
        for name in sorted(self._params):
            p = self._params[name]
            if include_uninit or p.array is not None:
                yield p

    def namedparams(self, include_uninit=True):
        for name in sorted(self._params):
            p = self._params[name]
            if include_uninit or p.array is not None:
                yield "/" + name, p

    def cleargrads(self):
        for p in self.params():
            p.cleargrad()

    def serialize(self, serializer):
        pass


class _DuckKind:
    name = "duck"
    chain = chainlist = None  # (flat models only)

    @staticmethod
    def link():
        return _DuckLink()

    @staticmethod
    def param(array):
        return _DuckParam(array)

    @staticmethod
    def lazy_param(dtype):
        p = _DuckParam(None)
        p._init = _Fill(dtype)
        return p

    @staticmethod
    def initialize(param, shape):
        param.initialize(shape)


def _chainer_kind():
    try:
        import chainer
    except Exception:
        return None

    class _ChainerKind:
        name = "chainer"
        chain = chainer.Chain
        chainlist = chainer.ChainList

        @staticmethod
        def link():
            return chainer.Link()

        @staticmethod
        def param(array):
            return chainer.Parameter(array)

        @staticmethod
        def lazy_param(dtype):
            return chainer.Parameter(_Fill(dtype))

        @staticmethod
        def initialize(param, shape):
            param.initialize(shape)

    return _ChainerKind


KINDS = {"cynag": _CynagKind, "duck": _DuckKind, "chainer": _chainer_kind()}


def _register(kind, link, name, param):
    if kind.name == "duck":
        link.add(name, param)
    else:
        with link.init_scope():
            setattr(link, name, param)


def _copy(a):
    return None if a is None else np.array(a, copy=True)


def _snapshot(link, opt):
    """Everything a step can change, as plain values."""
    params = {}
    for path, p in link.namedparams():
        rule = getattr(p, "update_rule", None)
        try:
            grad = p.grad
        except RuntimeError:  # Chainer: a gradient that was never set
            grad = "unset"
        params[path] = {
            "array": _copy(p.array),
            "grad": grad if isinstance(grad, str) else _copy(grad),
            "t": None if rule is None else rule.t,
            "state": None if rule is None or rule.state is None else
            {k: _copy(v) for k, v in rule.state.items()},
            "master": None if rule is None or rule._fp32_param is None else
            _copy(rule._fp32_param.array),
        }
    return {"t": opt.t, "epoch": opt.epoch, "loss_scale": opt._loss_scale, "params": params}


def _same(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _same(a[k], b[k], "%s/%s" % (where, k))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), "%s differs:\n%r\n%r" % (where, a, b)
    else:
        assert a == b or (a != a and b != b), "%s: %r != %r" % (where, a, b)


def step_machine(kind):
    """The state machine class for models of ``kind``."""

    class StepMachine(RuleBasedStateMachine):

        @initialize(seed=st.integers(0, 2 ** 16), contiguous=st.booleans(),
                    dtypes=st.lists(st.sampled_from(DTYPES), min_size=N_START,
                                    max_size=N_START),
                    shapes=st.lists(st.sampled_from(SHAPES), min_size=N_START,
                                    max_size=N_START),
                    share=st.booleans(),
                    layout=st.sampled_from(["flat", "chain", "chainlist"]))
        def start(self, seed, contiguous, dtypes, shapes, share, layout):
            self.rng = np.random.default_rng(seed)
            self.n_names = 0
            self.models = []
            self.leaves = []  # by model: the links parameters are added to
            if kind.chain is None:
                layout = "flat"
            self.layout = layout
            arrays = [(self.rng.standard_normal(s) / 2).astype(d) for s, d in zip(shapes, dtypes)]
            for multi in (True, False):
                link, leaves = self.make_model(layout)
                made = []
                for i, a in enumerate(arrays):
                    # Two parameters may hold one array (each update applies to it).
                    a = made[0] if (share and i == 1 and arrays[1].shape == arrays[0].shape
                                    and arrays[1].dtype == arrays[0].dtype) else np.array(a)
                    made.append(a)
                    _register(kind, leaves[i % len(leaves)], "p%d" % i, kind.param(a))
                opt = cynag.optimizers.NesterovAG(lr=0.05, momentum=0.9)
                opt.setup(link, contiguous=contiguous)
                opt.use_multi_tensor(multi)
                self.models.append((link, opt))
                self.leaves.append(leaves)
            self.n_names = N_START
            self.n_children = 2
            self.steps = 0

        # -- helpers -----------------------------------------------------------
        def make_model(self, layout):
            """The target and its links that hold parameters: one link, or a
            Chain/ChainList with parameters of its own and two child links."""
            if layout == "flat":
                link = kind.link()
                return link, [link]
            children = [kind.link(), kind.link()]
            if layout == "chain":
                root = kind.chain()
                with root.init_scope():
                    root.c0, root.c1 = children
            else:
                root = kind.chainlist()
                for c in children:
                    root.add_link(c)
            return root, [root] + children

        def owner(self, link, path):
            """The link that holds the parameter at ``path``, and its name there."""
            parts = path.split("/")[1:]
            for part in parts[:-1]:
                link = link[int(part)] if self.layout == "chainlist" else getattr(link, part)
            return link, parts[-1]

        def params(self, k):
            return [p for _, p in self.models[k][0].namedparams()]

        def each(self, fn):
            """Apply ``fn(link, opt, params, k)`` to both models; same outcome."""
            outcomes = []
            for k, (link, opt) in enumerate(self.models):
                try:
                    fn(link, opt, self.params(k), k)
                    outcomes.append(None)
                except Exception as e:  # e.g. Chainer refusing a gradient
                    outcomes.append((type(e), str(e)))
            assert outcomes[0] == outcomes[1], outcomes

        def check(self, where):
            a = _snapshot(*self.models[0])
            b = _snapshot(*self.models[1])
            _same(a, b, where)

        # -- gradients ---------------------------------------------------------
        @rule(seed=st.integers(0, 2 ** 16), p_none=st.sampled_from([0.0, 0.2]),
              special=st.booleans())
        def new_grads(self, seed, p_none, special):
            def fn(link, opt, params, k):
                rng = np.random.default_rng(seed)
                for p in params:
                    if p.array is None:
                        continue
                    if rng.random() < p_none:
                        p.cleargrad()
                        continue
                    g = (rng.standard_normal(p.array.shape)).astype(p.array.dtype)
                    if special and g.size and rng.random() < 0.3:
                        g.reshape(-1)[0] = np.inf
                    p.grad = g
            self.each(fn)
            self.update(seed)

        @rule()
        def same_grads(self):
            def fn(link, opt, params, k):
                for p in params:
                    if p.array is not None and p.grad is not None:
                        p.grad = p.grad
            self.each(fn)
            self.update(0)

        @rule(i=st.integers(0, MAX_PARAMS), j=st.integers(0, MAX_PARAMS))
        def share_grad(self, i, j):
            def fn(link, opt, params, k):
                a, b = params[i % len(params)], params[j % len(params)]
                if a.array is not None and b.array is not None:
                    b.grad = a.grad
            self.each(fn)
            self.update(i)

        @rule(i=st.integers(0, MAX_PARAMS), factor=st.sampled_from([0.5, -2.0]),
              which=st.sampled_from(["grad", "array"]))
        def edit_in_place(self, i, factor, which):
            def fn(link, opt, params, k):
                p = params[i % len(params)]
                a = getattr(p, which) if p.array is not None else None
                if a is not None:
                    a *= a.dtype.type(factor)
            self.each(fn)
            self.update(i)

        # -- arrays ------------------------------------------------------------
        @rule(i=st.integers(0, MAX_PARAMS),
              how=st.sampled_from(["same", "copy", "dtype", "shape", "readonly",
                                   "strided"]))
        def replace_array(self, i, how):
            def fn(link, opt, params, k):
                p = params[i % len(params)]
                a = p.array
                if a is None:
                    return
                if how == "same":
                    new = a
                elif how == "copy":
                    new = a.copy()
                elif how == "dtype":
                    new = a.astype(np.float64 if a.dtype != np.float64 else np.float32)
                elif how == "shape":
                    new = np.concatenate([a.reshape(-1), a.reshape(-1)]).astype(a.dtype)
                elif how == "readonly":
                    new = a.copy()
                    new.flags.writeable = False
                elif a.ndim == 1:
                    buf = np.zeros(2 * a.size, a.dtype)
                    buf[::2] = a
                    new = buf[::2]  # not contiguous: the rule's own path
                else:
                    new = np.asfortranarray(a)
                p.array = new
                if how in ("dtype", "shape") and p.update_rule is not None:
                    p.update_rule._state = None  # its v no longer fits: start again
                    p.update_rule._fp32_param = None
            self.each(fn)

        # -- hyperparameters ---------------------------------------------------
        @rule(i=st.one_of(st.none(), st.integers(0, MAX_PARAMS)),
              name=st.sampled_from(["lr", "momentum"]),
              value=st.sampled_from([0.01, 0.1, 0.5, 1, np.float32(0.05), 1e39, 0.9]))
        def hyperparameter(self, i, name, value):
            def fn(link, opt, params, k):
                if i is None:
                    setattr(opt, name, value)
                else:
                    rule_ = params[i % len(params)].update_rule
                    if rule_ is not None:
                        setattr(rule_.hyperparam, name, value)
            self.each(fn)

        @rule(i=st.integers(0, MAX_PARAMS), name=st.sampled_from(["lr", "momentum"]))
        def drop_override(self, i, name):
            def fn(link, opt, params, k):
                rule_ = params[i % len(params)].update_rule
                if rule_ is not None and name in rule_.hyperparam.__dict__:
                    delattr(rule_.hyperparam, name)
            self.each(fn)

        # -- hooks -------------------------------------------------------------
        @rule(hook=st.sampled_from(["wd", "lasso", "hard", "clip", "noise", "lars", "plain"]),
              timing=st.sampled_from(["pre", "post", "auto"]))
        def add_hook(self, hook, timing):
            def fn(link, opt, params, k):
                h = {"wd": lambda: H.WeightDecay(0.01), "lasso": lambda: H.Lasso(0.001),
                     "hard": lambda: H.GradientHardClipping(-0.5, 0.5),
                     "clip": lambda: H.GradientClipping(1.0),
                     "noise": lambda: H.GradientNoise(0.01),
                     "lars": lambda: H.GradientLARS(),
                     "plain": lambda: _halve}[hook]()
                name = "%s_%d" % (hook, self.steps)
                if name not in opt._hookable._pre_update_hooks and \
                        name not in opt._hookable._post_update_hooks:
                    opt.add_hook(h, name=name, timing=timing)
            self.each(fn)

        @rule(i=st.integers(0, MAX_PARAMS), hook=st.sampled_from(["wd", "hard", "plain"]))
        def add_rule_hook(self, i, hook):
            def fn(link, opt, params, k):
                rule_ = params[i % len(params)].update_rule
                if rule_ is None:
                    return
                h = {"wd": lambda: H.WeightDecay(0.5),
                     "hard": lambda: H.GradientHardClipping(-0.1, 0.1),
                     "plain": lambda: _rule_halve}[hook]()
                name = "%s_%d" % (hook, self.steps)
                if name not in rule_._hookable._pre_update_hooks:
                    rule_.add_hook(h, name=name)
            self.each(fn)

        @rule(i=st.one_of(st.none(), st.integers(0, MAX_PARAMS)))
        def remove_hook(self, i):
            def fn(link, opt, params, k):
                if i is None:
                    hookable = opt._hookable
                else:
                    rule_ = params[i % len(params)].update_rule
                    if rule_ is None:
                        return
                    hookable = rule_._hookable
                names = list(hookable._pre_update_hooks) + list(hookable._post_update_hooks)
                if names:
                    (opt if i is None else rule_).remove_hook(names[0])
            self.each(fn)

        # -- rules and parameters ----------------------------------------------
        @rule(i=st.integers(0, MAX_PARAMS), flag=st.booleans())
        def enable(self, i, flag):
            def fn(link, opt, params, k):
                rule_ = params[i % len(params)].update_rule
                if rule_ is not None:
                    rule_.enabled = flag
            self.each(fn)

        @precondition(lambda self: self.n_names < MAX_PARAMS)
        @rule(dtype=st.sampled_from(DTYPES), with_rule=st.booleans(), enabled=st.booleans())
        def add_lazy(self, dtype, with_rule, enabled):
            name = "p%d" % self.n_names
            self.n_names += 1

            def fn(link, opt, params, k):
                p = kind.lazy_param(dtype)
                leaves = self.leaves[k]
                _register(kind, leaves[self.n_names % len(leaves)], name, p)
                if with_rule:
                    p.update_rule = opt.create_update_rule()
                    p.update_rule.enabled = enabled
            self.each(fn)

        @rule(i=st.integers(0, MAX_PARAMS), shape=st.sampled_from(SHAPES))
        def initialize_lazy(self, i, shape):
            def fn(link, opt, params, k):
                p = params[i % len(params)]
                if p.array is None:
                    kind.initialize(p, shape)
                    if kind.name == "chainer":
                        p.cleargrad()
            self.each(fn)

        @precondition(lambda self: kind.chain is not None)
        @rule(i=st.integers(0, MAX_PARAMS))
        def remove_param(self, i):
            """A parameter deleted from its link (the link's name set changes)."""
            paths = [path for path, _ in self.models[0][0].namedparams()]
            if len(paths) < 2:
                return
            path = paths[i % len(paths)]

            def fn(link, opt, params, k):
                owner, name = self.owner(link, path)
                delattr(owner, name)
            self.each(fn)

        @precondition(lambda self: kind.chain is not None and self.layout != "flat")
        @rule(shape=st.sampled_from(SHAPES), remove=st.booleans())
        def child(self, shape, remove):
            """A child link added (with a parameter) or the last one removed."""
            name = "c%d" % self.n_children
            self.n_children += 1
            value = (self.rng.standard_normal(shape) / 2).astype(np.float32)

            def fn(link, opt, params, k):
                if remove:
                    if self.layout == "chain":
                        last = sorted(link._children)[-1]
                        delattr(link, last)
                    else:
                        del link[len(link) - 1]
                    return
                c = kind.link()
                _register(kind, c, "q", kind.param(np.array(value)))
                if self.layout == "chain":
                    with link.init_scope():
                        setattr(link, name, c)
                else:
                    link.add_link(c)
            self.each(fn)

        @rule()
        def fp32(self):
            self.each(lambda link, opt, params, k: opt.use_fp32_update())

        @rule(how=st.sampled_from(["static", "dynamic", "param"]),
              value=st.sampled_from([2.0, 8, 0.5, 1024.0]))
        def loss_scaling(self, how, value):
            def fn(link, opt, params, k):
                if how == "static":
                    opt.loss_scaling(scale=value)
                elif how == "dynamic":
                    opt.loss_scaling(interval=2)
                else:
                    # What a backward pass with loss_scale records on each parameter.
                    for p in params:
                        p._loss_scale = value
            self.each(fn)

        @rule()
        def checkpoint(self):
            buf = io.BytesIO()
            serializers.save_npz(buf, self.models[0][1])

            def fn(link, opt, params, k):
                buf.seek(0)
                serializers.load_npz(buf, opt)
            self.each(fn)

        # -- the step ----------------------------------------------------------
        @rule(seed=st.integers(0, 2 ** 16))
        def step(self, seed):
            self.update(seed)

        def update(self, seed):
            before = [_snapshot(*m) for m in self.models]
            outcomes = []
            for k, (link, opt) in enumerate(self.models):
                np.random.seed(seed)  # GradientNoise draws from numpy.random
                try:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore")
                        opt.update()
                    outcomes.append(None)
                except Exception as e:
                    outcomes.append((type(e), str(e)))
                    after = _snapshot(link, opt)
                    if _raised_by_post_hook(e):
                        continue  # after the update (as Chainer)
                    # All or nothing: no parameter, state or counter changed.
                    for path, p in after["params"].items():
                        old = before[k]["params"].get(path)
                        if old is not None:
                            _same({x: p[x] for x in ("array", "t", "state")},
                                  {x: old[x] for x in ("array", "t", "state")},
                                  "failed update changed %s" % path)
                    assert after["t"] == before[k]["t"]
            assert outcomes[0] == outcomes[1], outcomes
            self.steps += 1
            self.check("after step %d" % self.steps)

    return StepMachine


def _raised_by_post_hook(exc):
    """True if ``exc`` came out of a 'post' hook (the update had been applied)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "call_hooks" and frame.f_locals.get("timing") == "post":
            return True
        tb = tb.tb_next
    return False


def _halve(opt):
    """A plain optimizer hook (called once with the optimizer)."""
    for p in opt.target.params():
        if p.array is not None and p.grad is not None:
            p.grad *= p.grad.dtype.type(0.5)


_halve.timing = "pre"


def _rule_halve(rule, param):
    if param.grad is not None:
        param.grad *= param.grad.dtype.type(0.5)


def run_machine(kind_name, examples, steps):
    kind = KINDS[kind_name]
    run_state_machine_as_test(step_machine(kind), settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck)))


@pytest.mark.parametrize("kind_name", ["cynag", "duck"])
def test_step_matches_per_parameter_path(kind_name):
    run_machine(kind_name, examples=int(os.environ.get("CYNAG_MACHINE_EXAMPLES", "150")),
                steps=40)


@pytest.mark.chainer
def test_state_machine_on_chainer_links(chainer_python):
    """The same machine on ``chainer.Link`` models, in the Chainer 7.8.1 environment."""
    _ensure_hypothesis(chainer_python)
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import test_step_machine as m; "
            "m.run_machine('chainer', %d, 40)" % (here, int(os.environ.get(
                "CYNAG_MACHINE_EXAMPLES", "150"))))
    proc = subprocess.run([chainer_python, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=1500,
                          cwd=here)
    assert proc.returncode == 0, proc.stdout[-8000:]


def _ensure_hypothesis(python):
    import chainer_env

    if not chainer_env._python_ok(python, "import hypothesis, pytest"):
        chainer_env._run([python, "-m", "pip", "install", "hypothesis", "pytest"],
                         "installing hypothesis and pytest into the Chainer environment",
                         timeout=600)


if __name__ == "__main__":  # python tests/test_step_machine.py KIND [EXAMPLES]
    run_machine(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100, 40)
