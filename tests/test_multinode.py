"""cynag.multinode: ChainerMN's API over MPI, with packed gradient averaging.

Multi-process cases (``tests/mpi_cases.py``) run under ``mpiexec -n 2`` and
``-n 3`` with a timeout, so that a hang fails instead of blocking the suite:
means against NumPy (every dtype, 0-d, empty, Fortran and strided gradients,
contiguous mode, several bucket sizes), ``bcast_data``, ``zero_fill``,
training trajectories bit-identical to an in-process reference (two ranks),
mismatched models (an error on every rank, within seconds), the global
except hook (the job ends with a non-zero status), ``split`` and the object
methods, and the GPU path on an emulated CuPy/NCCL.  Against real ChainerMN
(``naive`` communicator + Chainer's NesterovAG), the same cases run in the
Chainer environment of ``tests/chainer_env.py`` (mpi4py and the MPICH wheel
are added to it).

They need mpi4py and ``mpiexec`` next to the interpreter or on ``PATH``
(``pip install "cynag[mpi]"``, part of the ``test`` extra); without them
they are skipped with that message.  The other tests here run in-process on
an emulated MPI.
"""
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy
import pytest

import cynag
import cynag.multinode as mn
from cynag.multinode import _layout, communicator as communicator_mod

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CASES_SCRIPT = os.path.join(HERE, "mpi_cases.py")
#: Wall-clock limit of one mpiexec run: a hang fails the test after this.
TIMEOUT_S = 120
CASES = ["mean_grads", "mean_many_small", "mean_zero_fill", "bcast", "trajectory", "mismatch",
         "pending_user_receive",
         "split_and_objects", "one_rank_differs", "gpu_nccl_mock", "gpu_host_mock"]
CHAINERMN_CASES = ["chainermn_mean_grads", "chainermn_parity"]


def find_mpiexec(python):
    """``mpiexec`` installed next to ``python`` (the MPICH wheel), else on PATH, else None."""
    here = os.path.dirname(python)
    for name in ("mpiexec", "mpiexec.exe", "mpirun"):
        cand = os.path.join(here, name)
        if os.path.exists(cand):
            return cand
    return shutil.which("mpiexec")


def mpi_missing():
    """Why the multi-process tests cannot run in this interpreter, or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if find_mpiexec(sys.executable) is None:
        return "mpiexec was not found next to %s nor on PATH" % sys.executable
    return None


def run_mpi(n, args, python=None, env=None, cwd=None, timeout=TIMEOUT_S):
    """Run ``mpiexec -n n python args``; return (exit status or 'timeout', output, seconds)."""
    python = python or sys.executable
    mpiexec = find_mpiexec(python)
    if env is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CYNAG_FORCE_ABORT_ON_EXCEPTION", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    proc = subprocess.Popen([mpiexec, "-n", str(n), python] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd or REPO, start_new_session=True, universal_newlines=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout after %d s" % timeout
    return rc, out, time.time() - t0


def _check_cases(result, name, n):
    rc, out, _ = result
    # the ranks' lines may be interleaved in mpiexec's output
    ok = {r for c, r in re.findall(r"CASE (\w+) OK rank (\d+)", out) if c == name}
    if len(ok) != n or rc != 0:
        pytest.fail("case %s under mpiexec -n %d: exit status %s, passed on ranks %s; "
                    "output:\n%s" % (name, n, rc, sorted(ok), out[-6000:]), pytrace=False)


@pytest.fixture(scope="module")
def mpi_runs():
    """Every case, once per process count (one mpiexec run each, cached)."""
    why = mpi_missing()
    if why:
        pytest.skip("%s: install them with pip install \"cynag[mpi]\" (the test extra has "
                    "them)" % why)
    cache = {}

    def get(n):
        if n not in cache:
            cache[n] = run_mpi(n, [CASES_SCRIPT] + CASES)
        return cache[n]
    return get


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", CASES)
def test_mpi_case(mpi_runs, name, n):
    _check_cases(mpi_runs(n), name, n)


def test_except_hook_aborts_the_job():
    why = mpi_missing()
    if why:
        pytest.skip(why)
    rc, out, dt = run_mpi(2, [CASES_SCRIPT, "except_hook"], timeout=60)
    assert rc not in (0, None) and not isinstance(rc, str), (rc, out)
    assert "deliberate failure on rank 1" in out and "Traceback" in out, out
    assert "Uncaught exception on rank 1" in out, out
    assert "passed the barrier" not in out, out
    assert dt < 30, "the job took %.1f s to end" % dt


def test_example_script_runs():
    why = mpi_missing()
    if why:
        pytest.skip(why)
    script = os.path.join(REPO, "examples", "train_mnist_like_mpi.py")
    rc, out, _ = run_mpi(2, [script, "--epochs", "2", "--n-train", "2000"])
    assert rc == 0, out
    assert "final" in out and "accuracy" in out, out


# ---------------------------------------------------------------------------
# Against ChainerMN in the Chainer environment
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chainer_mpi_python(chainer_python):
    """The Chainer environment's interpreter, with mpi4py and the MPICH wheel added."""
    import chainer_env

    d = chainer_env.venv_dir()
    with chainer_env._locked(d):
        if not chainer_env._python_ok(chainer_python, "import mpi4py.MPI") \
                or find_mpiexec(chainer_python) is None:
            chainer_env._run([chainer_python, "-m", "pip", "install", "mpi4py", "mpich"],
                             "installing mpi4py and mpich into the Chainer environment")
    return chainer_python


