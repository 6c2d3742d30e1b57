"""Cases of tests/test_multinode.py, run by every process of ``mpiexec -n N``.

Usage: ``mpiexec -n N python tests/mpi_cases.py CASE [CASE ...]``.  Each case
runs on every rank and prints ``CASE <name> OK rank <r>`` when it passed
there.  A failing assertion is an uncaught exception: the global except hook
then aborts the whole job (so a failure never leaves the other ranks
waiting), and the test sees a non-zero exit status and the traceback.

Cases that need Chainer (``chainermn_*``) run in the Chainer environment.
"""
import ctypes
import os
import sys
import time
import types

import numpy

import cynag
import cynag.multinode as mn
from cynag.multinode import global_except_hook

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


# ---------------------------------------------------------------------------
# Expected results, computed in-process from every rank's arrays
# ---------------------------------------------------------------------------
def chainermn_mean(arrays, exact=True):
    """ChainerMN's naive mean of one gradient from its per-rank values.

    Sum in float32 for float16 (then rounded to float16), in the dtype
    otherwise, in rank order; then ``*= 1.0 / size`` as NumPy 1.x computes it
    (the dtype for arrays of at least one dimension, float64 for 0-d).
    """
    size = len(arrays)
    dtype = arrays[0].dtype
    acc_t = numpy.float32 if dtype == numpy.float16 else dtype
    total = arrays[0].astype(acc_t)
    for a in arrays[1:]:
        total = total + a.astype(acc_t)
    total = total.astype(dtype)
    if total.ndim == 0:
        return numpy.asarray(numpy.float64(total) * (1.0 / size)).astype(dtype)
    return total * dtype.type(1.0 / size)


def assert_same(got, want, what, exact=True):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape,
                                                                 want.dtype, want.shape)
    if exact:
        ok = numpy.array_equal(numpy.ascontiguousarray(got).reshape(-1).view(numpy.uint8),
                               numpy.ascontiguousarray(want).reshape(-1).view(numpy.uint8))
    else:
        tol = 2e-3 if got.dtype == numpy.float16 else (
            2e-6 if got.dtype == numpy.float32 else 1e-14)
        ok = numpy.allclose(got.astype(numpy.float64), want.astype(numpy.float64), rtol=tol,
                            atol=tol)
    if not ok:
        diff = numpy.argwhere(got != want)[:5] if got.ndim else "scalar"
        raise AssertionError("%s differs: first differing indices %s; got %r want %r"
                             % (what, diff, got.ravel()[:8], want.ravel()[:8]))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
MEAN_SHAPES = [
    ("a/W", (3, 4), numpy.float32), ("a/b", (4,), numpy.float32), ("c", (), numpy.float64),
    ("d", (5, 3), numpy.float16), ("e", (0,), numpy.float32), ("f", (), numpy.float16),
    ("g", (), numpy.float32), ("big", (70000,), numpy.float32), ("big64", (40000,), numpy.float64),
    ("fortran", (6, 7), numpy.float32), ("strided", (4, 5), numpy.float64),
    ("h", (300,), numpy.float16),
]


def flat_link(specs, seed):
    """A cynag.Link with one parameter per ``(name, shape, dtype)``; names keep their '/'."""
    rng = numpy.random.default_rng(seed)
    root = cynag.Chain()
    for name, shape, dtype in specs:
        parts = name.split("/")
        link = root
        for p in parts[:-1]:
            if not hasattr(link, p):
                with link.init_scope():
                    setattr(link, p, cynag.Chain())
            link = getattr(link, p)
        with link.init_scope():
            setattr(link, parts[-1],
                    cynag.Parameter(numpy.asarray(rng.standard_normal(shape)).astype(dtype)))
    return root


def param(link, name):
    for p in name.split("/"):
        link = getattr(link, p)
    return link


def random_grads(link, specs, seed, layouts=True):
    rng = numpy.random.default_rng(seed)
    for name, shape, dtype in specs:
        g = numpy.asarray(rng.standard_normal(shape) * 3).astype(dtype)
        if layouts and name == "fortran":
            g = numpy.asfortranarray(g)
        elif layouts and name == "strided":
            big = numpy.zeros((shape[0], shape[1] * 2), dtype)
            big[:, ::2] = g
            g = big[:, ::2]
        param(link, name).grad = g


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
def _check_mean(comm, specs, contiguous, bucket, direct_min, exact):
    rank = comm.rank
    link = flat_link(specs, seed=0)
    if contiguous:
        cynag.optimizers.NesterovAG().setup(link, contiguous=True)
    comm.set_config("bucket_bytes", bucket)
    comm.set_config("direct_min_bytes", direct_min)
    for step in range(3):
        random_grads(link, specs, seed=100 * step + rank, layouts=not contiguous)
        before = {n: numpy.array(param(link, n).grad) for n, _, _ in specs}
        objs = {n: param(link, n).grad for n, _, _ in specs}
        everyone = comm.mpi_comm.allgather(before)
        comm.multi_node_mean_grad(link)
        for name, _, _ in specs:
            got = param(link, name).grad
            assert got is objs[name], "%s: the gradient array was replaced" % name
            want = chainermn_mean([e[name] for e in everyone])
            assert_same(numpy.asarray(got), want, "%s (step %d, contiguous=%s, bucket=%d)"
                        % (name, step, contiguous, bucket), exact)


