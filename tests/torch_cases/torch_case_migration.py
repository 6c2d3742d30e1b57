"""Chainer optimizer state into and out of cynag.torch.NesterovAG, against real Chainer."""
import io

import numpy as np
import pytest
import torch

import cynag.torch as ct

import chainer  # noqa: E402 (the torch environment has Chainer 7.8.1)
import chainer.links as L  # noqa: E402

LR, M = 0.05, 0.8


class CNet(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(4, 3)
            self.bn = L.BatchNormalization(3)
            self.l2 = L.Linear(3, 2)

    def forward(self, x):
        return self.l2(self.bn(self.l1(x)))


class TNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.l2 = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.l2(self.bn(self.l1(x)))


def _chainer_model(seed=0):
    rng = np.random.RandomState(seed)
    model = CNet()
    model(np.zeros((2, 4), np.float32))  # initialize
    for _, p in sorted(model.namedparams()):
        p.array[...] = rng.standard_normal(p.shape).astype(np.float32)
    return model


def _torch_model(cmodel):
    model = TNet()
    params = dict(cmodel.namedparams())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(params["/" + ct.torch_to_chainer_name(name, model)].array))
    return model


def _grads(cmodel, seed):
    rng = np.random.RandomState(seed)
    return {path: rng.standard_normal(p.shape).astype(np.float32)
            for path, p in sorted(cmodel.namedparams())}


def _chainer_step(cmodel, copt, grads):
    for path, p in cmodel.namedparams():
        p.grad = grads[path].copy()
    copt.update()


def _torch_step(model, opt, grads):
    for name, p in model.named_parameters():
        p.grad = torch.from_numpy(grads["/" + ct.torch_to_chainer_name(name, model)].copy())
    opt.step()


def _assert_same_params(cmodel, model):
    params = dict(cmodel.namedparams())
    for name, p in model.named_parameters():
        path = "/" + ct.torch_to_chainer_name(name, model)
        assert np.array_equal(p.detach().numpy(), params[path].array), path


def _trained_chainer(steps=3):
    cmodel = _chainer_model()
    copt = chainer.optimizers.NesterovAG(lr=LR, momentum=M)
    copt.setup(cmodel)
    for k in range(steps):
        _chainer_step(cmodel, copt, _grads(cmodel, 100 + k))
    copt.new_epoch()
    return cmodel, copt


def test_names_map_both_ways():
    assert ct.chainer_to_torch_name("/predictor/l1/W") == "predictor.l1.weight"
    assert ct.chainer_to_torch_name("bn/gamma") == "bn.weight"
    assert ct.chainer_to_torch_name("0/beta") == "0.bias"
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert ct.torch_to_chainer_name("0.weight", model) == "0/W"
    assert ct.torch_to_chainer_name("1.weight", model) == "1/gamma"
    assert ct.torch_to_chainer_name("1.bias", model) == "1/beta"


def test_continue_training_from_a_chainer_snapshot_bit_for_bit(tmp_path):
    cmodel, copt = _trained_chainer()
    f = str(tmp_path / "opt.npz")
    chainer.serializers.save_npz(f, copt)
    model = _torch_model(cmodel)
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    ct.load_chainer_state(opt, model, f)
    assert (opt.t, opt.epoch) == (3, 1)
    for p in model.parameters():
        assert opt.state[p]["step"] == 3
    for k in range(4):
        grads = _grads(cmodel, 200 + k)
        _chainer_step(cmodel, copt, grads)
        _torch_step(model, opt, grads)
    _assert_same_params(cmodel, model)
    assert opt.t == copt.t


def test_trainer_snapshot_prefix_and_name_map(tmp_path):
    cmodel, copt = _trained_chainer()
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, copt)
    buf.seek(0)
    with np.load(buf) as npz:
        prefixed = {"updater/optimizer:main/" + k: npz[k] for k in npz.files}
    prefixed["updater/iteration"] = np.asarray(3)
    f = str(tmp_path / "snapshot.npz")
    np.savez(f, **prefixed)
    model = _torch_model(cmodel)
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    mapping = {ct.torch_to_chainer_name(n, model): n for n, _ in model.named_parameters()}
    ct.load_chainer_state(opt, model, f, name_map=mapping, path="updater/optimizer:main/")
    opt2 = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    ct.load_chainer_state(opt2, model, f, name_map=ct.chainer_to_torch_name,
                          path="updater/optimizer:main")
    for p in model.parameters():
        assert torch.equal(opt.state[p]["v"], opt2.state[p]["v"])
    params = dict(cmodel.namedparams())
    for name, p in model.named_parameters():
        path = ct.torch_to_chainer_name(name, model)
        assert np.array_equal(opt.state[p]["v"].numpy(),
                              params["/" + path].update_rule.state["v"])