@pytest.fixture(scope="module")
def chainermn_runs(chainer_mpi_python, tmp_path_factory):
    import chainer_env

    cache = {}

    def get(n):
        if n not in cache:
            env = chainer_env.clean_env({"PYTHONHASHSEED": "0"})
            cache[n] = run_mpi(n, [CASES_SCRIPT] + CHAINERMN_CASES, python=chainer_mpi_python,
                               env=env, cwd=str(tmp_path_factory.mktemp("chainermn")),
                               timeout=300)
        return cache[n]
    return get


@pytest.mark.chainer
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", CHAINERMN_CASES)
def test_against_chainermn(chainermn_runs, name, n):
    _check_cases(chainermn_runs(n), name, n)


# ---------------------------------------------------------------------------
# In-process: no MPI needed
# ---------------------------------------------------------------------------
def test_import_without_mpi4py():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import cynag, cynag.multinode as mn\n"
        "assert not mn.available()\n"
        "try:\n"
        "    mn.create_communicator()\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout
    assert 'ERR' in out and 'pip install "cynag[mpi]"' in out, out


def test_import_does_not_import_mpi4py():
    code = ("import sys, cynag, cynag.multinode\n"
            "print('mpi4py' in sys.modules, 'mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         universal_newlines=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout
    assert out.split() == ["False", "False"], out


def test_optional_dependencies_declared():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["mpi"] == ["mpi4py", "mpich"]
    assert "mpi4py" in extras["test"] and "mpich" in extras["test"]


# -- the packing kernel ------------------------------------------------------
@pytest.fixture
def K():
    from cynag_kernels import _pack

    return _pack


TYPENUM = {numpy.float16: 23, numpy.float32: 11, numpy.float64: 12}


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64])
@pytest.mark.parametrize("size", [2, 3, 7])
def test_pack_unpack_mean_matches_numpy(K, dtype, size):
    rng = numpy.random.default_rng(0)
    shapes = [(5,), (2, 3), (1,), (17,), (4, 4)]
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    arrays[1] = numpy.asfortranarray(arrays[1])
    sizes = numpy.array([a.size for a in arrays], numpy.int64)
    offsets = numpy.concatenate(([0], numpy.cumsum(sizes))).astype(numpy.int64)
    total = int(offsets[-1])
    cdtype = numpy.float32 if dtype == numpy.float16 else dtype
    for bucket in (1, 3, 8, total):
        full = numpy.empty(total, cdtype)
        buf = numpy.empty(bucket, cdtype)
        for lo in range(0, total, bucket):
            hi = min(total, lo + bucket)
            first = int(numpy.searchsorted(offsets, lo, "right")) - 1
            last = int(numpy.searchsorted(offsets, hi, "left"))
            K.pack(arrays, buf, offsets, first, last, lo, hi, TYPENUM[dtype])
            full[lo:hi] = buf[:hi - lo]
        want = numpy.concatenate([a.ravel(order="K").astype(cdtype) for a in arrays])
        assert numpy.array_equal(full, want)
    # the sum of `size` ranks, then the mean as ChainerMN computes it
    summed = (full * cdtype(size)).astype(cdtype)
    out = [numpy.zeros_like(a) for a in arrays]
    scale = float(numpy.dtype(dtype).type(1.0 / size))
    K.unpack(out, summed, offsets, 0, len(out), 0, total, True, scale, TYPENUM[dtype])
    for o, a in zip(out, arrays):
        s = (a.astype(cdtype) * cdtype(size)).astype(cdtype).astype(dtype)
        expect = s * numpy.dtype(dtype).type(1.0 / size)  # NumPy's `grad *= 1.0 / size`
        assert o.dtype == expect.dtype and numpy.array_equal(o, expect)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64])