@case
def mean_grads():
    """Every dtype, 0-d, empty, Fortran and strided gradients, several bucket sizes."""
    comm = mn.create_communicator("naive")
    exact = comm.size == 2
    for bucket, direct_min in [(4 << 20, 256 << 10), (256, 64), (100, 1 << 30), (8, 8)]:
        _check_mean(comm, MEAN_SHAPES, False, bucket, direct_min, exact)
    specs = [s for s in MEAN_SHAPES if s[0] not in ("fortran", "strided")]
    for bucket, direct_min in [(4 << 20, 256), (1000, 64), (4 << 20, 1 << 30)]:
        _check_mean(comm, specs, True, bucket, direct_min, exact)


@case
def mean_many_small():
    """2000 gradients of 64 elements, contiguous mode and not, against numpy's mean."""
    comm = mn.create_communicator("flat")
    specs = [("p%04d" % i, (64,), numpy.float32) for i in range(2000)]
    for contiguous in (False, True):
        _check_mean(comm, specs, contiguous, 4 << 20, 256 << 10, comm.size == 2)
    # the contiguous buffer is reduced in place, without the packing buffer
    link = flat_link(specs, 0)
    cynag.optimizers.NesterovAG().setup(link, contiguous=True)
    comm.set_config("direct_min_bytes", 1024)
    random_grads(link, specs, comm.rank)
    comm.multi_node_mean_grad(link)
    group = comm._layout(link).groups[0]
    seg = group.cache[("mean", True)]
    assert seg.total == 0 and len(seg.direct) == 1 and seg.direct[0][0] == "run", seg.direct
    assert ("mean", False) not in group.cache, "the ranks should agree on the run"
    # contiguous on rank 0 only: the ranks split differently and fall back to sizes
    for contiguous_here in (comm.rank == 0, comm.rank != 0):
        link = flat_link(specs[:50], 0)
        if contiguous_here:
            cynag.optimizers.NesterovAG().setup(link, contiguous=True)
        random_grads(link, specs[:50], comm.rank)
        everyone = comm.mpi_comm.allgather({n: param(link, n).grad.copy()
                                            for n, _, _ in specs[:50]})
        comm.multi_node_mean_grad(link)
        for name, _, _ in specs[:50]:
            assert_same(param(link, name).grad, chainermn_mean([e[name] for e in everyone]),
                        name, comm.size == 2)


@case
def mean_zero_fill():
    """zero_fill: None gradients as zeros (new arrays, or contiguous views); or skipped."""
    comm = mn.create_communicator("naive")
    specs = [("a", (3,), numpy.float32), ("b", (2, 2), numpy.float64), ("c", (5,), numpy.float32)]
    for contiguous in (False, True):
        link = flat_link(specs, 0)
        if contiguous:
            cynag.optimizers.NesterovAG().setup(link, contiguous=True)
        random_grads(link, specs, comm.rank)
        if comm.rank == 1:
            link.b.grad = None
        everyone = comm.mpi_comm.allgather(
            {n: (None if param(link, n).grad is None else param(link, n).grad.copy())
             for n, _, _ in specs})
        comm.multi_node_mean_grad(link, zero_fill=True)
        for name, shape, dtype in specs:
            vals = [e[name] if e[name] is not None else numpy.zeros(shape, dtype)
                    for e in everyone]
            assert_same(param(link, name).grad, chainermn_mean(vals), name, comm.size == 2)
        if contiguous and comm.rank == 1:
            assert link.b.grad is link.b._grad_view
        # None on every rank and zero_fill=False: skipped, left None
        random_grads(link, specs, comm.rank + 10)
        link.c.grad = None
        a_before = comm.mpi_comm.allgather(link.a.grad.copy())
        comm.multi_node_mean_grad(link, zero_fill=False)
        assert link.c.grad is None
        assert_same(link.a.grad, chainermn_mean(a_before), "a", comm.size == 2)


