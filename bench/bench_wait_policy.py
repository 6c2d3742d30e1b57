#!/usr/bin/env python
"""Cost of the wait of idle OpenMP threads (a benchmark, not a test).

libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when it is
loaded, so every setting runs in its own process; the processes of one round
run in a shuffled order and each case reports the median of its repeats.
The table gives, per case, the median and the minimum over the rounds.

Settings: cynag's default (``OMP_WAIT_POLICY=passive``, see
``cynag_kernels/_wait_policy.py``), ``GOMP_SPINCOUNT`` 1000 / 10000 / 300000
(libgomp's own default), ``OMP_WAIT_POLICY=active``, and libgomp loaded
before cynag (cynag's default thread count is then one).

Cases: the raw kernel on 2**22 and 2**16 float32 elements (2 threads),
back to back and after 2 ms of idling; ``update()`` of 2000 parameters of
64 elements plus one of 2**22; the per-parameter path over 8 parameters of
2**18 (8 parallel regions per update); a training step of 20
Linear(256, 256) layers, batch 64 (forward and backward with NumPy's BLAS,
then ``update()``), and the same step without the update.

Run from the repository root after an in-place build::

    PYTHONPATH=$PWD python bench/bench_wait_policy.py [ROUNDS]
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time

SETTINGS = [
    ("cynag default (passive)", {}),
    ("spin 1000", {"GOMP_SPINCOUNT": "1000"}),
    ("spin 10000", {"GOMP_SPINCOUNT": "10000"}),
    ("spin 300000 (libgomp default)", {"GOMP_SPINCOUNT": "300000"}),
    ("active", {"OMP_WAIT_POLICY": "active"}),
    ("libgomp loaded first (1 thread)", {"BENCH_PRELOAD": "1"}),
]
if os.environ.get("BENCH_SETTINGS"):  # comma-separated names: a subset
    keep = os.environ["BENCH_SETTINGS"].split(",")
    SETTINGS = [s for s in SETTINGS if s[0] in keep]


def med(f, reps, gap=0.0):
    ts = []
    for _ in range(reps):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def worker():
    import ctypes
    import numpy as np
    if os.environ.get("BENCH_PRELOAD"):
        ctypes.CDLL("libgomp.so.1")
    import cynag, cynag_kernels as K
    if not os.environ.get("BENCH_PRELOAD"):
        K.set_num_threads(2)
    assert K.get_num_threads() == (1 if os.environ.get("BENCH_PRELOAD") else 2)
    out = {}
    for n, reps in ((1 << 22, 16), (1 << 16, 100)):
        p = np.ones(n, np.float32); g = np.full(n, 1e-3, np.float32); v = np.zeros(n, np.float32)
        f = lambda: K.nesterov_ag_cpu(p, g, v, 0.01, 0.9)
        f()
        out["kernel 2**%d back-to-back" % (n.bit_length() - 1)] = med(f, reps)
        out["kernel 2**%d after 2 ms idle" % (n.bit_length() - 1)] = med(f, reps // 2, gap=0.002)
    # update(): 2000 params of 64 + one of 2**22
    link = cynag.Link()
    with link.init_scope():
        for i in range(2000):
            setattr(link, "p%d" % i, cynag.Parameter(np.ones(64, np.float32)))
        link.big = cynag.Parameter(np.ones(1 << 22, np.float32))
    for prm in link.params():
        prm.grad = np.full(prm.array.shape, 1e-3, np.float32)
    opt = cynag.optimizers.NesterovAG(lr=0.01, momentum=0.9); opt.setup(link)
    opt.update()
    out["update() 2000x64 + 2**22"] = med(opt.update, 9)
    # per-parameter path: 8 regions per update, Python in between
    link3 = cynag.Link()
    with link3.init_scope():
        for i in range(8):
            setattr(link3, "q%d" % i, cynag.Parameter(np.ones(1 << 18, np.float32)))
    for prm in link3.params():
        prm.grad = np.full(prm.array.shape, 1e-3, np.float32)
    opt3 = cynag.optimizers.NesterovAG(lr=0.01, momentum=0.9); opt3.setup(link3)
    opt3.use_multi_tensor(False)
    opt3.update()
    out["update() per-param 8x2**18 (8 regions)"] = med(opt3.update, 25)
    # end to end: 20 Linear(256,256), batch 64, fwd + bwd with NumPy BLAS, then update
    rng = np.random.default_rng(0)
    net = cynag.Link()
    with net.init_scope():
        for i in range(20):
            setattr(net, "W%d" % i, cynag.Parameter(rng.standard_normal((256, 256), np.float32) * 0.05))
            setattr(net, "b%d" % i, cynag.Parameter(np.zeros(256, np.float32)))
    Ws = [getattr(net, "W%d" % i) for i in range(20)]; bs = [getattr(net, "b%d" % i) for i in range(20)]
    opt2 = cynag.optimizers.NesterovAG(lr=1e-4, momentum=0.9); opt2.setup(net)
    x = rng.standard_normal((64, 256), np.float32)
    def step():
        hs = [x]
        for W, b in zip(Ws, bs):
            hs.append(hs[-1] @ W.array + b.array)
        gy = np.ones_like(hs[-1]) * 1e-3
        for i in range(19, -1, -1):
            Ws[i].grad = hs[i].T @ gy
            bs[i].grad = gy.sum(0)
            gy = gy @ Ws[i].array.T
        opt2.update()
    step()
    out["train step 20x Linear(256,256) b64"] = med(step, 25)
    def blas_only():
        hs = [x]
        for W, b in zip(Ws, bs):
            hs.append(hs[-1] @ W.array + b.array)
        gy = np.ones_like(hs[-1]) * 1e-3
        for i in range(19, -1, -1):
            Ws[i].grad = hs[i].T @ gy
            bs[i].grad = gy.sum(0)
            gy = gy @ Ws[i].array.T
    out["  of which fwd+bwd only (no update)"] = med(blas_only, 25)
    print(json.dumps(out))


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    res = {}
    rng = random.Random(1)
    for r in range(rounds):
        order = list(SETTINGS); rng.shuffle(order)
        for name, env in order:
            e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "BENCH_PRELOAD")}
            e.update(env)
            o = subprocess.run([sys.executable, __file__, "worker"], env=e, capture_output=True, text=True)
            if o.returncode:
                print(o.stderr); sys.exit(1)
            for k, v in json.loads(o.stdout).items():
                res.setdefault(k, {}).setdefault(name, []).append(v)
    names = [s[0] for s in SETTINGS]
    print("ms, median of %d rounds (each round: one process per setting)" % rounds)
    for agg in ("median", "min"):
        print("\n%s over rounds of the per-process medians" % agg)
        print("| case | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        f = statistics.median if agg == "median" else min
        for k, d in res.items():
            print("| %s | " % k + " | ".join("%.3f" % f(d[n]) for n in names) + " |")


if __name__ == "__main__":
    worker() if sys.argv[1:] == ["worker"] else main()