def test_pack_at_and_unpack_at_equal_pack_and_unpack(K, dtype):
    """The address-based copies (after scan) give the object-based ones' bits."""
    rng = numpy.random.default_rng(1)
    shapes = [(5,), (2, 3), (0,), (1,), (17,), (4, 4), ()]
    arrays = [numpy.asarray(rng.standard_normal(s) * 3).astype(dtype) for s in shapes]
    arrays[1] = numpy.asfortranarray(arrays[1])
    n = len(arrays)
    sizes = numpy.array([a.size for a in arrays], numpy.int64)
    offsets = numpy.concatenate(([0], numpy.cumsum(sizes))).astype(numpy.int64)
    total = int(offsets[-1])
    ptrs, codes = numpy.zeros(n, numpy.int64), numpy.zeros(n, numpy.int8)
    assert K.scan(arrays, TYPENUM[dtype], sizes, ptrs, codes, True) == 0
    cdtype = numpy.float32 if dtype == numpy.float16 else dtype
    scale = float(numpy.dtype(dtype).type(1.0 / 3))
    for bucket in (1, 4, total):
        for lo in range(0, total, bucket):
            hi = min(total, lo + bucket)
            first = int(numpy.searchsorted(offsets, lo, "right")) - 1
            last = int(numpy.searchsorted(offsets, hi, "left"))
            a, b = numpy.full(bucket, 7, cdtype), numpy.full(bucket, 7, cdtype)
            K.pack(arrays, a, offsets, first, last, lo, hi, TYPENUM[dtype])
            K.pack_at(ptrs, b, offsets, first, last, lo, hi, TYPENUM[dtype])
            assert a.tobytes() == b.tobytes()
            for mean in (False, True):
                one = [x.copy(order="K") for x in arrays]
                two = [x.copy(order="K") for x in arrays]
                p2 = numpy.array([x.ctypes.data if x.size else 0 for x in two], numpy.int64)
                K.scan(two, TYPENUM[dtype], sizes, p2, codes, True)
                src = (a * cdtype(3)).astype(cdtype)
                K.unpack(one, src, offsets, first, last, lo, hi, mean, scale, TYPENUM[dtype])
                K.unpack_at(p2, src, offsets, first, last, lo, hi, mean, scale,
                            TYPENUM[dtype])
                for x, y in zip(one, two):
                    assert x.tobytes() == y.tobytes()
    with pytest.raises(ValueError, match="no address"):
        K.pack_at(numpy.zeros(n, numpy.int64), numpy.zeros(total, cdtype), offsets, 0, n,
                  0, total, TYPENUM[dtype])


def test_add_into(K):
    for dtype in (numpy.float32, numpy.float64):
        v = numpy.arange(10, dtype=dtype) / 3
        t = numpy.linspace(-1, 1, 4).astype(dtype)
        w = v.copy()
        K.add_into(w, 3, 7, t, 1.0, False)
        assert w.tobytes() == numpy.concatenate((v[:3], v[3:7] + t, v[7:])).tobytes()
        s = dtype(1.0 / 3)
        w = v.copy()
        K.add_into(w, 3, 7, t, float(s), True)
        assert w.tobytes() == numpy.concatenate((v[:3], (v[3:7] + t) * s, v[7:])).tobytes()
    with pytest.raises(TypeError):
        K.add_into(numpy.zeros(4, numpy.float32), 0, 4, numpy.zeros(4), 1.0, False)
    with pytest.raises(IndexError):
        K.add_into(numpy.zeros(4), 2, 6, numpy.zeros(4), 1.0, False)


def test_scan_codes(K):
    f32 = numpy.zeros(4, numpy.float32)
    ro = numpy.zeros(4, numpy.float32)
    ro.flags.writeable = False
    arrays = [f32, None, [1, 2], numpy.zeros(4), numpy.zeros(5, numpy.float32),
              numpy.zeros((4, 2), numpy.float32)[:, 0], ro]
    n = len(arrays)
    ptrs = numpy.zeros(n, numpy.int64)
    codes = numpy.zeros(n, numpy.int8)
    sizes = numpy.full(n, 4, numpy.int64)
    assert K.scan(arrays, 11, sizes, ptrs, codes, True) == n - 1
    assert codes.tolist() == [K.OK, K.NONE, K.NOT_NDARRAY, K.BAD_DTYPE, K.BAD_SIZE,
                              K.NOT_DENSE, K.READ_ONLY]
    assert ptrs[0] == f32.ctypes.data and (ptrs[1:] == 0).all()
    assert K.scan(arrays[-1:], 11, sizes, ptrs, codes, False) == 0


def test_gather_reads_the_attribute_and_scans(K):
    class O:
        def __init__(self, g):
            self.grad = g

    f32 = numpy.zeros(4, numpy.float32)
    objs = [O(f32), O(None), O(numpy.zeros(4)), O(numpy.zeros((4, 2), numpy.float32)[:, 0])]
    n = len(objs)
    ptrs, codes = numpy.zeros(n, numpy.int64), numpy.zeros(n, numpy.int8)
    out = [None] * n
    assert K.gather(objs, "grad", 11, numpy.full(n, 4, numpy.int64), ptrs, codes, out) == 3
    assert out[0] is f32 and out[1] is None and out[2] is objs[2].grad
    assert codes.tolist() == [K.OK, K.NONE, K.BAD_DTYPE, K.NOT_DENSE]
    assert ptrs[0] == f32.ctypes.data and (ptrs[1:] == 0).all()
    with pytest.raises(AttributeError):
        K.gather(objs, "nope", 11, numpy.full(n, 4, numpy.int64), ptrs, codes, out)
    with pytest.raises(ValueError):
        K.gather(objs, "grad", 11, numpy.full(n, 4, numpy.int64), ptrs, codes, [])