@case
def bcast():
    """bcast_data copies rank 0's values everywhere (all dtypes, packed and in place)."""
    comm = mn.create_communicator()
    specs = [s for s in MEAN_SHAPES] + [("i", (3,), numpy.int32)]
    for contiguous, bucket, direct_min in [(False, 4 << 20, 256 << 10), (False, 64, 16),
                                           (True, 4 << 20, 64), (True, 128, 1 << 30)]:
        link = flat_link(specs, seed=comm.rank)
        if contiguous:
            cynag.optimizers.NesterovAG().setup(link, contiguous=True)
        comm.set_config("bucket_bytes", bucket)
        comm.set_config("direct_min_bytes", direct_min)
        arrays = {n: param(link, n).array for n, _, _ in specs}
        mine = {n: a.copy() for n, a in arrays.items()}
        root = comm.mpi_comm.bcast(mine if comm.rank == 0 else None, root=0)
        comm.bcast_data(link)
        for name, _, _ in specs:
            assert param(link, name).array is arrays[name]
            assert_same(param(link, name).array, root[name], name)


def _linear_data(rank, dtype, n=16, din=5, dout=3):
    rng = numpy.random.default_rng(1000 + rank)
    x = rng.standard_normal((n, din)).astype(dtype)
    t = rng.standard_normal((n, dout)).astype(dtype)
    return x, t


class _Loss:
    """``backward`` computes the gradients of a linear model's squared error by hand."""

    def __init__(self, model, x, t, use_u):
        self.model, self.x, self.t, self.use_u = model, x, t, use_u

    def backward(self, loss_scale=None):
        m, x, t = self.model, self.x, self.t
        dtype = m.W.array.dtype
        r = (x @ m.W.array + m.b.array - t) / dtype.type(len(x))
        m.W.grad = (x.T @ r).astype(dtype)
        m.b.grad = r.sum(axis=0).astype(dtype)
        if self.use_u:
            m.u.grad = (m.u.array * dtype.type(0.5) + r.sum()).astype(dtype)


def _linear_model(dtype, seed):
    rng = numpy.random.default_rng(seed)
    m = cynag.Link()
    with m.init_scope():
        m.W = cynag.Parameter(rng.standard_normal((5, 3)).astype(dtype))
        m.b = cynag.Parameter(rng.standard_normal((3,)).astype(dtype))
        m.u = cynag.Parameter(rng.standard_normal((2,)).astype(dtype))
    return m


def _trajectory(comm, dtype, contiguous, zero_fill, steps=25):
    """Multi-node training vs an in-process reference, bit for bit after every step."""
    size, rank = comm.size, comm.rank
    model = _linear_model(dtype, seed=rank)          # differs per rank: the broadcast fixes it
    opt = mn.create_multi_node_optimizer(
        cynag.optimizers.NesterovAG(lr=0.05, momentum=0.9), comm, zero_fill=zero_fill)
    opt.setup(model, contiguous=contiguous)
    ref = _linear_model(dtype, seed=0)
    ref_opt = cynag.optimizers.NesterovAG(lr=0.05, momentum=0.9).setup(ref)
    data = [_linear_data(r, dtype) for r in range(size)]
    # rank 0 uses 'u' in every step, rank 1 only in even steps (zero_fill) or never
    use_u = [lambda s: True] + [
        (lambda s: s % 2 == 0) if zero_fill else (lambda s: False)] * (size - 1)
    if not zero_fill:
        use_u = [lambda s: False] * size
    x, t = data[rank]
    for step in range(steps):
        opt.update(lambda: _Loss(model, x, t, use_u[rank](step)))
        if step == 0:
            assert opt.t == 0, "the first update broadcasts instead of updating"
        else:
            grads = []
            for r in range(size):
                _Loss(ref, data[r][0], data[r][1], use_u[r](step)).backward()
                grads.append({n: (None if p.grad is None else p.grad.copy())
                              for n, p in ref.namedparams()})
                ref.cleargrads()
            for n, p in ref.namedparams():
                vals = [g[n] for g in grads]
                if all(v is None for v in vals):
                    p.grad = None
                    continue
                vals = [numpy.zeros(p.shape, dtype) if v is None else v for v in vals]
                p.grad = chainermn_mean(vals)
            ref_opt.update()
        for (n, p), (_, q) in zip(model.namedparams(), ref.namedparams()):
            assert_same(p.array, q.array, "%s after step %d (%s, contiguous=%s, zero_fill=%s)"
                        % (n, step, numpy.dtype(dtype).name, contiguous, zero_fill),
                        exact=size == 2)
    assert opt.t == steps - 1 and opt.actual_optimizer.t == steps - 1