def test_save_for_chainer_and_continue_there(tmp_path):
    cmodel, copt = _trained_chainer()
    model = _torch_model(cmodel)
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, copt)
    buf.seek(0)
    ct.load_chainer_state(opt, model, buf)
    grads = _grads(cmodel, 300)
    _torch_step(model, opt, grads)
    _chainer_step(cmodel, copt, grads)
    f = str(tmp_path / "from_torch.npz")
    ct.save_chainer_state(opt, model, f)
    # A fresh Chainer optimizer on a copy of the model reads it with load_npz.
    cmodel2 = _chainer_model()
    for (_, a), (_, b) in zip(sorted(cmodel2.namedparams()), sorted(cmodel.namedparams())):
        a.array[...] = b.array
    copt2 = chainer.optimizers.NesterovAG(lr=LR, momentum=M)
    copt2.setup(cmodel2)
    chainer.serializers.load_npz(f, copt2)
    assert copt2.t == copt.t and copt2.epoch == copt.epoch
    for k in range(3):
        grads = _grads(cmodel, 400 + k)
        _chainer_step(cmodel2, copt2, grads)
        _torch_step(model, opt, grads)
    _assert_same_params(cmodel2, model)


def test_save_before_any_step_loads_in_chainer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = ct.NesterovAG(model.parameters())
    f = str(tmp_path / "fresh.npz")
    ct.save_chainer_state(opt, model, f, path="updater/optimizer:main/")
    lin = L.Linear(3, 2)
    copt = chainer.optimizers.NesterovAG()
    copt.setup(lin)
    chainer.serializers.load_npz(f, copt, path="updater/optimizer:main/")
    assert copt.t == 0


@pytest.mark.parametrize("bad", ["shape", "dtype", "missing", "extra", "no_t"])
def test_loading_is_all_or_nothing(tmp_path, bad):
    cmodel, copt = _trained_chainer()
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, copt)
    buf.seek(0)
    with np.load(buf) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if bad == "shape":
        arrays["l2/W/v"] = np.zeros((3, 3), np.float32)
    elif bad == "dtype":
        arrays["l2/b/v"] = arrays["l2/b/v"].astype(np.float64)
    elif bad == "missing":
        del arrays["l2/b/t"], arrays["l2/b/v"]
    elif bad == "extra":
        arrays["l3/W/t"] = np.asarray(1)
        arrays["l3/W/v"] = np.zeros(2, np.float32)
    else:
        del arrays["t"]
    model = _torch_model(cmodel)
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    x = torch.randn(2, 4)
    model(x).sum().backward()
    opt.step()
    before = {id(p): opt.state[p]["v"].clone() for p in model.parameters()}
    with pytest.raises((KeyError, ValueError)):
        ct.load_chainer_state(opt, model, arrays)
    assert opt.t == 1 and opt.epoch == 0
    for p in model.parameters():
        assert torch.equal(opt.state[p]["v"], before[id(p)]) and opt.state[p]["step"] == 1


def test_frozen_part_strict_false_skips_it_strict_refuses(tmp_path):
    """A frozen l1 (not in the optimizer): strict=False loads the rest, strict refuses."""
    cmodel, copt = _trained_chainer()
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, copt)
    model = _torch_model(cmodel)
    held = [p for n, p in model.named_parameters() if not n.startswith("l1.")]
    opt = ct.NesterovAG(held, lr=LR, momentum=M)
    buf.seek(0)
    with pytest.raises(KeyError, match="l1"):
        ct.load_chainer_state(opt, model, buf)
    assert opt.t == 0 and not opt.state
    buf.seek(0)
    ct.load_chainer_state(opt, model, buf, strict=False)
    params = dict(cmodel.namedparams())
    for name, p in model.named_parameters():
        if name.startswith("l1."):
            assert p not in opt.state
        else:
            path = "/" + ct.torch_to_chainer_name(name, model)
            assert np.array_equal(opt.state[p]["v"].numpy(), params[path].update_rule.state["v"])
            assert opt.state[p]["step"] == 3


