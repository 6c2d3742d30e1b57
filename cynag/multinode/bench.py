"""Time the gradient averaging of cynag.multinode: ``mpiexec -n 2 python -m cynag.multinode.bench``.

For three sets of gradients -- ResNet-50's 161 parameter shapes
(``cynag.bench.RESNET50_SHAPES``), 2000 tensors of 64 elements and one
tensor of 2**24 elements -- it times one ``multi_node_mean_grad`` call.
First the realistic rows, where the gradients are new arrays at every step
(a backward pass allocates them):

* ``cynag chainer.Link``: cynag's communicator on a ``chainer.Link`` (when
  ``import chainer`` works: run the command with the Chainer environment's
  interpreter);
* ``cynag Link``: the same on a ``cynag.Link``;
* ``ChainerMN naive``: ``chainermn.create_communicator('naive')`` on the
  same ``chainer.Link`` (when ``import chainermn`` works);

then the idealized rows, where the gradients stay the same arrays from one
step to the next (only their values change):

* ``cynag Link same grads``: a ``cynag.Link`` (gradients packed per bucket,
  large ones in place);
* ``cynag contiguous``: after ``opt.setup(link, contiguous=True)`` (the
  gradient buffer reduced in place);

and the references: ``Allreduce 1x``, one in-place ``MPI_Allreduce`` of all
the bytes at once, and ``Allreduce <size>``, the same bytes in buckets of
256 KiB to 16 MiB (communication only, no mean, no copies).  Replacing the
gradients is done before each timed call and not timed.

Every sample is the slowest rank's time (after a barrier); the variants are
interleaved in each round and the report gives medians over rounds and the
ratios.  Rank 0 prints; ``--json FILE`` writes every sample.
"""
import argparse
import json
import platform
import sys
import time

import numpy

CASES = ("small", "big", "resnet50")
BUCKETS = (256 << 10, 1 << 20, 4 << 20, 16 << 20)


def _shapes(case):
    if case == "small":
        return "2000 tensors of 64", [(64,)] * 2000
    if case == "big":
        return "1 tensor of 2**24", [(2 ** 24,)]
    from cynag.bench import RESNET50_SHAPES

    return "ResNet-50 shapes (161)", list(RESNET50_SHAPES)


def _grads(shapes, dtype, seed):
    rng = numpy.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _cynag_link(shapes, dtype, grads):
    import cynag

    link = cynag.Link()
    with link.init_scope():
        for i, s in enumerate(shapes):
            setattr(link, "p%04d" % i, cynag.Parameter(numpy.zeros(s, dtype)))
    for p, g in zip(link.params(), grads):
        p.grad = g.copy()
    return link