@case
def trajectory():
    comm = mn.create_communicator("naive")
    for dtype in (numpy.float32, numpy.float64):
        for contiguous in (False, True):
            for zero_fill in (True, False):
                _trajectory(comm, dtype, contiguous, zero_fill)


@case
def mismatch():
    """Models that differ: the same clear error on every rank, at once."""
    comm = mn.create_communicator()
    rank = comm.rank
    t0 = time.time()
    specs = [("a", (3,), numpy.float32), ("b", (2, 2), numpy.float32), ("c", (4,), numpy.float32)]
    if rank == 1:
        specs = [("a", (3,), numpy.float32), ("b", (2, 3), numpy.float32),
                 ("c", (4,), numpy.float64)]
    link = flat_link(specs, 0)
    try:
        comm.bcast_data(link)
    except mn.ModelMismatchError as e:
        msg = str(e)
    else:
        raise AssertionError("no error for mismatched shapes")
    assert "first differing parameter '/b'" in msg and "(2, 2)" in msg and "(2, 3)" in msg, msg
    # a parameter missing on one rank
    specs2 = [("a", (3,), numpy.float32)] + ([("z", (1,), numpy.float32)] if rank == 0 else [])
    link2 = flat_link(specs2, 0)
    try:
        comm.bcast_data(link2)
    except mn.ModelMismatchError as e:
        assert "'/z'" in str(e) and "no such initialized parameter" in str(e), str(e)
    else:
        raise AssertionError("no error for a missing parameter")
    # one rank broadcasts while the other averages
    same = flat_link([("a", (3,), numpy.float32)], 0)
    random_grads(same, [("a", (3,), numpy.float32)], rank)
    try:
        if rank == 0:
            comm.bcast_data(same)
        else:
            comm.multi_node_mean_grad(same)
    except mn.ModelMismatchError as e:
        assert "different things" in str(e), str(e)
    else:
        raise AssertionError("no error for bcast against mean")
    # zero_fill=False with a gradient None on one rank only
    random_grads(same, [("a", (3,), numpy.float32)], rank)
    if rank == 1:
        same.a.grad = None
    try:
        comm.multi_node_mean_grad(same, zero_fill=False)
    except mn.ModelMismatchError as e:
        assert "'/a' has a gradient on rank" in str(e) and "but None on rank 1;" in str(e), str(e)
    else:
        raise AssertionError("no error for a gradient None on one rank")
    # a bad gradient on one rank: that rank's error there, MultiNodeError elsewhere
    random_grads(same, [("a", (3,), numpy.float32)], rank)
    if rank == 1:
        same.a.grad = numpy.zeros(3, numpy.float64)
    try:
        comm.multi_node_mean_grad(same)
    except TypeError as e:
        assert rank == 1 and "parameter '/a': grad has dtype float64" in str(e), str(e)
    except mn.MultiNodeError as e:
        assert rank != 1 and "rank 1: TypeError" in str(e), str(e)
    else:
        raise AssertionError("no error for a bad gradient")
    # settings changed on one rank only (other bucket sizes: other messages)
    big = flat_link([("a", (3000,), numpy.float32), ("b", (100000,), numpy.float32)], 0)
    for name, value in [("bucket_bytes", 4096), ("direct_min_bytes", 1 << 30)]:
        old = comm.get_config(name)
        if rank == 0:
            comm.set_config(name, value)
        random_grads(big, [("a", (3000,), numpy.float32), ("b", (100000,), numpy.float32)],
                     rank)
        try:
            comm.multi_node_mean_grad(big)
        except mn.ModelMismatchError as e:
            assert "communicator settings differ" in str(e) and name in str(e), str(e)
        else:
            raise AssertionError("no error for %s set on rank 0 only" % name)
        comm.set_config(name, old)
    # and the communicator still works afterwards
    random_grads(same, [("a", (3,), numpy.float32)], rank)
    comm.multi_node_mean_grad(same)
    assert time.time() - t0 < 30