def test_rules_saved_without_state_reset_the_parameters_state(tmp_path):
    """l2's rules never updated in Chainer (disabled): the file has their t, no v.
    Loading into a torch optimizer that has stepped drops l2's state; both then
    continue with the same bits."""
    cmodel = _chainer_model()
    copt = chainer.optimizers.NesterovAG(lr=LR, momentum=M)
    copt.setup(cmodel)
    cmodel.l2.disable_update()
    for k in range(2):
        _chainer_step(cmodel, copt, _grads(cmodel, 100 + k))
    cmodel.l2.enable_update()
    buf = io.BytesIO()
    chainer.serializers.save_npz(buf, copt)
    buf.seek(0)
    with np.load(buf) as npz:
        assert "l2/W/t" in npz.files and "l2/W/v" not in npz.files
    model = _torch_model(cmodel)
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    for k in range(3):
        _torch_step(model, opt, _grads(cmodel, 500 + k))
    with torch.no_grad():  # back to Chainer's parameters
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(
                dict(cmodel.namedparams())["/" + ct.torch_to_chainer_name(name, model)].array))
    buf.seek(0)
    ct.load_chainer_state(opt, model, buf)
    assert model.l2.weight not in opt.state and model.l2.bias not in opt.state
    assert opt.state[model.l1.weight]["step"] == 2
    for k in range(3):
        grads = _grads(cmodel, 200 + k)
        _chainer_step(cmodel, copt, grads)
        _torch_step(model, opt, grads)
    _assert_same_params(cmodel, model)
    assert opt.state[model.l2.weight]["step"] == cmodel.l2.W.update_rule.t == 3


class _Tied(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.enc = L.Linear(3, 3)
            self.dec = chainer.Link()
        with self.dec.init_scope():
            self.dec.W = self.enc.W  # one parameter, two paths


class _TTied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 3)
        self.dec = torch.nn.Module()
        self.dec.weight = self.enc.weight


def test_tied_weights_both_ways(tmp_path):
    cmodel = _Tied()
    copt = chainer.optimizers.NesterovAG(lr=LR, momentum=M)
    copt.setup(cmodel)
    for k in range(2):
        for p in cmodel.params():
            p.grad = np.full(p.shape, 0.5 + k, np.float32)
        copt.update()
    f = str(tmp_path / "tied.npz")
    chainer.serializers.save_npz(f, copt)
    model = _TTied()
    with torch.no_grad():
        model.enc.weight.copy_(torch.from_numpy(cmodel.enc.W.array))
        model.enc.bias.copy_(torch.from_numpy(cmodel.enc.b.array))
    opt = ct.NesterovAG(model.parameters(), lr=LR, momentum=M)
    ct.load_chainer_state(opt, model, f)  # strict: dec/W has its parameter
    assert opt.state[model.enc.weight]["step"] == cmodel.enc.W.update_rule.t
    assert np.array_equal(opt.state[model.enc.weight]["v"].numpy(),
                          cmodel.enc.W.update_rule.state["v"])
    out = str(tmp_path / "back.npz")
    ct.save_chainer_state(opt, model, out)
    with np.load(out) as npz:
        assert {"enc/W/v", "dec/W/v", "enc/b/v"} <= set(npz.files)
    copt2 = chainer.optimizers.NesterovAG(lr=LR, momentum=M)
    copt2.setup(_Tied())
    chainer.serializers.load_npz(out, copt2)  # Chainer reads every path


def test_bfloat16_state_saved_as_float32_and_loaded_back(tmp_path):
    """NumPy has no bfloat16: save_chainer_state writes a bfloat16 v as float32
    (exactly) and load_chainer_state converts it back, bit for bit."""
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2).bfloat16()
    opt = ct.NesterovAG(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, dtype=torch.bfloat16)).float().square().sum().backward()
        opt.step()
    f = str(tmp_path / "bf16.npz")
    ct.save_chainer_state(opt, model, f)
    with np.load(f) as z:
        assert z["W/v"].dtype == np.float32
    opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
    ct.load_chainer_state(opt2, model, f)
    for p in model.parameters():
        assert opt2.state[p]["v"].dtype == torch.bfloat16
        assert torch.equal(opt2.state[p]["v"], opt.state[p]["v"])
        assert opt2.state[p]["step"] == 2


class _LayerScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.full((3,), 0.1))
        self.W = torch.nn.Parameter(torch.ones(2, 3))
        self.b = torch.nn.Parameter(torch.zeros(2))


class _MyBN(torch.nn.BatchNorm1d):
    pass


def _stepped(model, steps=2):
    opt = ct.NesterovAG(model.parameters(), lr=0.1)
    for k in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5 + k)
        opt.step()
    return opt


def test_parameters_literally_named_like_chainer_round_trip(tmp_path):
    """A parameter called gamma (LayerScale), W or b is saved under its own
    name and loaded back without a name_map."""
    model = torch.nn.Sequential(_LayerScale())
    opt = _stepped(model)
    f = str(tmp_path / "ls.npz")
    ct.save_chainer_state(opt, model, f)
    with np.load(f) as z:
        assert {"0/gamma/v", "0/W/v", "0/b/v"} <= set(z.files)
    opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
    ct.load_chainer_state(opt2, model, f)
    for p in model.parameters():
        assert torch.equal(opt2.state[p]["v"], opt.state[p]["v"])


