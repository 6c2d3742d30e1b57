"""End-to-end training steps: ``python -m cynag.bench --e2e`` (and ``--e2e --torch``).

Times Chainer's own training loop -- ``StandardUpdater.update()`` on an
``L.Classifier`` (iterator, forward, backward, optimizer update) over
synthetic data from numpy -- once with Chainer's ``NesterovAG`` and once with
cynag's, on these models:

* ``mlp-wide``  -- 20 x Linear(256, 256) with relu, then Linear(256, 10); batch 64;
* ``mlp-deep``  -- 1000 x Linear(16, 16) with relu, then Linear(16, 10) (2002
  parameter arrays); batch 32;
* ``convnet``   -- three Convolution2D(3x3) with relu and 2x2 max pooling, then
  Linear(576, 128) and Linear(128, 10), on 1x28x28 inputs; batch 32.

Every run is its own process (this interpreter, ``-m cynag.bench_e2e
--worker``), so that the OpenMP threads of one optimizer (spinning after a
parallel region, per ``OMP_WAIT_POLICY``) never run beside the other; the
environment is passed on unchanged (the directory cynag is imported from is
put first on ``PYTHONPATH``, so that both import this cynag).  The pairs run
interleaved (Chainer, cynag, cynag, Chainer, ...); each process warms up, then
times every iteration, up to a number or (from a few iterations on) a time
budget; a run's figure is its median iteration.

``--e2e --torch`` runs PyTorch's loop instead (``zero_grad``, forward,
``CrossEntropyLoss``, backward, ``step``) on the same three models built with
``torch.nn``, with ``torch.optim.SGD(nesterov=True, fused=True)`` and with
``cynag.torch.NesterovAG`` (whose native reader is built before timing).

The optimizer's share of an iteration: the loss function handed to the
updater times the forward pass and the backward pass of the loss it returns;
``optimizer.update`` (which runs both, clears the gradients between them and
updates the parameters) is timed whole; its own part is the difference.
"""
import json
import os
import statistics
import subprocess
import sys
import time

#: name -> (description, batch size).  Run in this order.
MODELS = {
    "mlp-wide": ("20 x Linear(256, 256) + relu, Linear(256, 10)", 64),
    "mlp-deep": ("1000 x Linear(16, 16) + relu, Linear(16, 10)", 32),
    "convnet": ("3 x (Convolution2D 3x3 + relu + max pool 2), Linear(576, 128), "
                "Linear(128, 10); 1x28x28 inputs", 32),
}
OPTIMIZERS = ("chainer", "cynag")
LABELS = {"chainer": "chainer NesterovAG", "cynag": "cynag NesterovAG",
          "torch": "torch SGD fused", "cynag_torch": "cynag.torch NesterovAG"}
#: ``--e2e --torch``: PyTorch's training loop, its fused Nesterov SGD against cynag.torch.
TORCH_OPTIMIZERS = ("torch", "cynag_torch")
LR = 0.01
MOMENTUM = 0.9
#: Samples in the synthetic data set, in batches (the iterator repeats it).
DATA_BATCHES = 8
#: Timed iterations of a process stop at the requested number or, from this
#: many on, after the process's time budget (--quick: 3 s, else 10 s).
MIN_ITERATIONS = 5
#: Wall-clock limit of one worker process.
WORKER_TIMEOUT_S = 600