def test_same_entries(K):
    class P:
        def __init__(self, a):
            self.array = a

    ps = [P(numpy.zeros((2, 3), numpy.float32)), P(None), P(numpy.zeros(()))]
    items = [("/a", ps[0]), ("/b", ps[1]), ("/c", ps[2])]
    snap = _layout.Snapshot(items)
    assert snap.matches(list(items)) and snap.matches([("/" + k[1:], p) for k, p in items])
    assert not snap.matches(items[:2])
    assert not snap.matches([items[0], ("/b", P(None)), items[2]])       # another object
    assert not snap.matches([items[0], ("/x", ps[1]), items[2]])         # another path
    assert not snap.matches([list(items[0])] + items[1:])               # not a tuple
    for a in (numpy.zeros((3, 2), numpy.float32), numpy.zeros((2, 3)), None):
        old, ps[0].array = ps[0].array, a
        assert not snap.matches(items)
        ps[0].array = old
    ps[1].array = numpy.zeros(1)
    assert not snap.matches(items)
    assert _layout.Snapshot(items, arrays=False).matches(items)
    ps[1].array = numpy.zeros(5)                     # initialized: shape not recorded
    assert _layout.Snapshot(items[:2], arrays=False).matches(items[:2])
    ps[1].array = None
    snap = _layout.Snapshot(items, arrays=False)
    ps[1].array = numpy.zeros(1)                     # initialized late: a change
    assert not snap.matches(items)