def _variants(case, dtype, comm, mpi_comm, MPI, with_chainer):
    """``[(name, prepare, run)]`` for one case; ``prepare`` runs untimed before ``run``."""
    import cynag

    _, shapes = _shapes(case)
    grads = _grads(shapes, dtype, seed=comm.rank)
    out = []

    sets = [[g.copy() for g in grads], [g.copy() for g in grads]]

    def replacing(params):
        """Before each call: every gradient a new array (alternating between two sets)."""
        state = {"k": 0}

        def prepare():
            state["k"] ^= 1
            for p, g in zip(params, sets[state["k"]]):
                p.grad = g
        return prepare

    clink = None
    if with_chainer is not None:
        chainer = with_chainer[0]
        clink = chainer.Link()
        with clink.init_scope():
            for i, s in enumerate(shapes):
                setattr(clink, "p%04d" % i, chainer.Parameter(numpy.zeros(s, dtype)))
        cparams = [p for _, p in sorted(clink.namedparams())]
        out.append(("cynag chainer.Link", replacing(cparams),
                    lambda: comm.multi_node_mean_grad(clink)))

    link2 = _cynag_link(shapes, dtype, grads)
    params2 = [p for _, p in sorted(link2.namedparams())]
    out.append(("cynag Link", replacing(params2), lambda: comm.multi_node_mean_grad(link2)))

    if clink is not None and with_chainer[1] is not None:
        cm = with_chainer[1].create_communicator("naive", mpi_comm=mpi_comm)
        out.append(("ChainerMN naive", replacing(cparams),
                    lambda: cm.multi_node_mean_grad(clink)))

    link = _cynag_link(shapes, dtype, grads)
    out.append(("cynag Link same grads", None, lambda: comm.multi_node_mean_grad(link)))

    link3 = _cynag_link(shapes, dtype, grads)
    cynag.optimizers.NesterovAG().setup(link3, contiguous=True)
    for p, g in zip(link3.params(), grads):
        p.grad = g
    out.append(("cynag contiguous", None, lambda: comm.multi_node_mean_grad(link3)))

    total = sum(int(numpy.prod(s)) for s in shapes)
    flat = numpy.concatenate([g.ravel() for g in grads])
    out.append(("Allreduce 1x", None, lambda: mpi_comm.Allreduce(MPI.IN_PLACE, flat)))
    for b in BUCKETS:
        n = max(1, b // flat.itemsize)
        if n >= total and b != BUCKETS[0]:
            continue

        def bucketed(n=n):
            for lo in range(0, total, n):
                mpi_comm.Allreduce(MPI.IN_PLACE, flat[lo:lo + n])
        out.append(("Allreduce %s" % _size(b), None, bucketed))
    return out, total * numpy.dtype(dtype).itemsize


def _size(b):
    return "%d MiB" % (b >> 20) if b >= 1 << 20 else "%d KiB" % (b >> 10)


def _time(mpi_comm, MPI, prepare, run, reps):
    """Slowest rank's seconds per call over ``reps`` calls."""
    total = 0.0
    for _ in range(reps):
        if prepare is not None:
            prepare()
        mpi_comm.Barrier()
        t0 = time.perf_counter()
        run()
        total += time.perf_counter() - t0
    return mpi_comm.allreduce(total / reps, op=MPI.MAX)


def _fmt(s):
    if s >= 1e-3:
        return "%.2f ms" % (s * 1e3)
    return "%.0f us" % (s * 1e6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated among %s" % ", ".join(CASES))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-sample", type=float, default=0.02,
                   help="seconds per sample at least (calls are repeated)")
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="cynag's bucket size (default: the communicator's)")
    p.add_argument("--direct-min-bytes", type=int, default=None,
                   help="cynag's threshold for reducing a gradient in place (default: the "
                        "communicator's)")
    p.add_argument("--no-chainermn", action="store_true",
                   help="leave out the chainer.Link and ChainerMN rows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import cynag.multinode as mn
    from mpi4py import MPI

    mpi_comm = MPI.COMM_WORLD
    comm = mn.create_communicator("naive", mpi_comm=mpi_comm, bucket_bytes=args.bucket_bytes,
                                  direct_min_bytes=args.direct_min_bytes)
    rank = comm.rank
    with_chainer = None
    note = ""
    if not args.no_chainermn:
        try:
            import chainer
        except Exception as e:  # noqa: BLE001 - any failure to import means: not here
            note = "chainer not importable here (%s: %s): no chainer.Link rows" % (
                type(e).__name__, e)
        else:
            try:
                import chainermn
            except Exception as e:  # noqa: BLE001
                chainermn = None
                note = "ChainerMN not importable here (%s: %s)" % (type(e).__name__, e)
            with_chainer = (chainer, chainermn)
    dtype = numpy.dtype(args.dtype)
    report = {"size": comm.size, "dtype": dtype.name, "bucket_bytes": comm.bucket_bytes,
              "direct_min_bytes": comm.direct_min_bytes, "machine": platform.machine(),
              "python": platform.python_version(), "numpy": numpy.__version__,
              "mpi": MPI.Get_library_version().splitlines()[0], "cases": {}}
    if rank == 0:
        print("cynag.multinode gradient averaging: %d processes, %s, bucket %s, %s"
              % (comm.size, dtype.name, _size(comm.bucket_bytes), report["mpi"]))
        if note:
            print(note)
        sys.stdout.flush()
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            raise SystemExit("unknown case %r" % case)
        title, _ = _shapes(case)
        variants, nbytes = _variants(case, dtype, comm, mpi_comm, MPI, with_chainer)
        reps = {}
        for name, prepare, run in variants:  # warm up, and calls per sample
            t = _time(mpi_comm, MPI, prepare, run, 1)
            t = _time(mpi_comm, MPI, prepare, run, 1)
            reps[name] = max(1, min(1000, int(args.min_sample / max(t, 1e-7))))
        samples = {name: [] for name, _, _ in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, prepare, run in order:
                samples[name].append(_time(mpi_comm, MPI, prepare, run, reps[name]))
        med = {k: float(numpy.median(v)) for k, v in samples.items()}
        bucketed = {k: v for k, v in med.items() if k.startswith("Allreduce ") and
                    k != "Allreduce 1x"}
        best_b = min(bucketed, key=bucketed.get) if bucketed else None
        ratios = {}
        for name in med:
            if name.startswith("cynag"):
                r = {"vs Allreduce 1x": med[name] / med["Allreduce 1x"]}
                if best_b:
                    r["vs best bucketed"] = med[name] / med[best_b]
                if "ChainerMN naive" in med:
                    r["speedup vs ChainerMN"] = med["ChainerMN naive"] / med[name]
                ratios[name] = r
        report["cases"][case] = {"title": title, "bytes": nbytes, "samples": samples,
                                 "median": med, "best_bucketed": best_b, "ratios": ratios,
                                 "reps": reps}
        if rank == 0:
            print("\n%s, %.1f MB, medians of %d rounds (slowest rank per sample):"
                  % (title, nbytes / 1e6, args.rounds))
            print("  %-22s %12s %10s %14s %12s" % ("variant", "time/call", "GB/s",
                                                   "x Allreduce 1x", "vs ChainerMN"))
            for name, t in med.items():
                extra = ""
                if name in ratios and "speedup vs ChainerMN" in ratios[name]:
                    extra = "%.1fx faster" % ratios[name]["speedup vs ChainerMN"]
                mark = " (best bucketed)" if name == best_b else ""
                if name == "cynag Link same grads":
                    print("  idealized: the same gradient arrays at every step")
                elif name == "Allreduce 1x":
                    print("  references: communication only")
                print("  %-22s %12s %10.2f %14.2f %12s%s" % (
                    name, _fmt(t), nbytes / t / 1e9, t / med["Allreduce 1x"], extra, mark))
            if best_b:
                print("  cynag / best bucketed Allreduce (%s): %s" % (best_b, ", ".join(
                    "%s %.2f" % (n, r["vs best bucketed"]) for n, r in ratios.items())))
            sys.stdout.flush()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
