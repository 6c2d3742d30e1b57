"""``python -m cynag.bench`` and the native probe it measures against.

The command runs on shrunken cases (the hidden ``--scale`` option) so that
the whole file takes a few seconds; nothing here judges performance.
"""
import json
import math
import os
import subprocess
import sys
import time

import numpy
import pytest

import cynag_kernels
from cynag import bench

_probe = pytest.importorskip("cynag_kernels._probe")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [numpy.float32, numpy.float64]
# Zero-sized, one-element, odd and larger-than-a-split tensors side by side.
SIZES = [0, 1, 3, 64, 1000, 0, 17, 70001, 5, 129]


def _run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cynag.bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _tensors(rng, dtype, sizes=SIZES):
    def draw():
        return [rng.standard_normal(n).astype(dtype) for n in sizes]
    return draw(), draw(), draw()


def _bits(a):
    return a.view({4: numpy.uint32, 8: numpy.uint64}[a.dtype.itemsize])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    proc = _run_cli("--quick", "--cases", "small", "--rounds", "2", "--threads", "1",
                    "--scale", "0.01", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(path) as f:
        return proc, json.load(f)


def test_cli_json_structure(small_run):
    proc, res = small_run
    assert res["tool"] == "cynag.bench"
    for key in ("cpu", "usable_cpus", "openmp", "numpy", "cynag", "python", "thread_config"):
        assert key in res["machine"], key
    s = res["settings"]
    assert s["threads"] == [1] and s["rounds"] == 2 and s["cases"] == ["small"]
    (case,) = res["cases"]
    assert case["name"] == "small" and case["n_tensors"] == 2000
    assert case["elements"] == 2000          # 64 elements scaled by 0.01: 1 each
    assert case["bytes_per_step"] == 5 * 4 * case["elements"]
    keys = {r["key"] for r in case["rows"]}
    assert {"probe", "c_loop", "cynag_update", "numpy"} <= keys
    for r in case["rows"]:
        assert r["threads"] == 1
        assert len(r["samples_s"]) == 2 and all(x > 0 for x in r["samples_s"])
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["reps_per_sample"] >= 1
        assert r["frac_probe"] > 0 and r["speedup_numpy"] > 0
        assert math.isclose(r["gbps"], case["bytes_per_step"] / r["median_s"] / 1e9)
    # Every variant ran or says why not.
    assert keys | set(case["skipped"]) == {k for k, _ in bench.VARIANTS}
    for o in case["overhead"]:
        assert o["threads"] == 1 and o["reference"] in ("cynag_kernel", "c_loop")
        assert math.isclose(o["overhead_s"], o["update_s"] - o["reference_s"])
    assert res["recommendation"]["num_threads"] is None   # one thread count only
    assert res["format"] == 2 and case["kind"] == "same_grads"


def test_cli_user_path_json(small_run):
    """The new-gradients table: every variant ran or says why not; floors and ratios."""
    _, res = small_run
    (case,) = res["user_path"]
    assert case["name"] == "small" and case["kind"] == "new_grads"
    assert case["n_tensors"] == 2000 and case["elements"] == 2000
    rows = {r["key"]: r for r in case["rows"]}
    assert {"cynag_on_cynag", "floor_cynag"} <= set(rows)
    assert set(rows) | set(case["skipped"]) == {k for k, _ in bench.USER_VARIANTS}
    for key in ("cynag_on_chainer", "chainer_update", "floor_chainer"):   # chainer or why not
        assert (key in rows) == (bench.import_chainer()[0] is not None)
    for r in case["rows"]:
        assert r["threads"] == 1 and len(r["samples_s"]) == 2 and r["median_s"] > 0
        floor = rows.get(bench.FLOOR_OF.get(r["key"]))
        if floor is None:
            assert r["over_floor_s"] is None
        else:
            assert math.isclose(r["over_floor_s"], r["median_s"] - floor["median_s"])
        if "chainer_update" in rows and not r["key"].startswith("floor_"):
            assert r["speedup_chainer"] > 0


def test_cli_output(small_run):
    proc, _ = small_run
    out = proc.stdout
    assert "AMD" in out or "machine :" in out
    assert "== small: 2000 tensors of 64" in out
    for col in ("time/step", "GB/s", "%probe", "vs numpy"):
        assert col in out
    assert "probe 3R+2W" in out and "C loop" in out and "cynag update()" in out
    assert "where the time goes" in out
    assert "round 1/2" in proc.stderr            # progress goes to stderr
    # The step as training runs it comes first, the idealized one after.
    titles = [line for line in out.splitlines() if line.startswith("== small: ")]
    assert len(titles) == 2
    assert "-- new gradient arrays every step, as in training" in titles[0]
    assert "-- same gradient arrays every step (idealized)" in titles[1]
    same = out.index(titles[1])
    for text in ("cynag update() on cynag.Link", "Python floor, cynag.Link", "over floor"):
        assert out.index(text) < same


def test_cli_threads_sweep_and_recommendation(tmp_path):
    path = tmp_path / "out.json"
    proc = _run_cli("--quick", "--cases", "small", "--rounds", "1", "--threads", "1,2",
                    "--scale", "0.01", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(path.read_text())["recommendation"]
    assert rec["threads_compared"] == 2
    pts = rec["sweep"]["points"]
    assert [p["size"] for p in pts] == [int(n * 0.01) for n in bench.SWEEP_SIZES]
    assert all(p["t1_s"] > 0 and p["tn_s"] > 0 and p["speedup"] > 0 for p in pts)
    assert rec["num_threads"] in (1, 2)
    assert "recommended: CYNAG_NUM_THREADS=" in proc.stdout


@pytest.mark.parametrize("argv", [["--cases", "nope"], ["--threads", "0"],
                                  ["--threads", "x"], ["--rounds", "0"], ["--dtype", "int8"],
                                  ["--scale", "-1"], ["--e2e", "--cases", "small"],
                                  ["--cases", "mlp-wide"], ["--e2e", "--mpi"],
                                  ["--e2e", "--e2e-iterations", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert bench.main(["--quick", "--cases", "small,medium", "--rounds", "1", "--threads", "1",
                       "--scale", "0.002", "--no-sweep", "--plot", str(png)]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_import_pyplot", lambda: None)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--plot", "x.png"])
    assert e.value.code == 2
    assert 'pip install "cynag[bench]"' in capsys.readouterr().err


def test_e2e_cases():
    assert bench.parse_args(["--e2e"]).cases == list(bench.bench_e2e.MODELS)
    assert bench.parse_args(["--e2e", "--cases", "convnet,mlp-wide"]).cases == [
        "mlp-wide", "convnet"]


def test_timed_leaves_the_fresh_gradients_out():
    calls = []

    def fresh():
        calls.append(None)
        time.sleep(0.01)
    assert bench.timed(lambda: None, 3, fresh) < 0.005
    assert len(calls) == 3


class _CynagOnly:
    K = cynag_kernels
    chainer, chainer_note = None, "not used"


def test_user_path_gives_new_gradient_arrays_every_step():
    """fresh() gives every parameter a new array with the same values, and
    update() on them computes what update() on the same arrays does."""
    shapes = bench.case_shapes("small", 0.05)[:50]
    dtype = numpy.dtype(numpy.float32)
    grads = bench.make_grads(shapes, dtype, seed=0)
    steps, (link, opt), _, fresh = bench.build_user_cynag_on_cynag(
        _CynagOnly, shapes, dtype, grads, (1,))
    ref_steps, (ref_link, _), _ = bench.build_cynag_update(_CynagOnly, shapes, dtype, grads,
                                                           (1,))
    seen = []   # kept alive, so that no new array can reuse an old one's address
    for _ in range(3):
        fresh()
        params = list(link.params())
        assert all(p.grad is not g and numpy.array_equal(p.grad, g)
                   for p, g in zip(params, grads))
        assert not {id(p.grad) for p in params} & {id(g) for g in seen}
        seen += [p.grad for p in params]
        steps[1][1]()
        ref_steps[1][1]()
    for a, b in zip(link.params(), ref_link.params()):
        assert numpy.array_equal(_bits(a.array), _bits(b.array))
    with pytest.raises(bench.Skip):
        bench.build_user_chainer_update(_CynagOnly, shapes, dtype, grads, (1,))


def test_resnet50_shapes():
    assert len(bench.RESNET50_SHAPES) == 161
    assert sum(math.prod(s) for s in bench.RESNET50_SHAPES) == 25_557_032


def test_recommend_picks_the_size_from_which_threads_always_win():
    class Env:
        threads = (1, 4)
    speedups = [0.3, 0.8, 1.2, 1.05, 1.15, 1.5, 1.9]
    sweep = {"threads": 4, "points": [{"size": 2 ** (12 + i), "t1_s": 1e-5 * s, "tn_s": 1e-5,
                                       "speedup": s} for i, s in enumerate(speedups)]}
    rec = bench.recommend(Env, sweep, [])
    assert rec["num_threads"] == 4 and rec["parallel_threshold"] == 2 ** 16
    assert "CYNAG_NUM_THREADS=4 CYNAG_PARALLEL_THRESHOLD=65536" in "\n".join(rec["text"])
    for p in sweep["points"]:
        p["speedup"] = 0.9
    rec = bench.recommend(Env, sweep, [])
    assert rec["num_threads"] == 1 and rec["parallel_threshold"] is None
    assert not rec["big_helps"]


# ---------------------------------------------------------------------------
# The probe extension
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_c_loop_is_bit_identical_to_the_kernel(dtype, threads):
    rng = numpy.random.default_rng(7)
    params, grads, vs = _tensors(rng, dtype)
    ref_p, ref_v = [p.copy() for p in params], [v.copy() for v in vs]
    table = _probe.NesterovTable(params, grads, vs, 0.01, 0.9)
    assert table.n_tensors == len(SIZES) and table.size == sum(SIZES)
    assert table.dtype == numpy.dtype(dtype)
    for _ in range(3):
        table.run(threads)
        for p, g, v in zip(ref_p, grads, ref_v):
            cynag_kernels.nesterov_ag_cpu(p, g, v, 0.01, 0.9, num_threads=1)
    for got, want in zip(params + vs, ref_p + ref_v):
        assert numpy.array_equal(_bits(got), _bits(want))
    assert table.coefficients == tuple(
        float(c) for c in cynag_kernels.nesterov_ag_coefficients(0.01, 0.9, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_triad_touches_every_element_once(dtype, threads):
    rng = numpy.random.default_rng(3)
    a, b, c = _tensors(rng, dtype)
    a0, b0 = [x.copy() for x in a], [x.copy() for x in b]
    table = _probe.TriadTable(a, b, c, 0.5)
    table.run(threads)
    s = numpy.dtype(dtype).type(0.5)
    for x, x0, y, y0, z in zip(a, a0, b, b0, c):
        assert numpy.array_equal(x, x0 + s * z)
        assert numpy.array_equal(y, y0 + s * z)
    assert table.nbytes_per_run == 5 * numpy.dtype(dtype).itemsize * sum(SIZES)


def test_probe_on_many_small_tensors_and_empty_lists():
    rng = numpy.random.default_rng(0)
    params, grads, vs = _tensors(rng, numpy.float32, [64] * 2000)
    ref_p, ref_v = [p.copy() for p in params], [v.copy() for v in vs]
    _probe.NesterovTable(params, grads, vs, 0.01, 0.9).run(2)
    for p, g, v in zip(ref_p, grads, ref_v):
        cynag_kernels.nesterov_ag_cpu(p, g, v, 0.01, 0.9)
    assert all(numpy.array_equal(x, y) for x, y in zip(params + vs, ref_p + ref_v))
    empty = _probe.NesterovTable([], [], [], 0.01, 0.9)
    empty.run(2)
    assert empty.size == 0 and empty.n_tensors == 0
    _probe.empty_region(2)
    assert isinstance(_probe.openmp_enabled(), bool)


def test_probe_rejects_what_it_cannot_walk():
    f32 = numpy.zeros(8, numpy.float32)
    ok = [numpy.zeros(8, numpy.float32) for _ in range(3)]
    with pytest.raises(ValueError, match="grads has 2 arrays but params has 1"):
        _probe.NesterovTable([ok[0]], [ok[1], f32], [ok[2]], 0.01, 0.9)
    with pytest.raises(TypeError, match="dtype"):
        _probe.NesterovTable([ok[0]], [ok[1].astype(numpy.float64)], [ok[2]], 0.01, 0.9)
    with pytest.raises(TypeError, match="float32 or float64"):
        _probe.TriadTable([ok[0].astype(numpy.float16)], [ok[1]], [ok[2]])
    with pytest.raises(ValueError, match="contiguous"):
        _probe.NesterovTable([numpy.zeros(16, numpy.float32)[::2]], [ok[1]], [ok[2]], 0.01, 0.9)
    with pytest.raises(ValueError, match="shape"):
        _probe.NesterovTable([ok[0]], [numpy.zeros(9, numpy.float32)], [ok[2]], 0.01, 0.9)
    ro = ok[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _probe.NesterovTable([ro], [ok[1]], [ok[2]], 0.01, 0.9)
    _probe.NesterovTable([ok[0]], [ro], [ok[2]], 0.01, 0.9)      # a read-only grad is fine
    with pytest.raises(ValueError, match="overlap"):
        _probe.NesterovTable([ok[0]], [ok[1]], [ok[0]], 0.01, 0.9)
    with pytest.raises(TypeError, match="ndarray"):
        _probe.TriadTable([[0.0] * 8], [ok[1]], [ok[2]])


# ---------------------------------------------------------------------------
# The optimizer-hook case
# ---------------------------------------------------------------------------
def test_hook_case_is_not_in_the_default_run():
    assert "resnet50-hooks" in bench.CASES and "resnet50-hooks" not in bench.DEFAULT_CASES
    assert bench.parse_args([]).cases == bench.DEFAULT_CASES
    assert bench.parse_args(["--cases", "resnet50-hooks,small"]).cases == [
        "small", "resnet50-hooks"]
    assert bench.CASES["resnet50-hooks"][1] == bench.RESNET50_SHAPES


def test_hook_case_runs_on_shrunken_sizes(tmp_path):
    path = tmp_path / "hooks.json"
    proc = _run_cli("--quick", "--cases", "resnet50-hooks", "--rounds", "2", "--threads",
                    "1,2", "--scale", "0.001", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(path.read_text())
    (case,) = res["cases"]
    assert case["name"] == "resnet50-hooks" and case["kind"] == "hooks"
    assert case["n_tensors"] == 161 and case["orders"] == ["wd,clip", "clip,wd"]
    assert (case["weight_decay"], case["clip_threshold"]) == (5e-4, 1.0)
    rows = {(r["key"], r["threads"]): r for r in case["rows"]}
    expected = {("restore", 1)} | {("cynag_nohooks", t) for t in (1, 2)} | {
        ("%s|%s" % (kind, order), t) for kind in ("cynag_update", "cynag_loop")
        for order in ("wd,clip", "clip,wd") for t in (1, 2)}
    assert expected <= set(rows)
    for order in ("wd,clip", "clip,wd"):
        key = "chainer_update|" + order
        assert (key, 1) in rows or key in case["skipped"]
    for r in case["rows"]:
        assert len(r["samples_s"]) == 2 and all(x > 0 for x in r["samples_s"])
        assert r["median_s"] > 0 and r["reps_per_sample"] >= 1
        if r["key"] != "restore":
            assert math.isclose(r["minus_restore_s"],
                                r["median_s"] - rows[("restore", 1)]["median_s"])
        if r["kind"] == "cynag_update":
            assert r["speedup_loop"] > 0 and r["hooks_cost_s"] is not None
        if r["kind"] in ("cynag_loop", "chainer_update", "restore", "cynag_nohooks"):
            assert r["speedup_loop"] is None
    # What folds: the clipping after the decay; both the other way round.
    assert rows[("cynag_update|wd,clip", 1)]["note"] == "GradientClipping folded into the pass"
    assert rows[("cynag_update|clip,wd", 1)]["note"] == "both hooks folded into the pass"
    out = proc.stdout
    assert "== resnet50-hooks: ResNet-50's 161 parameters, NesterovAG + WeightDecay(5e-4)" in out
    for col in ("time/step", "-restore", "hooks cost", "vs loop", "vs chainer"):
        assert col in out
    assert "cynag per-param" in out and "restore grads" in out
    assert "threads sweep" not in proc.stderr       # no sweep for hook cases alone
    assert res["recommendation"]["sweep"] is None


def test_hook_case_variants_compute_the_same_step():
    """The cynag variants of the hook case run the same arithmetic: after the same
    number of steps their parameters are equal (bit for bit)."""
    class Env:
        K = cynag_kernels
        chainer, chainer_note = None, "not used"
    shapes = bench.case_shapes("resnet50-hooks", 0.0005)
    dtype = numpy.dtype(numpy.float32)
    source = numpy.concatenate([g.reshape(-1) for g in bench.make_grads(shapes, dtype, 0)])
    for _, order in bench.HOOK_ORDERS:
        runs = []
        for builder in (bench.build_hook_cynag_update, bench.build_hook_cynag_loop):
            steps, (link, opt, buf), _ = builder(Env, shapes, dtype, source, (1,), order)
            for _ in range(4):
                steps[1][1]()
            runs.append([p.array.copy() for p in link.params()])
        for a, b in zip(*runs):
            assert numpy.array_equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------
# With Chainer, in its own environment (tests/chainer_env.py)
# ---------------------------------------------------------------------------
def _run_chainer_cli(chainer_python, cwd, *args, env=None):
    from chainer_env import clean_env

    return subprocess.run([chainer_python, "-m", "cynag.bench", *args], capture_output=True,
                          text=True, timeout=600, env=clean_env(env), cwd=str(cwd))


@pytest.mark.chainer
def test_user_path_on_a_chainer_link(chainer_python, tmp_path):
    path = tmp_path / "out.json"
    proc = _run_chainer_cli(chainer_python, tmp_path, "--quick", "--cases", "small",
                            "--rounds", "2", "--threads", "1", "--scale", "0.01", "--no-sweep",
                            "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (case,) = json.loads(path.read_text())["user_path"]
    rows = {r["key"]: r for r in case["rows"]}
    assert {"cynag_on_chainer", "chainer_update", "cynag_on_cynag", "floor_chainer",
            "floor_cynag"} <= set(rows)
    assert rows["chainer_update"]["speedup_chainer"] == 1.0
    for key in ("cynag_on_chainer", "cynag_on_cynag"):
        assert rows[key]["speedup_chainer"] > 0
    assert rows["cynag_on_chainer"]["floor_s"] == rows["floor_chainer"]["median_s"]
    assert "cynag update() on chainer.Link" in proc.stdout
    assert "chainer update() on chainer.Link" in proc.stdout


@pytest.mark.chainer
def test_e2e_runs_each_optimizer_in_its_own_process(chainer_python, tmp_path):
    path = tmp_path / "e2e.json"
    proc = _run_chainer_cli(chainer_python, tmp_path, "--e2e", "--quick", "--rounds", "1",
                            "--e2e-iterations", "2", "--cases", "mlp-wide,convnet",
                            "--json", str(path), env={"OMP_WAIT_POLICY": "passive"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(path.read_text())
    assert res["mode"] == "e2e" and not res["failures"]
    models = {m["name"]: m for m in res["e2e"]}
    assert set(models) == {"mlp-wide", "convnet"}
    assert models["mlp-wide"]["n_params"] == 42 and models["convnet"]["n_params"] == 10
    pids = set()
    for m in models.values():
        assert m["ratio_iter"] > 0 and m["ratio_optimizer"] > 0
        for which in ("chainer", "cynag"):
            (run,) = m["runs"][which]
            assert len(run["iter_s"]) == 2 and all(t > 0 for t in run["iter_s"])
            assert math.isfinite(run["final_loss"])
            assert run["env"] == {"OMP_WAIT_POLICY": "passive"}   # passed on as is
            assert run["cynag_path"] == res["machine"]["cynag_path"]
            pids.add(run["pid"])
            s = m["optimizers"][which]
            assert 0 < s["optimizer_s"] < s["iter_s"] and 0 < s["optimizer_share"] < 1
    assert len(pids) == 4
    assert "chainer / cynag: time per iteration x" in proc.stdout