@case
def pending_user_receive():
    """A receive the program posted on the communicator (any source, any tag)
    takes none of the averaging's messages."""
    comm = mn.create_communicator("naive")
    mpi = comm.mpi_comm
    from mpi4py import MPI

    specs = [("big", (300000,), numpy.float32), ("small", (64,), numpy.float32)]
    link = flat_link(specs, 0)
    box = numpy.zeros(1, numpy.int64)
    req = mpi.Irecv(box, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    random_grads(link, specs, comm.rank)
    before = {n: numpy.array(param(link, n).grad) for n, _, _ in specs}
    everyone = mpi.allgather(before)
    comm.multi_node_mean_grad(link)
    for name, _, _ in specs:
        assert_same(param(link, name).grad, chainermn_mean([e[name] for e in everyone]), name,
                    comm.size == 2)
    mpi.Send(numpy.array([comm.rank + 100], numpy.int64), dest=(comm.rank + 1) % comm.size,
             tag=5)
    req.Wait()
    assert int(box[0]) == (comm.rank - 1) % comm.size + 100


@case
def except_hook():
    """Rank 1 fails with the hook installed; rank 0 would wait forever in a barrier."""
    global_except_hook.add_hook()
    comm = world()
    if comm.rank == 1:
        time.sleep(0.2)
        raise RuntimeError("deliberate failure on rank 1")
    comm.Barrier()
    print("rank 0 passed the barrier: the job was not aborted", flush=True)


@case
def split_and_objects():
    comm = mn.create_communicator()
    assert comm.intra_size == comm.size and comm.inter_size == 1 and comm.inter_rank == 0
    assert comm.intra_rank == comm.rank
    assert comm.bcast_obj({"x": comm.rank} if comm.rank == 0 else None) == {"x": 0}
    big = comm.bcast_obj(list(range(1000)) if comm.rank == 0 else None, max_buf_len=100)
    assert big == list(range(1000))
    g = comm.gather_obj(comm.rank * 10)
    assert g == ([r * 10 for r in range(comm.size)] if comm.rank == 0 else None)
    assert comm.allreduce_obj(comm.rank + 1) == comm.size * (comm.size + 1) // 2
    sub = comm.split(comm.rank % 2, comm.rank)
    assert sub.size == len(range(comm.rank % 2, comm.size, 2))
    assert isinstance(sub, mn.MpiCommunicator) and sub.bucket_bytes == comm.bucket_bytes
    link = flat_link([("a", (4,), numpy.float32)], 0)
    random_grads(link, [("a", (4,), numpy.float32)], comm.rank)
    everyone = sub.mpi_comm.allgather(link.a.grad.copy())
    sub.multi_node_mean_grad(link)
    assert_same(link.a.grad, chainermn_mean(everyone), "a", sub.size <= 2)
    if comm.rank == 0:
        comm.send_obj("hello", dest=1, tag=3)
    elif comm.rank == 1:
        assert comm.recv_obj(0) == "hello"


# ---------------------------------------------------------------------------
# GPU path on an emulated CuPy and NCCL (host memory behind "device" pointers)
# ---------------------------------------------------------------------------
@case
def one_rank_differs():
    """What one rank alone gets wrong or does differently: the true mean, or an
    error on every rank that changes nothing (never a hang or a silent
    divergence)."""
    comm = mn.create_communicator()
    rank, size = comm.rank, comm.size
    # A Fortran-ordered (or transposed) gradient on one rank: averaged by
    # element, not by memory order.
    for shape in ((3, 4), (300, 300)):
        link = flat_link([("W", shape, numpy.float32)], 0)
        grads = [numpy.random.RandomState(r).randn(*shape).astype(numpy.float32)
                 for r in range(size)]
        g = grads[rank].copy()
        param(link, "W").grad = numpy.asfortranarray(g) if rank == 1 else g
        comm.multi_node_mean_grad(link)
        # (more than two ranks: large arrays are summed in a ring, in another order)
        assert_same(param(link, "W").grad, chainermn_mean(grads), "F-order mean %s" % (shape,),
                    exact=size == 2 or shape[0] < 100)
    # A gradient of the right size but another shape on one rank: refused on
    # every rank before anything changes.
    link = flat_link([("W", (4, 3), numpy.float32)], 0)
    g = numpy.full((4, 3), float(rank), numpy.float32)
    param(link, "W").grad = g.reshape(3, 4) if rank == 1 else g
    try:
        comm.multi_node_mean_grad(link)
    except (ValueError, mn.MultiNodeError) as e:
        assert (rank == 1) == isinstance(e, ValueError), e
        assert "grad has shape (3, 4)" in str(e), e
    else:
        raise AssertionError("no error for a grad of another shape on rank 1")
    assert param(link, "W").grad.tobytes() == g.reshape(param(link, "W").grad.shape).tobytes()
    # A read-only Fortran-order gradient on one rank: refused on every rank
    # before the average (its C-order copy could not be written back).
    link = flat_link([("W", (3, 4), numpy.float32)], 0)
    g = numpy.full((3, 4), float(rank), numpy.float32)
    if rank == 1:
        g = numpy.asfortranarray(g)
        g.flags.writeable = False
    param(link, "W").grad = g
    try:
        comm.multi_node_mean_grad(link)
    except (ValueError, mn.MultiNodeError) as e:
        assert "read-only" in str(e), e
    else:
        assert size == 1, "a read-only F-order gradient was averaged"
    assert (param(link, "W").grad == float(rank)).all()
    # An array that is not an array on one rank: every rank raises, none waits.
    link = flat_link([("W", (3,), numpy.float32)], 0)
    if rank == 1:
        link.W.array = [1.0, 2.0, 3.0]  # (cynag's Parameter takes it; the step refuses it)
    for op in (comm.bcast_data, comm.multi_node_mean_grad):
        try:
            op(link)
        except Exception as e:
            assert rank == 1 or isinstance(e, mn.MultiNodeError), e
        else:
            assert rank != 1 and size == 1, "no error"
    # A first update (the broadcast) refused on one rank: the next one broadcasts.
    link = flat_link([("W", (3,), numpy.float32), ("b", (2,), numpy.float32)], rank + 1)
    opt = mn.create_multi_node_optimizer(cynag.optimizers.NesterovAG(lr=0.1), comm)
    opt.setup(link)
    if rank == 1:
        param(link, "b").array.flags.writeable = False
    try:
        opt.update()
    except Exception:
        pass
    else:
        raise AssertionError("the broadcast into a read-only array was not refused")
    param(link, "b").array.flags.writeable = True
    opt.update()  # (the broadcast, again)
    ws = comm.mpi_comm.allgather(param(link, "W").array.copy())
    assert all(w.tobytes() == ws[0].tobytes() for w in ws), "copies differ after the retry"
    # bcast_obj with max_buf_len given on the root only (ChainerMN sends it).
    obj = list(range(2000)) if rank == 0 else None
    got = comm.bcast_obj(obj, max_buf_len=64) if rank == 0 else comm.bcast_obj(None)
    assert got == list(range(2000))
    # An integer parameter without a gradient: skipped, as ChainerMN skips it.
    link = flat_link([("W", (3,), numpy.float32)], 0)
    with link.init_scope():
        link.n = cynag.Parameter(numpy.arange(2, dtype=numpy.int32))
    param(link, "W").grad = numpy.full(3, float(rank), numpy.float32)
    comm.multi_node_mean_grad(link)
    assert param(link, "W").grad[0] == numpy.float32(sum(range(size)) / size)
    # finalize() leaves the communicator usable; a dropped model is not kept.
    comm.finalize()
    comm.multi_node_mean_grad(link)
    import gc
    import weakref
    ref = weakref.ref(link)
    del link, opt
    gc.collect()
    assert ref() is None, "the communicator keeps a dropped model alive"


def install_fake_cupy(with_nccl, log):
    """Install a minimal CuPy (arrays on the host) whose NCCL calls MPI on raw pointers."""
    from mpi4py import MPI

    class Mem:
        pass

    class MemoryPointer:
        def __init__(self, ptr, mem):
            self.ptr, self.mem = ptr, mem

    class Device:
        def __init__(self, id=0):
            self.id = int(id)

        def __enter__(self):
            log.append(("device", self.id))
            return self

        def __exit__(self, *a):
            return False

    class ndarray:
        def __init__(self, host, device=0, base=None):
            assert isinstance(host, numpy.ndarray)
            self._a = host
            self._dev = device
            self.base = base
            self._mem = base._mem if base is not None else Mem()

        def _view(self, host):
            return ndarray(host, self._dev, self.base if self.base is not None else self)

        shape = property(lambda self: self._a.shape)
        dtype = property(lambda self: self._a.dtype)
        size = property(lambda self: self._a.size)
        ndim = property(lambda self: self._a.ndim)
        nbytes = property(lambda self: self._a.nbytes)
        flags = property(lambda self: self._a.flags)
        device = property(lambda self: Device(self._dev))
        data = property(lambda self: MemoryPointer(self._a.__array_interface__["data"][0],
                                                   self._mem))

        def reshape(self, *shape):
            out = self._a.reshape(*shape)
            assert numpy.shares_memory(out, self._a) or out.size == 0
            return self._view(out)

        def __getitem__(self, idx):
            return self._view(self._a[idx])

        def __setitem__(self, idx, value):
            self._a[idx] = value._a if isinstance(value, ndarray) else value

        def __imul__(self, scalar):
            assert isinstance(scalar, numpy.generic) and scalar.dtype == self.dtype, scalar
            self._a *= scalar
            return self

        def astype(self, dtype):
            return ndarray(self._a.astype(dtype), self._dev)

        def fill(self, v):
            self._a.fill(v)

        def get(self):
            return self._a.copy()

        def set(self, host):
            self._a[...] = host

    ndarray.__module__ = "cupy"
    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray
    cupy.empty = lambda shape, dtype: ndarray(numpy.empty(shape, dtype))
    cupy.zeros_like = lambda a: ndarray(numpy.zeros_like(a._a), a._dev)
    cupy.ascontiguousarray = lambda a: ndarray(numpy.ascontiguousarray(a._a), a._dev)
    cupy.asnumpy = lambda a: a.get()

    def concatenate(arrays, out):
        log.append(("concatenate", len(arrays)))
        numpy.concatenate([a._a for a in arrays], out=out._a)
        return out

    cupy.concatenate = concatenate
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = Device
    stream = types.SimpleNamespace(ptr=1234, synchronize=lambda: None)
    cuda.get_current_stream = lambda: stream
    cupy.cuda = cuda
    sys.modules["cupy"] = cupy
    sys.modules["cupy.cuda"] = cuda
    if with_nccl:
        nccl = types.ModuleType("cupy.cuda.nccl")
        nccl.NCCL_FLOAT16, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 6, 7, 8, 0
        ctypes_of = {6: ctypes.c_uint16, 7: ctypes.c_float, 8: ctypes.c_double}
        np_of = {6: numpy.float16, 7: numpy.float32, 8: numpy.float64}
        nccl.get_unique_id = lambda: ("uid", os.getpid())

        class NcclCommunicator:
            def __init__(self, n, uid, rank):
                comm = MPI.COMM_WORLD
                assert n == comm.size and rank == comm.rank
                uids = comm.allgather(uid)
                assert all(u == uids[0] for u in uids), uids
                log.append(("nccl_init", n, rank))

            def _array(self, ptr, count, dtype):
                raw = (ctypes_of[dtype] * count).from_address(ptr)
                return numpy.frombuffer(raw, np_of[dtype])

            def allReduce(self, send, recv, count, dtype, op, stream):
                assert send == recv and op == nccl.NCCL_SUM and stream == 1234
                assert dtype in (7, 8), "float16 is summed as float32"
                log.append(("allReduce", count, dtype))
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, self._array(recv, count, dtype))

            def bcast(self, buff, count, dtype, root, stream):
                log.append(("bcast", count, dtype))
                MPI.COMM_WORLD.Bcast(self._array(buff, count, dtype), root=root)

        nccl.NcclCommunicator = NcclCommunicator
        cuda.nccl = nccl
        sys.modules["cupy.cuda.nccl"] = nccl
    else:
        sys.modules["cupy.cuda.nccl"] = None  # import fails
    return cupy