# ---------------------------------------------------------------------------
# Worker: one model, one optimizer, one process
# ---------------------------------------------------------------------------
def _build_model(chainer, name):
    import chainer.functions as F
    import chainer.links as L

    he = chainer.initializers.HeNormal()   # keeps 1000 relu layers away from subnormals

    class MLP(chainer.ChainList):
        def __init__(self, width, depth, n_in):
            super().__init__()
            for i in range(depth):
                self.append(L.Linear(n_in if i == 0 else width, width, initialW=he))
            self.append(L.Linear(width, 10, initialW=he))

        def forward(self, x):
            for layer in self[:-1]:
                x = F.relu(layer(x))
            return self[-1](x)

    class ConvNet(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.c1 = L.Convolution2D(1, 16, 3, pad=1, initialW=he)
                self.c2 = L.Convolution2D(16, 32, 3, pad=1, initialW=he)
                self.c3 = L.Convolution2D(32, 64, 3, pad=1, initialW=he)
                self.l1 = L.Linear(64 * 3 * 3, 128, initialW=he)
                self.l2 = L.Linear(128, 10, initialW=he)

        def forward(self, x):
            for conv in (self.c1, self.c2, self.c3):
                x = F.max_pooling_2d(F.relu(conv(x)), 2, cover_all=False)   # 28, 14, 7, 3
            return self.l2(F.relu(self.l1(x)))

    if name == "mlp-wide":
        return MLP(256, 20, 256), (256,)
    if name == "mlp-deep":
        return MLP(16, 1000, 16), (16,)
    return ConvNet(), (1, 28, 28)


class _Clock:
    """Seconds spent in the forward pass, the backward pass and optimizer.update."""

    def __init__(self):
        self.forward = self.backward = self.update = 0.0


def _timed_lossfun(model, clock):
    """A loss function for the updater that times the forward and the backward pass."""
    def lossfun(*args):
        t0 = time.perf_counter()
        loss = model(*args)
        clock.forward += time.perf_counter() - t0
        backward = loss.backward

        def timed_backward(*a, **k):
            t1 = time.perf_counter()
            backward(*a, **k)
            clock.backward += time.perf_counter() - t1
        loss.backward = timed_backward
        return loss
    return lossfun


def _timed_update(optimizer, clock):
    update = optimizer.update

    def timed_update(*args, **kwds):
        t0 = time.perf_counter()
        update(*args, **kwds)
        clock.update += time.perf_counter() - t0
    optimizer.update = timed_update


def worker(spec):
    """Run one model with one optimizer; the results as a dict."""
    import warnings

    import numpy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import chainer
        import chainer.links as L

    import cynag

    name, which = spec["model"], spec["optimizer"]
    numpy.random.seed(spec.get("seed", 0))
    net, in_shape = _build_model(chainer, name)
    model = L.Classifier(net)
    batch = MODELS[name][1]
    n = batch * DATA_BATCHES
    rng = numpy.random.default_rng(spec.get("seed", 0))
    x = rng.standard_normal((n,) + in_shape).astype(numpy.float32)
    t = rng.integers(0, 10, n).astype(numpy.int32)
    it = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x, t), batch,
                                          repeat=True, shuffle=True)
    if which == "chainer":
        opt = chainer.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
        opt.setup(model)
    else:
        opt = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(model)
    clock = _Clock()
    updater = chainer.training.updaters.StandardUpdater(
        it, opt, loss_func=_timed_lossfun(model, clock))
    _timed_update(opt, clock)

    for _ in range(spec["warmup"]):
        updater.update()

    def timed():
        f0, b0, u0 = clock.forward, clock.backward, clock.update
        t0 = time.perf_counter()
        updater.update()
        it_s = time.perf_counter() - t0
        f, b = clock.forward - f0, clock.backward - b0
        return it_s, f, b, clock.update - u0 - f - b

    times = _timed_iterations(timed, spec)
    return _result(spec, MODELS[name][1], [p.size for p in model.params()], times,
                   float(model.loss.array))


def _timed_iterations(timed, spec):
    """``timed()`` (-> iteration, forward, backward, optimizer seconds) up to
    ``spec['iterations']`` times or, from ``MIN_ITERATIONS`` on, the time budget."""
    times = []
    stop = time.perf_counter() + spec["max_s"]
    while len(times) < spec["iterations"] and (
            len(times) < min(spec["iterations"], MIN_ITERATIONS) or time.perf_counter() < stop):
        times.append(timed())
    return times


def _result(spec, batch, sizes, times, final_loss, **extra):
    """A worker's results as a dict."""
    import cynag
    from cynag.bench import thread_env

    res = {
        "model": spec["model"], "optimizer": spec["optimizer"], "batch": batch,
        "n_params": len(sizes), "elements": int(sum(sizes)),
        "iter_s": [x[0] for x in times], "forward_s": [x[1] for x in times],
        "backward_s": [x[2] for x in times], "optimizer_s": [x[3] for x in times],
        "final_loss": final_loss,
        "cynag_path": os.path.dirname(os.path.abspath(cynag.__file__)),
        "pid": os.getpid(), "env": thread_env(),
    }
    res.update(extra)
    return res


def _build_torch_model(torch, name):
    nn = torch.nn

    def mlp(width, depth, n_in):
        layers = []
        for i in range(depth):
            layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 10))
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
        return nn.Sequential(*layers)

    if name == "mlp-wide":
        return mlp(256, 20, 256), (256,)
    if name == "mlp-deep":
        return mlp(16, 1000, 16), (16,)
    layers = []
    for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10)]
    return nn.Sequential(*layers), (1, 28, 28)