def test_pack_rejects_bad_ranges_and_arrays(K):
    a = [numpy.zeros(4, numpy.float32)]
    off = numpy.array([0, 4], numpy.int64)
    buf = numpy.zeros(4, numpy.float32)
    with pytest.raises(IndexError):
        K.pack(a, numpy.zeros(8, numpy.float32), off, 0, 1, 0, 5)
    with pytest.raises(ValueError):
        K.pack(a, numpy.zeros(2, numpy.float32), off, 0, 1, 0, 4)
    with pytest.raises(ValueError):
        K.pack([numpy.zeros(3, numpy.float32)], buf, off, 0, 1, 0, 4)
    with pytest.raises(TypeError):
        K.pack(a, numpy.zeros(4, numpy.float64), off, 0, 1, 0, 4, 11)
    with pytest.raises(TypeError):
        K.pack(a, numpy.zeros(4, numpy.int32), off, 0, 1, 0, 4)
    ro = numpy.zeros(4, numpy.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        K.unpack([ro], buf, off, 0, 1, 0, 4)


def test_scale_matches_numpy(K):
    x = numpy.random.default_rng(1).standard_normal(1000).astype(numpy.float32)
    y = x.copy()
    K.scale(y, 10, 990, float(numpy.float32(1.0 / 3)))
    want = x.copy()
    want[10:990] *= 1.0 / 3
    assert numpy.array_equal(y, want)


# -- layouts and segments ---------------------------------------------------------
def _link(n, size=64, dtype=numpy.float32, contiguous=False):
    link = cynag.Link()
    with link.init_scope():
        for i in range(n):
            setattr(link, "p%04d" % i, cynag.Parameter(numpy.ones(size, dtype)))
    if contiguous:
        cynag.optimizers.NesterovAG().setup(link, contiguous=True)
    for p in link.params():
        p.grad = numpy.full(size, 2, dtype)
    return link


def _segments(link, direct_min=1024, bucket=1 << 20, allow_runs=True):
    layout = _layout.Layout(link, _layout.collect(link))
    g = layout.groups[0]
    grads = [p.grad for p in g.params]
    from cynag_kernels import _pack

    _pack.scan(grads, 11, g.sizes, g.ptrs, g.codes, True)
    return g, _layout.compute_segments(g, grads, g.ptrs, numpy.ones(g.n, bool), direct_min,
                                       bucket, allow_runs=allow_runs)


def test_contiguous_gradients_are_one_run():
    g, seg = _segments(_link(50, contiguous=True))
    assert seg.total == 0 and [k for k, _ in seg.direct] == ["run"]
    assert seg.direct[0][1].size == 50 * 64
    _, fallback = _segments(_link(50, contiguous=True), allow_runs=False)
    assert fallback.direct == [] and fallback.total == 50 * 64 and fallback.sig != seg.sig


def test_separate_gradients_are_packed_or_direct_by_size():
    _, seg = _segments(_link(10, size=64))
    assert seg.direct == [] and seg.total == 640 and seg.all_packed
    _, seg = _segments(_link(3, size=1000), direct_min=4000)
    assert [d[0] for d in seg.direct] == ["one"] * 3 and seg.total == 0
    _, seg = _segments(_link(7, size=100), bucket=150)
    assert [(b[0], b[1]) for b in seg.buckets] == [(i, min(700, i + 150))
                                                  for i in range(0, 700, 150)]


def test_layout_is_sorted_by_path_and_skips_uninitialized():
    link = cynag.Chain()
    with link.init_scope():
        link.b = cynag.Link(W=(2, 3))
        link.a = cynag.Link(W=(4,))
        link.a.u = cynag.Parameter()
    layout = _layout.Layout(link, _layout.collect(link))
    assert layout.paths == ["/a/W", "/b/W"]
    assert [d[0] for d in layout.arrays_desc] == ["/a/W", "/b/W"]


def test_describe_mismatch_names_first_differing_parameter():
    d0 = [("/a", (3,), "<f4", "cpu"), ("/b", (2, 2), "<f4", "cpu")]
    d1 = [("/a", (3,), "<f4", "cpu"), ("/b", (2, 3), "<f4", "cpu")]
    msg = communicator_mod.describe_mismatch([(1, d0, None), (1, d1, None)])
    assert "first differing parameter '/b'" in msg
    assert "shape (2, 2) float32 on cpu on rank 0" in msg
    assert "shape (2, 3) float32 on cpu on rank 1" in msg
    msg = communicator_mod.describe_mismatch([(1, d0, None), (1, d0[:1], None),
                                              (1, d0[:1], None)])
    assert "'/b': shape (2, 2) float32 on cpu on rank 0; no such initialized parameter on " \
           "ranks 1, 2" in msg
    msg = communicator_mod.describe_mismatch([(2, d0, None), (1, d0, None)])
    assert "rank 0 to broadcast parameters" in msg and "rank 1 to average gradients" in msg
    msg = communicator_mod.describe_mismatch([(1, d0, None, {"bucket_bytes": 4}),
                                              (1, d0, None, {"bucket_bytes": 8})])
    assert "communicator settings differ" in msg and "{'bucket_bytes': 8} on rank 1" in msg
    msg = communicator_mod.describe_mismatch([(1, d0, []), (1, d0, ["/a"])])
    assert "'/a' has a gradient on rank 0 but None on rank 1" in msg


# -- the communicator and the optimizer on an emulated MPI ---------------------------
class _FakeComm:
    """One process standing for ``size`` identical ranks (a sum is ``size`` times the value)."""

    rank = 0

    def __init__(self, size=2):
        self.size = size
        self.calls = []

    def allgather(self, x):
        return [x] * self.size

    def Allreduce(self, send, buf, op="SUM"):
        assert send == "IN_PLACE"
        self.calls.append(("Allreduce", buf.size, buf.dtype.name, op))
        if op == "SUM":
            buf[...] = buf * buf.dtype.type(self.size)

    def Sendrecv(self, sendbuf, dest, sendtag, recvbuf, source, recvtag):
        """The ring of ``_ring_mean`` with two identical ranks, this one rank 0.

        Reducing, rank 0 sends the first half of a bucket and receives the
        other rank's second half, which holds what this rank's second half
        (right after the first in memory) holds; gathering, it receives the
        first half reduced, ``(g + g) * 0.5 == g``: what it holds already.
        """
        assert self.size == 2 and dest == source == 1 and sendtag == recvtag
        self.calls.append(("Sendrecv", sendbuf.size, recvbuf.size, sendbuf.dtype.name))
        if sendtag == communicator_mod._TAG_REDUCE:
            addr = sendbuf.ctypes.data + sendbuf.nbytes
            mine = (ctypes.c_char * recvbuf.nbytes).from_address(addr)
            recvbuf[...] = numpy.frombuffer(mine, recvbuf.dtype, recvbuf.size)
        else:
            assert sendtag == communicator_mod._TAG_GATHER

    def Bcast(self, buf, root=0):
        self.calls.append(("Bcast",))

    def bcast(self, obj, root=0):
        return obj

    def Split(self, color, key):
        return self

    def Dup(self):
        return self

    def Free(self):
        pass


class _FakeMPI:
    IN_PLACE = "IN_PLACE"
    MAX = "MAX"
    BYTE = "BYTE"
    ANY_TAG = -1

    @staticmethod
    def Get_processor_name():
        return "host"


@pytest.fixture
def fake_comm(monkeypatch):
    monkeypatch.setattr(communicator_mod, "import_mpi", lambda: _FakeMPI)

    def make(size=2, name="naive", **kw):
        fc = _FakeComm(size)
        return mn.create_communicator(name, mpi_comm=fc, **kw), fc
    return make


def test_create_communicator_names_and_options(fake_comm):
    for name in ("naive", "flat", "mpi"):
        comm, _ = fake_comm(name=name)
        assert isinstance(comm, mn.MpiCommunicator) and comm.name == name
        assert (comm.rank, comm.size, comm.intra_rank, comm.intra_size, comm.inter_rank,
                comm.inter_size) == (0, 2, 0, 2, 0, 1)
    with pytest.raises(ValueError, match="Unrecognized communicator"):
        mn.create_communicator("pure_nccl", mpi_comm=_FakeComm())
    with pytest.raises(ValueError, match="allreduce_grad_dtype"):
        mn.create_communicator("naive", mpi_comm=_FakeComm(), allreduce_grad_dtype=numpy.float16)
    with pytest.raises(TypeError):
        mn.create_communicator("naive", mpi_comm=_FakeComm(), bogus=1)
    comm, _ = fake_comm(bucket_bytes=1 << 16)
    assert comm.get_config("bucket_bytes") == 1 << 16
    comm.set_config("bucket_bytes", 1 << 20)
    assert comm.get_config()["bucket_bytes"] == 1 << 20
    with pytest.raises(ValueError):
        comm.set_config("no_such_option", 1)
    with pytest.raises(ValueError):
        comm.set_config("bucket_bytes", 0)


def test_few_messages(fake_comm):
    comm, fc = fake_comm()
    link = _link(2000)
    comm.multi_node_mean_grad(link)
    # one control message and one bucket for 2000 gradients of 64 float32,
    # reduced by a ring (with two ranks: one exchange of each half each way)
    assert [c[0] for c in fc.calls] == ["Allreduce", "Sendrecv", "Sendrecv"]
    assert fc.calls[0][2] == "int64"
    assert fc.calls[1][1:] == fc.calls[2][1:] == (64000, 64000, "float32")
    for p in link.params():
        assert (p.grad == 2).all()
    fc.calls.clear()
    comm.set_config("bucket_bytes", 100 * 1024)
    comm.multi_node_mean_grad(link)
    assert len(fc.calls) == 1 + 2 * 5   # 512000 bytes in buckets of 100 KiB


def test_zero_copy_in_contiguous_mode(fake_comm):
    comm, fc = fake_comm(direct_min_bytes=1024)
    link = _link(2000, contiguous=True)
    views = [p.grad for p in link.params()]
    comm.multi_node_mean_grad(link)
    assert [p.grad for p in link.params()] == views
    assert comm._staging == {}, "the packing buffer is not used"
    assert comm._ring_tmp[numpy.dtype(numpy.float32)].size == 64000
    # the whole gradient buffer in one bucket: one ring exchange each way
    assert fc.calls[1:] == [("Sendrecv", 64000, 64000, "float32")] * 2


def test_multi_node_optimizer_broadcasts_first_then_averages(fake_comm):
    comm, fc = fake_comm(size=2)
    link = _link(3, size=4)
    opt = mn.create_multi_node_optimizer(cynag.optimizers.NesterovAG(lr=0.1), comm)
    assert opt.setup(link) is opt
    assert opt.target is link and opt.lr == 0.1
    opt.lr = 0.2
    assert opt.actual_optimizer.lr == 0.2
    opt.update()
    assert opt.t == 0 and [c[0] for c in fc.calls] == ["Allreduce", "Bcast"]
    fc.calls.clear()
    before = [p.array.copy() for p in link.params()]
    opt.update()
    assert opt.t == 1 and fc.calls[0][0] == "Allreduce"
    assert not all((p.array == b).all() for p, b in zip(link.params(), before))
    # a new parameter: the next update broadcasts again
    with link.init_scope():
        link.q = cynag.Parameter(numpy.ones(2, numpy.float32))
    link.q.update_rule = opt.create_update_rule()
    fc.calls.clear()
    opt.update()
    assert opt.t == 1 and "Bcast" in [c[0] for c in fc.calls]


def test_multi_node_optimizer_passes_loss_scale(fake_comm):
    comm, _ = fake_comm()
    link = _link(1, size=3)
    opt = mn.create_multi_node_optimizer(cynag.optimizers.NesterovAG(), comm).setup(link)
    opt.set_loss_scale(8.0)
    seen = []

    class Loss:
        def backward(self, loss_scale=None):
            seen.append(loss_scale)
            link.p0000.grad = numpy.full(3, 8.0, numpy.float32)

    opt.update(Loss)
    opt.update(Loss)
    assert seen == [8.0, 8.0] and link.p0000._loss_scale == 8.0


def test_double_buffering_is_refused(fake_comm):
    comm, _ = fake_comm()
    with pytest.raises(ValueError, match="double buffering"):
        mn.create_multi_node_optimizer(cynag.optimizers.NesterovAG(), comm,
                                       double_buffering=True)


def test_chainer_style_link(fake_comm):
    """An object with Chainer's link interface (not a cynag Link) is collected at every step."""
    comm, fc = fake_comm(size=2)

    class P:
        def __init__(self, a):
            self.array, self.grad = a, numpy.full_like(a, 3)

    class L:
        def __init__(self):
            self.ps = {"/w": P(numpy.zeros(3, numpy.float32)),
                       "/b": P(numpy.zeros(2, numpy.float64))}

        def namedparams(self, include_uninit=True):
            return iter(self.ps.items())

    link = L()
    comm.multi_node_mean_grad(link)
    assert (link.ps["/w"].grad == 3).all() and (link.ps["/b"].grad == 3).all()
    link.ps["/w"].grad = numpy.full(3, 5, numpy.float32)   # a new array: read again
    comm.multi_node_mean_grad(link)
    assert (link.ps["/w"].grad == 5).all()


def test_one_process_changes_nothing_but_fills_zeros(fake_comm):
    comm, fc = fake_comm(size=1)
    link = _link(3, size=5)
    link.p0001.grad = None
    grads = [p.grad for p in link.params()]
    comm.multi_node_mean_grad(link, zero_fill=True)
    assert [c[0] for c in fc.calls] == ["Allreduce"]   # the control message only
    assert link.p0000.grad is grads[0] and (link.p0000.grad == 2).all()
    assert (link.p0001.grad == 0).all()
    comm.bcast_data(link)


# -- the cached layout against ChainerMN's naive averaging, step by step ---------------
def _naive_mean(model, zero_fill, size):
    """What ChainerMN's ``naive`` communicator leaves in each gradient, when every one of
    ``size`` ranks holds this rank's gradients: ``{id(param): expected or None}``.

    For each initialized parameter in ``sorted(namedparams())``: a ``None``
    gradient is zeros with ``zero_fill``, else left alone; the rest is
    ``allreduce(g)`` (the sum of ``size`` copies, float16 summed in float32)
    then ``g *= 1.0 / size``.
    """
    from mpi_cases import chainermn_mean

    want = {}
    for _, p in sorted(model.namedparams(), key=lambda x: x[0]):
        if p.array is None or id(p) in want:
            continue
        g = p.grad
        if g is None:
            want[id(p)] = numpy.zeros_like(p.array) if zero_fill else None
        else:
            want[id(p)] = chainermn_mean([numpy.array(g)] * size)
    return want


class _DuckParam:
    """A parameter with Chainer's interface only (``array``, ``grad``)."""

    def __init__(self, array=None):
        self.array = array
        self.grad = None


class _DuckLink:
    """Chainer's link interface only: ``namedparams()``, in insertion (unsorted) order."""

    def __init__(self):
        self.ps = {}

    def add(self, name, param):
        self.ps[name] = param

    def namedparams(self, include_uninit=True):
        for name, p in self.ps.items():
            if include_uninit or p.array is not None:
                yield name, p

    def params(self, include_uninit=True):
        for _, p in self.namedparams(include_uninit):
            yield p

    def cleargrads(self):
        for p in self.params():
            p.grad = None


def _chainer_link_kind():
    try:
        import chainer
    except ImportError:
        return None

    class Kind:
        @staticmethod
        def link():
            return chainer.Link()

        @staticmethod
        def param(array):
            return chainer.Parameter(array)

        @staticmethod
        def add(link, name, param):
            with link.init_scope():
                setattr(link, name, param)
    return Kind


class _CynagKind:
    @staticmethod
    def link():
        return cynag.Link()

    @staticmethod
    def param(array):
        return cynag.Parameter() if array is None else cynag.Parameter(array)

    @staticmethod
    def add(link, name, param):
        with link.init_scope():
            setattr(link, name, param)


class _DuckKind:
    link = _DuckLink

    @staticmethod
    def param(array):
        return _DuckParam(array)

    @staticmethod
    def add(link, name, param):
        link.add("/" + name, param)


_KINDS = {"cynag": _CynagKind, "duck": _DuckKind, "chainer": _chainer_link_kind()}


def _layout_machine(kind):
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

    SHAPES = [(), (1,), (3,), (2, 3), (5,), (3, 2)]
    DTYPES = [numpy.float16, numpy.float32, numpy.float64]
    SIZE = 3

    class LayoutMachine(RuleBasedStateMachine):
        """Gradients and arrays replaced, edited, cleared; parameters added late; both
        ``multi_node_mean_grad`` and the multi-node optimizer's ``update``."""

        @initialize(seed=st.integers(0, 2 ** 16))
        def start(self, seed):
            self.rng = numpy.random.default_rng(seed)
            self.fc = _FakeComm(SIZE)
            self.comm = mn.create_communicator("naive", mpi_comm=self.fc)
            self.link = kind.link()
            self.names = []
            self.zero_fill = False
            self.actual = _NoopOptimizer(self.link)
            self.opt = mn.create_multi_node_optimizer(self.actual, self.comm,
                                                      zero_fill=False)
            self.opt_target_params = []   # ChainerMN's is_changed, for the reference
            for _ in range(3):
                self.add_param(shape=SHAPES[2], dtype=DTYPES[1], init=True)

        def _array(self, shape, dtype):
            return numpy.asarray(self.rng.standard_normal(shape) * 4).astype(dtype)

        def _params(self):
            return [p for _, p in self.link.namedparams()]

        def _pick(self, i, initialized=True):
            ps = [p for p in self._params() if (p.array is not None) == initialized]
            return ps[i % len(ps)] if ps else None

        @rule(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES), init=st.booleans())
        def add_param(self, shape, dtype, init):
            name = "q%d" % (int(self.rng.integers(1000)))
            if name in self.names:
                return
            self.names.append(name)
            p = kind.param(self._array(shape, dtype) if init else None)
            kind.add(self.link, name, p)
            if init:
                p.grad = self._array(shape, dtype)

        @rule(i=st.integers(0, 50), shape=st.sampled_from(SHAPES),
              dtype=st.sampled_from(DTYPES))
        def initialize_param(self, i, shape, dtype):
            p = self._pick(i, initialized=False)
            if p is not None:
                p.array = self._array(shape, dtype)
                p.grad = self._array(shape, dtype)

        @rule(i=st.integers(0, 50), how=st.sampled_from(["new", "same", "none", "inplace"]))
        def change_grad(self, i, how):
            p = self._pick(i)
            if p is None:
                return
            if how == "new":
                p.grad = self._array(p.array.shape, p.array.dtype)
            elif how == "none":
                p.grad = None
            elif how == "same" and p.grad is not None:
                p.grad = p.grad
            elif how == "inplace" and p.grad is not None:
                p.grad[...] = self._array(p.array.shape, p.array.dtype)

        @rule(i=st.integers(0, 50), how=st.sampled_from(["same", "shape", "dtype"]),
              shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES))
        def replace_array(self, i, how, shape, dtype):
            p = self._pick(i)
            if p is None:
                return
            if how == "same":
                shape, dtype = p.array.shape, p.array.dtype
            elif how == "shape":
                dtype = p.array.dtype
            else:
                shape = p.array.shape
            p.array = self._array(shape, dtype)
            p.grad = self._array(shape, dtype)

        @rule()
        def reshape_in_place(self):
            p = self._pick(0)
            if p is not None and p.array.size == 6 and p.array.ndim == 2:
                # same size, other shape: the layout's shapes must follow
                p.array = p.array.reshape(p.array.shape[::-1]).copy()
                p.grad = self._array(p.array.shape, p.array.dtype)

        @rule(zero_fill=st.booleans())
        def set_zero_fill(self, zero_fill):
            self.zero_fill = zero_fill

        @rule()
        def mean_grad(self):
            want = _naive_mean(self.link, self.zero_fill, SIZE)
            skipped = {id(p): p.grad for p in self._params() if want.get(id(p), 0) is None}
            self.comm.multi_node_mean_grad(self.link, self.zero_fill)
            self._check(want, skipped)
            self._check_layout()

        @rule()
        def optimizer_update(self):
            # ChainerMN's is_changed, on the reference list
            current = [(n, p.array is not None)
                       for n, p in sorted(self.link.namedparams(), key=lambda x: x[0])]
            changed = current != self.opt_target_params
            self.opt_target_params = current
            object.__setattr__(self.opt, "zero_fill", self.zero_fill)
            if changed:
                # (an uninitialized chainer.Parameter has no gradient to read)
                before = {id(p): None if p.grad is None else p.grad.copy()
                          for p in self._params() if p.array is not None}
                calls = self.actual.calls
                self.opt.update()
                assert self.actual.calls == calls, "broadcast expected, got an update"
                for p in self._params():
                    if id(p) not in before:
                        continue
                    b = before[id(p)]
                    assert (p.grad is None) == (b is None)
                    assert b is None or p.grad.tobytes() == b.tobytes()
            else:
                want = _naive_mean(self.link, self.zero_fill, SIZE)
                skipped = {id(p): p.grad for p in self._params()
                           if want.get(id(p), 0) is None}
                calls = self.actual.calls
                self.opt.update()
                assert self.actual.calls == calls + 1, "an update expected, got a broadcast"
                self._check(want, skipped)

        def _check(self, want, skipped):
            for p in self._params():
                if id(p) not in want:
                    continue
                w = want[id(p)]
                if w is None:
                    assert p.grad is skipped[id(p)]
                    continue
                g = numpy.asarray(p.grad)
                assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.shape)
                assert g.tobytes() == w.tobytes(), (g, w)

        def _check_layout(self):
            # the cached layout describes the model as a fresh one would
            fresh = _layout.Layout(self.link, _layout.collect(self.link))
            layout = self.comm._layout(self.link)
            assert layout.arrays_desc == fresh.arrays_desc
            assert layout.sig == fresh.sig
            assert [p for p in layout.params] == [p for p in fresh.params]

    return LayoutMachine


class _NoopOptimizer:
    _loss_scale = None

    def __init__(self, target):
        self.target = target
        self.calls = 0

    def update(self, lossfun=None, *args, **kwds):
        self.calls += 1


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_cached_layout_matches_naive_averaging(fake_comm, kind):
    """Whatever happens to the model between steps, the averaged gradients are
    ChainerMN's (naive communicator), bit for bit, and the optimizer broadcasts
    exactly when ChainerMN's would."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    if _KINDS[kind] is None:
        pytest.skip("chainer is not installed in this interpreter")
    machine = _layout_machine(_KINDS[kind])
    run_state_machine_as_test(machine, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None,
        suppress_health_check=list(HealthCheck)))


@pytest.mark.chainer
def test_cached_layout_machine_on_chainer_links(chainer_python):
    """The layout state machine on ``chainer.Link`` models, in the Chainer 7.8.1
    environment (the interpreter running this suite cannot import Chainer)."""
    from test_step_machine import _ensure_hypothesis

    _ensure_hypothesis(chainer_python)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [chainer_python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "test_multinode.py::test_cached_layout_matches_naive_averaging[chainer]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
        timeout=1500, cwd=here)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "1 passed" in proc.stdout, proc.stdout[-8000:]