def _gpu(with_nccl):
    log = []
    cupy = install_fake_cupy(with_nccl, log)
    comm = mn.create_communicator()
    specs = [("a/W", (3, 4), numpy.float32), ("a/b", (4,), numpy.float32),
             ("c", (7,), numpy.float64), ("d", (5,), numpy.float16), ("s", (), numpy.float32)]
    # the same model on the host and on the "GPU"
    host = flat_link(specs, 0)
    dev = flat_link(specs, 0)
    for name, _, _ in specs:
        p = param(dev, name)
        p.array = cupy.ndarray(p.array.copy())
    for step in range(2):
        random_grads(host, specs, 10 * step + comm.rank, layouts=False)
        for name, _, _ in specs:
            param(dev, name).grad = cupy.ndarray(param(host, name).grad.copy())
        comm.multi_node_mean_grad(host)
        comm.multi_node_mean_grad(dev)
        for name, _, _ in specs:
            want = param(host, name).grad
            if want.ndim == 0:  # CuPy multiplies 0-d arrays in their dtype
                want = (want * 0 + numpy.asarray(param(dev, name).grad.get()))
            assert_same(param(dev, name).grad.get(), want, "gpu " + name, comm.size == 2)
    if with_nccl:
        assert ("nccl_init", comm.size, comm.rank) in log
        assert sum(1 for e in log if e[0] == "nccl_init") == 1, "one NCCL communicator per device"
        assert any(e[0] == "allReduce" and e[2] == 7 for e in log)
    # zero-copy on the device: views of one buffer are reduced in place
    buf = cupy.ndarray(numpy.zeros(20, numpy.float32))
    views = [buf[0:12].reshape(3, 4), buf[12:16]]
    log.clear()
    zl = flat_link(specs[:2], 0)
    for (name, _, _), v in zip(specs[:2], views):
        p = param(zl, name)
        p.array = cupy.ndarray(p.array.copy())
    random_grads(host, specs[:2], comm.rank, layouts=False)
    for (name, _, _), v in zip(specs[:2], views):
        v[...] = param(host, name).grad
        param(zl, name).grad = v
    everyone = comm.mpi_comm.allgather(buf.get())
    comm.multi_node_mean_grad(zl)
    assert not any(e[0] == "concatenate" for e in log), log
    assert_same(buf.get(), chainermn_mean(everyone), "gpu contiguous", comm.size == 2)
    # broadcast
    for name, _, _ in specs:
        p = param(dev, name)
        p.array[...] = numpy.full(p.shape, comm.rank, p.dtype)
    comm.bcast_data(dev)
    for name, _, _ in specs:
        assert (param(dev, name).array.get() == 0).all()