def torch_worker(spec):
    """PyTorch's loop (zero_grad, forward, backward, step) on one model; results as a dict."""
    import itertools

    import numpy
    import torch

    name, which = spec["model"], spec["optimizer"]
    torch.manual_seed(spec.get("seed", 0))
    model, in_shape = _build_torch_model(torch, name)
    batch = MODELS[name][1]
    rng = numpy.random.default_rng(spec.get("seed", 0))
    n = batch * DATA_BATCHES
    x = torch.from_numpy(rng.standard_normal((n,) + in_shape).astype(numpy.float32))
    t = torch.from_numpy(rng.integers(0, 10, n).astype(numpy.int64))
    if which == "torch":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                              fused=True)
    else:
        import cynag.torch as cynag_torch

        opt = cynag_torch.NesterovAG(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def iteration(k):
        i = (k % DATA_BATCHES) * batch
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[i:i + batch]), t[i:i + batch])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        last[0] = loss
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2

    last = [None]
    for k in range(spec["warmup"]):
        iteration(k)
    reader = None
    if which == "cynag_torch":
        from cynag import _torch_native

        _torch_native.wait()  # the native reader, as after the first steps of a run
        reader = cynag_torch.native_status()
    counter = itertools.count(spec["warmup"])
    times = _timed_iterations(lambda: iteration(next(counter)), spec)
    return _result(spec, batch, [p.numel() for p in model.parameters()], times,
                   float(last[0].detach()), reader=reader)


# ---------------------------------------------------------------------------
# Parent: pairs of processes, interleaved
# ---------------------------------------------------------------------------
def _child_env():
    """os.environ as is, with this cynag's directory first on PYTHONPATH."""
    import cynag

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cynag.__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not paths or os.path.abspath(paths[0]) != root:
        env["PYTHONPATH"] = os.pathsep.join([root] + paths)
    return env


