"""cynag.torch.NesterovAG with the rest of PyTorch: GradScaler, torch.compile,
DistributedDataParallel (gloo), and OpenMP runtimes sharing the process."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import cynag.torch as ct
from torch_refs import chainer_step

HERE = os.path.dirname(os.path.abspath(__file__))


def test_grad_scaler_skips_a_step_with_inf_gradients():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = ct.NesterovAG(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(3, 4)
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.t == 1
    state = {id(p): (p.detach().clone(), opt.state[p]["v"].clone(), opt.state[p]["step"])
             for p in model.parameters()}
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)  # found inf: skipped
    scaler.update()
    assert opt.t == 1 and scaler.get_scale() < 2.0 ** 8
    for p in model.parameters():
        w, v, step = state[id(p)]
        assert torch.equal(p, w) and torch.equal(opt.state[p]["v"], v)
        assert opt.state[p]["step"] == step


def test_grad_scaler_step_equals_the_unscaled_step():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 2)
    ref = [p.detach().numpy().copy() for p in model.parameters()]
    vs = [np.zeros_like(r) for r in ref]
    opt = ct.NesterovAG(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x = torch.randn(3, 4)
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(opt)
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    scaler.step(opt)
    for r, g, v in zip(ref, grads, vs):
        chainer_step(r, g, v, 0.1, 0.9)
    for p, r in zip(model.parameters(), ref):
        assert np.array_equal(p.detach().numpy(), r)


def test_compiled_model_trains():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    opt = ct.NesterovAG(model.parameters(), lr=0.05, momentum=0.9)
    opt_e = ct.NesterovAG(eager.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    losses = []
    for _ in range(20):
        for m, o in ((compiled, opt), (eager, opt_e)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import cynag.torch as ct

    def main(rank, world, port, out):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = ct.NesterovAG(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(5):
            x = torch.randn(4, 6, generator=g)
            opt.zero_grad()
            ddp(x).square().sum().backward()
            opt.step()
        torch.save([p.detach() for p in model.parameters()], out % rank)
        dist.destroy_process_group()

    if __name__ == "__main__":
        world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        torch.multiprocessing.spawn(main, args=(world, port, out), nprocs=world, join=True)
""")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = str(tmp_path / "params_%d.pt")
    proc = subprocess.run([sys.executable, str(script), "2", str(_free_port()), out],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    p0 = torch.load(out % 0, weights_only=True)
    p1 = torch.load(out % 1, weights_only=True)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)  # every rank applies the same averaged gradients
    # The same run in one process, with the gradients averaged by hand.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = ct.NesterovAG(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(5):
        grads = []
        for gen in gens:
            x = torch.randn(4, 6, generator=gen)
            model.zero_grad()
            model(x).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    for a, p in zip(p0, model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=1e-6, atol=1e-7)


OMP_SCRIPT = textwrap.dedent("""
    import os, sys, json
    first = sys.argv[1]
    if first == "torch":
        import torch
        import cynag, cynag.torch as ct
    else:
        import cynag, cynag.torch as ct
        import torch
    torch.set_num_threads(2)
    x = torch.randn(256, 256)
    p = torch.nn.Parameter(torch.randn(200000))
    opt = ct.NesterovAG([p], lr=0.01)
    for _ in range(5):
        y = x @ x                      # PyTorch's threads
        p.grad = torch.randn(200000)
        opt.step()                      # cynag's threads
    print(json.dumps({"torch_threads": torch.get_num_threads(),
                      "cynag_threads": cynag.get_num_threads(),
                      "finite": bool(torch.isfinite(p).all())}))
""")


@pytest.mark.parametrize("first", ["torch", "cynag"])
def test_openmp_runtimes_share_the_process(tmp_path, first):
    script = tmp_path / "omp.py"
    script.write_text(OMP_SCRIPT)
    env = dict(os.environ, CYNAG_NUM_THREADS="1")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(script), first], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Each library keeps its own setting, whichever was imported first.
    assert result == {"torch_threads": 2, "cynag_threads": 1, "finite": True}


def test_bench_torch_rows():
    proc = subprocess.run([sys.executable, "-m", "cynag.bench", "--torch", "--cases", "small",
                           "--scale", "0.02", "--quick", "--threads", "1", "--rounds", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    labels = ("torch fused SGD ", "cynag.torch NesterovAG ", "torch fused SGD, weight decay ",
              "cynag.torch, weight decay ", "Python floor, torch ")
    rows = [line for line in proc.stdout.splitlines() if line.startswith(labels)]
    assert sorted(label for line in rows for label in labels
                  if line.startswith(label)) == sorted(labels), proc.stdout[-4000:]
    assert "failed" not in proc.stdout
    # The rows say when the Python reader was timed; with a native reader they
    # time it, not the steps taken while it was built (CYNAG_TORCH_NATIVE=background).
    cynag_rows = [line for line in rows if line.startswith("cynag.torch")]
    python_reader = os.environ.get("CYNAG_TORCH_NATIVE", "background") == "0"
    assert all(("Python reader" in line) == python_reader for line in cynag_rows), \
        proc.stdout[-4000:]


@pytest.mark.skipif(os.environ.get("CYNAG_TORCH_NATIVE") == "0",
                    reason="the Python reader only (CYNAG_TORCH_NATIVE=0)")
def test_bench_torch_times_the_native_reader_of_a_first_run(tmp_path):
    """A first run builds the native reader in the background; the rows time it."""
    env = dict(os.environ, CYNAG_TORCH_NATIVE="background",
               TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "cynag.bench", "--torch", "--cases", "small",
                           "--scale", "0.02", "--quick", "--threads", "1", "--rounds", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("cynag.torch")]
    assert len(rows) == 2 and not any("reader" in line for line in rows), proc.stdout[-4000:]
    # The build was waited for: its library is in the cache, not left half-built.
    built = [n for n in os.listdir(str(tmp_path / "cynag")) if n.endswith((".so", ".pyd"))]
    assert built, os.listdir(str(tmp_path / "cynag"))


def test_bench_e2e_torch():
    proc = subprocess.run([sys.executable, "-m", "cynag.bench", "--e2e", "--torch",
                           "--cases", "mlp-wide", "--quick", "--rounds", "1",
                           "--e2e-iterations", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "torch / cynag_torch: time per iteration" in proc.stdout, proc.stdout[-4000:]
    assert "failed" not in proc.stdout


DTENSOR_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    import torch, torch.distributed as dist
    import cynag.torch as ct
    warnings.simplefilter("ignore")
    from torch.distributed.tensor import distribute_tensor, Shard
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    for with_state in (False, True):
        plain = torch.nn.Parameter(torch.zeros(3))
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        opt = ct.NesterovAG([plain, p], lr=0.1)
        if with_state:
            opt.state[p] = {"v": distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]),
                            "step": 1}
        plain.grad = torch.ones(3)
        p.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        try:
            opt.step()
        except TypeError as e:
            assert "['params'][1]" in str(e) and "DTensor" in str(e), str(e)
        else:
            raise AssertionError("a DTensor parameter was not refused")
        assert torch.equal(plain.detach(), torch.zeros(3)) and opt.t == 0
        assert plain not in opt.state or not opt.state[plain]
    dist.destroy_process_group()
    print("ok")
""")


def test_dtensor_parameters_refused_before_any_change(tmp_path):
    """A DTensor (FSDP2, tensor parallelism) has no memory the step can address:
    refused naming the parameter, with or without a state, nothing changed."""
    script = tmp_path / "dtensor.py"
    script.write_text(DTENSOR_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(_free_port())],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-4000:]