@case
def gpu_nccl_mock():
    _gpu(True)


@case
def gpu_host_mock():
    _gpu(False)


# ---------------------------------------------------------------------------
# Against ChainerMN (in the Chainer environment)
# ---------------------------------------------------------------------------
def _chainermn_parity(dtype, contiguous, steps=30):
    import chainer
    import chainer.functions as F
    import chainer.links as L
    import chainermn

    chainer.config.dtype = numpy.dtype(dtype)
    cm_comm = chainermn.create_communicator("naive")
    comm = mn.create_communicator("naive")
    rank = comm.rank

    def model(seed):
        # different initial values per rank: the first update broadcasts rank 0's
        numpy.random.seed(seed)
        m = chainer.Sequential(L.Linear(7, 11), F.tanh, L.Linear(11, 4))
        for p in m.params():
            p.array[...] = numpy.random.standard_normal(p.shape).astype(dtype)
        return m

    ref = model(rank)
    ours = model(rank)
    ref_opt = chainermn.create_multi_node_optimizer(
        chainer.optimizers.NesterovAG(lr=0.05, momentum=0.9), cm_comm)
    ref_opt.setup(ref)
    opt = mn.create_multi_node_optimizer(cynag.optimizers.NesterovAG(lr=0.05, momentum=0.9),
                                         comm)
    opt.setup(ours, contiguous=contiguous)
    rng = numpy.random.default_rng(77 + rank)
    for step in range(steps):
        x = rng.standard_normal((8, 7)).astype(dtype)
        t = rng.standard_normal((8, 4)).astype(dtype)
        ref_opt.update(lambda: F.mean_squared_error(ref(x), t))
        opt.update(lambda: F.mean_squared_error(ours(x), t))
        for (n, p), (_, q) in zip(sorted(ref.namedparams()), sorted(ours.namedparams())):
            assert_same(q.array, p.array, "%s after step %d (%s, contiguous=%s)"
                        % (n, step, numpy.dtype(dtype).name, contiguous), exact=comm.size == 2)
    assert ref_opt.t == opt.t == steps - 1