def test_batchnorm_subclass_saved_with_chainer_names_and_read_by_chainer(tmp_path):
    tmodel = torch.nn.Sequential(torch.nn.Linear(4, 3), _MyBN(3))
    opt = _stepped(tmodel)
    f = str(tmp_path / "bn.npz")
    ct.save_chainer_state(opt, tmodel, f)
    with np.load(f) as z:
        assert {"1/gamma/v", "1/beta/v", "0/W/v", "0/b/v"} <= set(z.files)
    cmodel = chainer.Sequential(L.Linear(4, 3), L.BatchNormalization(3))
    copt = chainer.optimizers.NesterovAG(lr=0.1).setup(cmodel)
    chainer.serializers.load_npz(f, copt)
    assert copt.target[1].gamma.update_rule.t == 2


def test_counts_must_be_whole_numbers(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = _stepped(model)
    f = str(tmp_path / "ok.npz")
    ct.save_chainer_state(opt, model, f)
    with np.load(f) as z:
        arrays = dict(z)
    for key in ("W/t", "t", "epoch"):
        bad = dict(arrays)
        bad[key] = np.asarray(2.7)
        opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="whole number"):
            ct.load_chainer_state(opt2, model, bad)
        assert not opt2.state and opt2.t == 0


def test_save_with_a_partial_name_map_refuses_before_writing(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = _stepped(model)
    f = tmp_path / "partial.npz"
    with pytest.raises(KeyError, match="'bias'"):
        ct.save_chainer_state(opt, model, str(f), name_map={"weight": "W"})
    assert not f.exists()
    ct.save_chainer_state(opt, model, str(f), name_map={"weight": "W", "bias": None})
    with np.load(str(f)) as z:
        assert "W/v" in z.files and "b/v" not in z.files


def test_dict_name_map_on_save_takes_one_name_of_a_tied_parameter(tmp_path):
    model = torch.nn.Module()
    model.emb = torch.nn.Linear(3, 3, bias=False)
    model.out = torch.nn.Linear(3, 3, bias=False)
    model.out.weight = model.emb.weight
    opt = _stepped(model)
    f = str(tmp_path / "tied.npz")
    ct.save_chainer_state(opt, model, f, name_map={"emb.weight": "emb/W"})
    with np.load(f) as z:
        assert "emb/W/v" in z.files and not any(k.startswith("out") for k in z.files)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_use_the_names_of_the_model_they_wrap(tmp_path, wrap):
    # torch.compile's and DataParallel's wrappers prefix their parameters'
    # names (_orig_mod., module.); Chainer's paths are the model's own.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    wrapped = (torch.compile(model, backend="eager") if wrap == "compile"
               else torch.nn.DataParallel(model))
    opt = ct.NesterovAG(wrapped.parameters(), lr=0.1)
    wrapped(torch.randn(2, 4)).sum().backward()
    opt.step()
    ct.save_chainer_state(opt, wrapped, str(tmp_path / "w.npz"))
    ct.save_chainer_state(opt, model, str(tmp_path / "m.npz"))
    with np.load(str(tmp_path / "w.npz")) as a, np.load(str(tmp_path / "m.npz")) as b:
        assert sorted(a.files) == sorted(b.files) == ["0/W/t", "0/W/v", "0/b/t", "0/b/v",
                                                      "epoch", "t"]
    opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
    ct.load_chainer_state(opt2, wrapped, str(tmp_path / "m.npz"))
    assert torch.equal(opt2.state[model[0].weight]["v"], opt.state[model[0].weight]["v"])


def test_a_name_map_of_the_wrappers_names_still_maps_them(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    wrapped = torch.nn.DataParallel(model)
    opt = ct.NesterovAG(wrapped.parameters(), lr=0.1)
    wrapped(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = {"module.0.weight": "l/W", "module.0.bias": "l/b"}
    ct.save_chainer_state(opt, wrapped, str(tmp_path / "w.npz"), name_map=names)
    with np.load(str(tmp_path / "w.npz")) as f:
        assert sorted(f.files) == ["epoch", "l/W/t", "l/W/v", "l/b/t", "l/b/v", "t"]
    opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
    ct.load_chainer_state(opt2, wrapped, str(tmp_path / "w.npz"),
                          name_map={v: k for k, v in names.items()})
    assert torch.equal(opt2.state[model[0].bias]["v"], opt.state[model[0].bias]["v"])