def run_worker(spec, env):
    """One worker process; its results, or raises RuntimeError with its output."""
    proc = subprocess.run([sys.executable, "-m", "cynag.bench_e2e", "--worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=WORKER_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError("the %s worker for %s exited with status %d:\n%s"
                           % (spec["optimizer"], spec["model"], proc.returncode,
                              (proc.stderr or proc.stdout)[-3000:]))
    return json.loads(lines[-1])


def _summary(runs):
    """Medians over runs of each run's median iteration (and its parts)."""
    med = statistics.median
    out = {}
    for key in ("iter_s", "forward_s", "backward_s", "optimizer_s"):
        out[key] = med(med(r[key]) for r in runs)
    out["optimizer_share"] = med(med(r["optimizer_s"]) / med(r["iter_s"]) for r in runs)
    return out


def run_model(name, pairs, iterations, max_s, warmup, env, progress, optimizers=OPTIMIZERS):
    """``pairs`` interleaved pairs of runs of one model; the model's results."""
    runs = {which: [] for which in optimizers}
    for r in range(pairs):
        order = optimizers if r % 2 == 0 else optimizers[::-1]
        for which in order:
            progress("[e2e %s] pair %d/%d: %s (own process)"
                     % (name, r + 1, pairs, LABELS[which]))
            runs[which].append(run_worker({"model": name, "optimizer": which,
                                           "iterations": iterations, "max_s": max_s,
                                           "warmup": warmup}, env))
    first = runs[optimizers[1]][0]
    res = {"name": name, "description": MODELS[name][0], "batch": first["batch"],
           "n_params": first["n_params"], "elements": first["elements"], "pairs": pairs,
           "iterations": min(len(r["iter_s"]) for w in optimizers for r in runs[w]),
           "warmup": warmup, "compared": list(optimizers),
           "optimizers": {w: _summary(runs[w]) for w in optimizers},
           "runs": runs}
    a, b = runs[optimizers[0]], runs[optimizers[1]]
    med = statistics.median
    res["ratio_iter"] = med(med(x["iter_s"]) / med(y["iter_s"]) for x, y in zip(a, b))
    res["ratio_optimizer"] = med(med(x["optimizer_s"]) / med(y["optimizer_s"])
                                 for x, y in zip(a, b))
    return res


def fmt_model(res, fmt_time, sig, out):
    w = out.write
    w("\n== e2e %s: %s; batch %d, %d parameter arrays, %s elements; %d pairs of processes, "
      ">= %d iterations each ==\n" % (res["name"], res["description"], res["batch"],
                                   res["n_params"], format(res["elements"], ","),
                                   res["pairs"], res["iterations"]))
    cols = "%-22s %10s %10s %10s %11s %7s  %s"
    hdr = cols % ("optimizer", "time/iter", "forward", "backward", "optimizer", "share",
                  "final loss (last run)")
    w(hdr + "\n" + "-" * len(hdr) + "\n")
    compared = res.get("compared", OPTIMIZERS)
    for which in compared:
        s = res["optimizers"][which]
        w(cols % (LABELS[which], fmt_time(s["iter_s"]), fmt_time(s["forward_s"]),
                  fmt_time(s["backward_s"]), fmt_time(s["optimizer_s"]),
                  "%.1f%%" % (100 * s["optimizer_share"]),
                  sig(res["runs"][which][-1]["final_loss"])) + "\n")
    w("%s / %s: time per iteration x%s, optimizer's own part x%s "
      "(> 1: cynag faster)\n" % (compared[0], compared[1], sig(res["ratio_iter"]),
                                 sig(res["ratio_optimizer"])))
    out.flush()


def main(args, env_info, fmt_time, sig, progress, json_default):
    """``python -m cynag.bench --e2e``: the models of ``args.cases``."""
    rounds = args.rounds or (3 if args.quick else 5)
    iterations = args.e2e_iterations or (20 if args.quick else 50)
    max_s = 3.0 if args.quick else 10.0
    warmup = 2 if args.quick else 3
    env = _child_env()
    print("\n".join(env_info["header"]))
    print("settings: %d pairs; per process %d warm-up iterations, then %d timed (fewer, "
          "but >= %d, past %g s); environment passed on as is%s"
          % (rounds, warmup, iterations, MIN_ITERATIONS, max_s,
             ", with " + " ".join("%s=%s" % kv for kv in sorted(env_info["machine"]["env"].items()))
             if env_info["machine"]["env"] else ""))
    use_torch = getattr(args, "torch", False)
    optimizers = TORCH_OPTIMIZERS if use_torch else OPTIMIZERS
    if use_torch:
        print("End to end: PyTorch's loop (zero_grad, forward, CrossEntropyLoss, backward, "
              "step) on the same models in torch.nn, synthetic data; lr=%g momentum=%g; "
              "torch.optim.SGD(nesterov=True, fused=True) against cynag.torch.NesterovAG "
              "(its native reader built before timing).\n"
              "Each run is its own process (%s); pairs interleaved; figures are medians over "
              "runs of each run's median iteration.  forward includes zero_grad and the "
              "loss; optimizer = step(); share = its part of an iteration."
              % (LR, MOMENTUM, sys.executable))
    else:
        print("End to end: chainer.training.updaters.StandardUpdater(SerialIterator, optimizer)"
              ".update() on L.Classifier(model), synthetic data; lr=%g momentum=%g.\n"
              "Each run is its own process (%s); pairs interleaved; figures are medians over "
              "runs of each run's median iteration.  optimizer = optimizer.update() minus the "
              "forward and backward passes it runs; share = its part of an iteration."
              % (LR, MOMENTUM, sys.executable))
    sys.stdout.flush()
    models, failures = [], {}
    for name in args.cases:
        try:
            res = run_model(name, rounds, iterations, max_s, warmup, env, progress, optimizers)
        except Exception as e:   # report and go on: a benchmark never fails the caller
            failures[name] = "%s: %s" % (type(e).__name__, e)
            print("\n== e2e %s: failed (%s) ==" % (name, failures[name]))
            continue
        models.append(res)
        fmt_model(res, fmt_time, sig, sys.stdout)
    paths = {r["cynag_path"] for m in models for w in m["compared"] for r in m["runs"][w]}
    if paths and paths != {env_info["machine"]["cynag_path"]}:
        print("WARNING: the workers imported cynag from %s, not %s"
              % (", ".join(sorted(paths)), env_info["machine"]["cynag_path"]))
    if args.json:
        results = {"tool": "cynag.bench", "format": 2, "mode": "e2e",
                   "started": env_info["started"], "argv": sys.argv[1:],
                   "machine": env_info["machine"],
                   "settings": {"pairs": rounds, "iterations": iterations, "max_s": max_s,
                                "min_iterations": MIN_ITERATIONS, "warmup": warmup,
                                "lr": LR, "momentum": MOMENTUM, "cases": args.cases},
                   "e2e": models, "failures": failures}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=json_default)
        progress("wrote %s" % args.json, final=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        print(json.dumps((torch_worker if job["optimizer"] in TORCH_OPTIMIZERS
                          else worker)(job)))
        sys.exit(0)
    sys.stderr.write("usage: python -m cynag.bench --e2e  (this module is its worker)\n")
    sys.exit(2)