@case
def chainermn_parity():
    for dtype in (numpy.float32, numpy.float64):
        for contiguous in (False, True):
            _chainermn_parity(dtype, contiguous)


@case
def chainermn_mean_grads():
    """The communicator alone against ChainerMN's naive one on many shapes and dtypes."""
    import chainer
    import chainermn

    cm_comm = chainermn.create_communicator("naive")
    comm = mn.create_communicator("naive")
    specs = [s for s in MEAN_SHAPES if s[0] not in ("e",)]
    for step in range(3):
        a = chainer.Chain()
        b = flat_link(specs, 0)
        with a.init_scope():
            for name, shape, dtype in specs:
                setattr(a, name.replace("/", "_"), chainer.Parameter(
                    numpy.zeros(shape, dtype)))
        random_grads(b, specs, 10 * step + comm.rank, layouts=False)
        for name, _, _ in specs:
            getattr(a, name.replace("/", "_")).grad = param(b, name).grad.copy()
        cm_comm.multi_node_mean_grad(a)
        comm.multi_node_mean_grad(b)
        for name, _, _ in specs:
            # two ranks: bit for bit; more: MPI may add in another order
            assert_same(param(b, name).grad, getattr(a, name.replace("/", "_")).grad,
                        name + " vs ChainerMN", exact=comm.size == 2)


def main(argv):
    names = argv[1:]
    for name in names:
        if name not in CASES:
            raise SystemExit("unknown case %r (known: %s)" % (name, ", ".join(sorted(CASES))))
    if "except_hook" not in names:
        # a failed assertion aborts the whole job instead of leaving the others waiting
        global_except_hook.add_hook()
    rank = world().rank
    for name in names:
        CASES[name]()
        print("CASE %s OK rank %d" % (name, rank), flush=True)


if __name__ == "__main__":
    main(sys.argv)
