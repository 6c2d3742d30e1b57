"""Checkpoints: the serialization protocol, NPZ files and plain dictionaries.

Requirements tested (Chainer 7.8.1's ``chainer.serializers`` semantics, plus
cynag's three guarantees):

* the protocol (Serializer / Deserializer, ``serializer(key, value)``,
  ``serializer[name]`` with '/'-stripping), the keys written by
  ``Optimizer.serialize``, ``UpdateRule.serialize`` and ``Link.serialize``;
* ``save_npz`` / ``load_npz`` round trips that resume training bit for bit;
* ``serialize(obj, copy=...)`` / ``deserialize`` on plain dictionaries;
* no pickle written, pickled files refused unless ``allow_pickle=True``;
* atomic save (temporary file + rename, nothing left behind on a crash);
* all-or-nothing load: a bad file raises an exception naming the key and
  leaves the optimizer and the model exactly as they were.  The bad key is
  placed LATE in the load order, so that a loader assigning as it goes would
  already have changed earlier values.

Chainer itself is not imported here (test_chainer_parity.py compares with it).
"""
import io
import os
import pathlib
import struct
import zipfile

import numpy
import pytest

import cynag
from cynag import serializers as S
from cynag.optimizers import NesterovAG
from cynag.serializer import AbstractSerializer, Deserializer, Serializer
from oracle import assert_same_bits

F32 = numpy.float32

OPT_KEYS = ["t", "epoch",
            "l1/W/t", "l1/W/v", "l1/b/t", "l1/b/v",
            "l2/W/t", "l2/W/v", "l2/b/t", "l2/b/v"]
MODEL_KEYS = ["l1/W", "l1/b", "l1/count", "l2/W", "l2/b", "l2/avg"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_chain(seed=0, uninit_l2w=False):
    """Chain l1 (W, b, persistent int 'count'), l2 (W, b, persistent array 'avg')."""
    rng = numpy.random.RandomState(seed)
    m = cynag.Chain()
    with m.init_scope():
        m.l1 = cynag.Link()
        m.l2 = cynag.Link()
    with m.l1.init_scope():
        m.l1.W = cynag.Parameter(rng.randn(4, 3).astype(F32))
        m.l1.b = cynag.Parameter(rng.randn(3).astype(F32))
    with m.l2.init_scope():
        m.l2.W = cynag.Parameter() if uninit_l2w else cynag.Parameter(rng.randn(3, 2).astype(F32))
        m.l2.b = cynag.Parameter(rng.randn(2).astype(F32))
    m.l1.add_persistent("count", 0)
    m.l2.add_persistent("avg", numpy.zeros(2, F32))
    return m


def make_chainlist(seed=0):
    rng = numpy.random.RandomState(seed)
    links = []
    for shape in ((3, 2), (2,)):
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(rng.randn(*shape).astype(F32))
        links.append(link)
    return cynag.ChainList(*links)


def set_grads(model, step):
    rng = numpy.random.RandomState(1000 + step)
    for _, p in model.namedparams():
        if p.array is not None:
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def train(model, opt, start, stop):
    for step in range(start, stop):
        set_grads(model, step)
        opt.update()
        model.l1.count += 1
        model.l2.avg += F32(0.5)
        if step % 3 == 2:
            opt.new_epoch()


def trained(seed=0, steps=5, lr=0.05, momentum=0.9):
    m = make_chain(seed)
    o = NesterovAG(lr=lr, momentum=momentum).setup(m)
    train(m, o, 0, steps)
    return m, o


def snapshot(model, opt):
    """Everything a load could change: values (copied) and array identities."""
    snap = {"opt.t": opt.t, "opt.epoch": opt.epoch}
    for path, p in model.namedparams():
        arr = p.array
        snap[path] = (arr, None if arr is None else arr.copy())
        rule = p.update_rule
        state = rule.state
        snap[path + "#rule"] = (rule.t, state,
                                None if state is None
                                else {k: (v, v.copy()) for k, v in state.items()})
    snap["count"] = model.l1.count
    snap["avg"] = (model.l2.avg, model.l2.avg.copy())
    return snap


def assert_unchanged(model, opt, snap):
    assert opt.t == snap["opt.t"]
    assert opt.epoch == snap["opt.epoch"]
    for path, p in model.namedparams():
        arr, copy = snap[path]
        assert p.array is arr, "%s: array replaced" % path
        if arr is not None:
            assert_same_bits(p.array, copy, path)
        t, state, copies = snap[path + "#rule"]
        rule = p.update_rule
        assert rule.t == t, "%s: rule.t %r != %r" % (path, rule.t, t)
        assert rule.state is state, "%s: state dict replaced" % path
        if state is None:
            assert rule.state is None
        else:
            assert sorted(rule.state) == sorted(copies)
            for k, (v, vc) in copies.items():
                assert rule.state[k] is v, "%s: state %s replaced" % (path, k)
                assert_same_bits(v, vc, path + "/" + k)
    assert model.l1.count == snap["count"] and type(model.l1.count) is type(snap["count"])
    avg, avgc = snap["avg"]
    assert model.l2.avg is avg
    assert_same_bits(avg, avgc, "avg")


def assert_same_training_state(m1, o1, m2, o2):
    """Bit-identical parameters, states, rule.t, t, epoch and persistents."""
    assert (o1.t, o1.epoch) == (o2.t, o2.epoch)
    p1, p2 = dict(m1.namedparams()), dict(m2.namedparams())
    assert sorted(p1) == sorted(p2)
    for path in p1:
        a, b = p1[path], p2[path]
        assert_same_bits(b.array, a.array, path)
        assert a.update_rule.t == b.update_rule.t, path
        sa, sb = a.update_rule.state, b.update_rule.state
        assert (sa is None) == (sb is None), path
        if sa is not None:
            assert sorted(sa) == sorted(sb)
            for k in sa:
                assert_same_bits(sb[k], sa[k], path + "/" + k)
    assert m1.l1.count == m2.l1.count
    assert_same_bits(m2.l2.avg, m1.l2.avg, "avg")


def npz_bytes(obj, compression=True):
    bio = io.BytesIO()
    S.save_npz(bio, obj, compression=compression)
    return bio.getvalue()


def read_npz_dict(data):
    with numpy.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_npz(d, compression=False):
    """An NPZ file of ``d`` written by numpy itself (pickles object arrays)."""
    bio = io.BytesIO()
    (numpy.savez_compressed if compression else numpy.savez)(bio, **d)
    return bio.getvalue()


def folder_listing(path):
    return sorted(os.listdir(path))


class Recorder(Serializer):
    """A Serializer that records the full keys in call order."""

    def __init__(self, path="", log=None):
        self.path = path
        self.log = [] if log is None else log

    def __getitem__(self, key):
        return Recorder(self.path + key.strip("/") + "/", self.log)

    def __call__(self, key, value):
        self.log.append(self.path + key.lstrip("/"))
        return value


# ---------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------
class TestProtocol:
    def test_base_classes(self):
        assert issubclass(Serializer, AbstractSerializer)
        assert issubclass(Deserializer, AbstractSerializer)
        assert issubclass(S.DictionarySerializer, Serializer)
        assert issubclass(S.NpzDeserializer, Deserializer)
        assert not issubclass(S.NpzDeserializer, Serializer)
        with pytest.raises(NotImplementedError):
            AbstractSerializer()("k", 1)
        with pytest.raises(NotImplementedError):
            AbstractSerializer()["k"]
        assert issubclass(S.CheckpointError, ValueError)

    def test_save_and_load_call_serialize(self):
        calls = []

        class Obj:
            def serialize(self, s):
                calls.append(s)

        ser = Recorder()
        ser.save(Obj())
        assert calls == [ser]
        de = S.NpzDeserializer({})
        Deserializer.load(de, Obj())
        assert calls[-1] is de

    def test_dictionary_serializer_paths(self):
        s = S.DictionarySerializer()
        a = numpy.arange(3, dtype=F32)
        assert s["/a/"]["b/"]("/c", a) is a
        s("top", 3)
        s["x"]("none", None)
        assert s.target["a/b/c"] is a  # the array itself, as in Chainer
        assert s.target["top"].shape == () and int(s.target["top"]) == 3
        assert s.target["x/none"].dtype == object and s.target["x/none"][()] is None
        assert sorted(s.target) == ["a/b/c", "top", "x/none"]
        assert s["/a/"].path == "a/"
        assert S.DictionarySerializer(path="p/")["q"].path == "p/q/"

    def test_npz_deserializer_paths(self):
        d = {"a/b/c": numpy.arange(3, dtype=F32), "t": numpy.asarray(4)}
        de = S.NpzDeserializer(d)
        out = numpy.zeros(3, F32)
        assert de["/a/"]["/b/"]("/c", out) is out
        assert_same_bits(out, d["a/b/c"])
        assert de("t", 0) == 4 and type(de("t", 0)) is int
        fresh = de["a"]["b"]("c", None)
        assert_same_bits(fresh, d["a/b/c"])
        assert fresh is not d["a/b/c"]

    def test_optimizer_keys_chain_in_order(self):
        m, o = trained(steps=2)
        rec = Recorder()
        rec.save(o)
        assert rec.log == OPT_KEYS
        d = S.serialize(o)
        assert sorted(d) == sorted(OPT_KEYS)
        assert int(d["t"]) == 2 and int(d["epoch"]) == 0
        assert int(d["l2/b/t"]) == 2
        assert d["l1/W/v"].shape == (4, 3) and d["l1/W/v"].dtype == F32

    def test_optimizer_keys_chainlist(self):
        m = make_chainlist()
        o = NesterovAG().setup(m)
        assert sorted(S.serialize(o)) == ["0/W/t", "1/W/t", "epoch", "t"]
        for _, p in m.namedparams():
            p.grad = numpy.ones_like(p.array)
        o.update()
        assert sorted(S.serialize(o)) == ["0/W/t", "0/W/v", "1/W/t", "1/W/v", "epoch", "t"]
        assert sorted(S.serialize(m)) == ["0/W", "1/W"]

    def test_optimizer_keys_before_update(self):
        m = make_chain()
        o = NesterovAG().setup(m)
        d = S.serialize(o)
        assert sorted(d) == sorted(k for k in OPT_KEYS if not k.endswith("/v"))
        assert all(int(d[k]) == 0 for k in d)

    def test_link_keys_and_aliasing(self):
        m = make_chain()
        rec = Recorder()
        rec.save(m)
        assert rec.log == MODEL_KEYS
        d = S.serialize(m)
        assert d["l1/W"] is m.l1.W.array
        assert d["l2/avg"] is m.l2.avg
        assert int(d["l1/count"]) == 0

    def test_rule_serialize_creates_state_from_checkpoint(self):
        m, o = trained(steps=3)
        d = S.serialize(o, copy=True)
        m2 = make_chain(seed=7)
        o2 = NesterovAG(lr=0.05).setup(m2)
        assert all(p.update_rule.state is None for p in m2.params())
        S.deserialize(d, o2)
        assert o2.t == 3
        for path, p in m2.namedparams():
            key = path.lstrip("/")
            assert p.update_rule.t == 3
            v = p.update_rule.state["v"]
            assert_same_bits(v, d[key + "/v"], key)
            assert v is not d[key + "/v"]  # a copy, not the dictionary's array

    def test_rule_state_stays_none_when_checkpoint_has_none(self):
        # A checkpoint written before any update has no 'v' keys.
        m = make_chain()
        o = NesterovAG(lr=0.05).setup(m)
        o.t, o.epoch = 4, 2  # something to load
        for p in m.params():
            p.update_rule.t = 4
        d = S.serialize(o, copy=True)
        assert not any(k.endswith("/v") for k in d)
        m2 = make_chain()
        o2 = NesterovAG(lr=0.05).setup(m2)
        S.deserialize(d, o2, strict=False)
        assert (o2.t, o2.epoch) == (4, 2)
        for p in m2.params():
            assert p.update_rule.t == 4
            assert p.update_rule.state is None
        # the state is created at the first update, as for a fresh optimizer
        m3 = make_chain()
        o3 = NesterovAG(lr=0.05).setup(m3)
        S.deserialize(d, o3, strict=False)
        set_grads(m2, 0)
        o2.update()
        set_grads(m3, 0)
        o3.update()
        for p in m2.params():
            assert p.update_rule.state["v"].dtype == F32
        assert_same_training_state(m2, o2, m3, o3)

    def test_rule_state_none_value_keeps_state_none(self):
        # A None value in the file (Chainer's way) also leaves the state None.
        m = make_chain()
        o = NesterovAG().setup(m)
        d = S.serialize(o, copy=True)
        d["l1/W/v"] = numpy.asarray(None)
        S.deserialize(d, o, strict=False)
        assert m.l1.W.update_rule.state is None

    def test_missing_state_key_strict_enabled_rule_is_keyerror(self):
        # As in Chainer: under strict=True an enabled rule needs its state keys.
        m = make_chain()
        o = NesterovAG().setup(m)
        d = S.serialize(o, copy=True)
        m2, o2 = make_chain(), None
        o2 = NesterovAG().setup(m2)
        snap = snapshot(m2, o2)
        with pytest.raises(KeyError) as ei:
            S.deserialize(d, o2)
        assert "l1/W/v" in str(ei.value)
        assert_unchanged(m2, o2, snap)

    def test_disabled_rule_tolerates_missing_key(self):
        m = make_chain()
        o = NesterovAG(lr=0.05).setup(m)
        m.l2.b.update_rule.enabled = False
        train(m, o, 0, 4)
        d = S.serialize(o, copy=True)
        assert "l2/b/v" not in d and "l2/b/t" in d
        m2 = make_chain()
        o2 = NesterovAG(lr=0.05).setup(m2)
        m2.l2.b.update_rule.enabled = False
        S.deserialize(d, o2)  # strict
        assert m2.l2.b.update_rule.state is None
        assert_same_bits(m2.l2.W.update_rule.state["v"], d["l2/W/v"])
        # the enabled counterpart refuses, naming the key, and changes nothing
        m3 = make_chain()
        o3 = NesterovAG(lr=0.05).setup(m3)
        snap = snapshot(m3, o3)
        with pytest.raises(KeyError, match="l2/b/v"):
            S.deserialize(d, o3)
        assert_unchanged(m3, o3, snap)

    def test_link_load_initializes_uninitialized_parameter(self):
        m, o = trained(steps=2)
        data = npz_bytes(m)
        m2 = make_chain(seed=3, uninit_l2w=True)
        assert m2.l2.W.array is None
        S.load_npz(io.BytesIO(data), m2)
        assert m2.l2.W.shape == (3, 2) and m2.l2.W.dtype == F32
        assert_same_bits(m2.l2.W.array, m.l2.W.array)

    def test_uninitialized_parameter_saved_without_pickle(self):
        m = make_chain(uninit_l2w=True)
        data = npz_bytes(m)
        d = read_npz_dict(data)
        assert "l2/W" not in d
        assert list(d[S.NONE_KEYS]) == ["l2/W"]
        m2 = make_chain(seed=5, uninit_l2w=True)
        S.load_npz(io.BytesIO(data), m2)
        assert m2.l2.W.array is None
        assert_same_bits(m2.l1.W.array, m.l1.W.array)

    @pytest.mark.parametrize("value, blank", [
        (3, 0), (2.5, 0.0), (True, False), (numpy.float32(1.5), numpy.float32(0)),
        (numpy.int64(4), numpy.int64(0)), (numpy.arange(3.0), numpy.zeros(3)),
        (numpy.array(2.0), numpy.array(0.0)), (None, None)])
    def test_persistent_round_trip(self, value, blank):
        link = cynag.Link()
        link.add_persistent("p", value)
        link2 = cynag.Link()
        link2.add_persistent("p", blank)
        before = link2.p
        S.load_npz(io.BytesIO(npz_bytes(link)), link2)
        if isinstance(value, numpy.ndarray):
            assert link2.p is before  # loaded in place
            assert_same_bits(link2.p, value)
        else:
            assert link2.p == value and type(link2.p) is type(value)

    def test_str_persistent_round_trip(self):
        # Chainer saves a str persistent as a '<U' array (no pickle) and loads
        # it back with str(array); cynag saves it too, so it must load it.
        link = cynag.Link()
        link.add_persistent("label", "abc")
        data = npz_bytes(link)
        assert read_npz_dict(data)["label"].dtype.kind == "U"
        link2 = cynag.Link()
        link2.add_persistent("label", "xyz")
        S.load_npz(io.BytesIO(data), link2)
        assert link2.label == "abc"


# ---------------------------------------------------------------------------
# save_npz / load_npz round trips
# ---------------------------------------------------------------------------
class TestRoundTrip:
    @pytest.mark.parametrize("how", ["str", "pathlib", "fileobj"])
    @pytest.mark.parametrize("compression", [True, False])
    def test_resume_is_bit_identical(self, tmp_path, how, compression):
        ref_m = make_chain()
        ref_o = NesterovAG(lr=0.05, momentum=0.9).setup(ref_m)
        train(ref_m, ref_o, 0, 12)

        m = make_chain()
        o = NesterovAG(lr=0.05, momentum=0.9).setup(m)
        train(m, o, 0, 7)
        mp, op = tmp_path / "model.npz", tmp_path / "opt.npz"
        if how == "fileobj":
            with open(mp, "wb") as f:
                S.save_npz(f, m, compression)
            with open(op, "wb") as f:
                S.save_npz(f, o, compression=compression)
        else:
            conv = str if how == "str" else pathlib.Path
            S.save_npz(conv(mp), m, compression=compression)
            S.save_npz(conv(op), o, compression)
        with zipfile.ZipFile(op) as z:
            types = {i.compress_type for i in z.infolist()}
        assert types == {zipfile.ZIP_DEFLATED if compression else zipfile.ZIP_STORED}

        m2 = make_chain(seed=99, uninit_l2w=True)  # other values, l2.W not initialized
        o2 = NesterovAG(lr=0.05, momentum=0.9).setup(m2)
        if how == "fileobj":
            with open(mp, "rb") as f:
                S.load_npz(f, m2)
            with open(op, "rb") as f:
                S.load_npz(f, o2)
        else:
            conv = str if how == "str" else pathlib.Path
            S.load_npz(conv(mp), m2)
            S.load_npz(conv(op), o2)
        assert (o2.t, o2.epoch) == (7, 2)
        assert_same_training_state(m, o, m2, o2)
        train(m2, o2, 7, 12)
        assert_same_training_state(ref_m, ref_o, m2, o2)

    def test_resume_into_trained_objects(self, tmp_path):
        # Loading into objects that already trained (state exists) also resumes exactly.
        ref_m, ref_o = trained(steps=9)
        m, o = trained(steps=4)
        S.save_npz(tmp_path / "m.npz", m)
        S.save_npz(tmp_path / "o.npz", o)
        m2, o2 = trained(seed=3, steps=6)
        S.load_npz(tmp_path / "m.npz", m2)
        S.load_npz(tmp_path / "o.npz", o2)
        train(m2, o2, 4, 9)
        assert_same_training_state(ref_m, ref_o, m2, o2)

    def test_one_file_with_paths(self, tmp_path):
        m, o = trained(steps=5)
        s = S.DictionarySerializer()
        s["model"].save(m)
        s["/optimizer/"].save(o)
        assert "optimizer/l2/b/v" in s.target and "model/l2/avg" in s.target
        path = tmp_path / "snapshot.npz"
        S.save_npz(path, s.target)
        m2 = make_chain(seed=4)
        o2 = NesterovAG(lr=0.05).setup(m2)
        S.load_npz(path, m2, path="model/")
        S.load_npz(path, o2, path="optimizer/")
        assert_same_training_state(m, o, m2, o2)
        # without path= the keys are not found
        m3 = make_chain(seed=4)
        o3 = NesterovAG(lr=0.05).setup(m3)
        snap = snapshot(m3, o3)
        with pytest.raises(KeyError):
            S.load_npz(path, o3)
        assert_unchanged(m3, o3, snap)

    def test_written_file_is_complete_and_pickle_free(self, tmp_path):
        m, o = trained(steps=3)
        for obj, keys in ((o, OPT_KEYS), (m, MODEL_KEYS)):
            for compression in (True, False):
                path = tmp_path / ("f%d.npz" % compression)
                S.save_npz(path, obj, compression=compression)
                with zipfile.ZipFile(path) as z:
                    assert z.testzip() is None
                    assert sorted(z.namelist()) == sorted(k + ".npy" for k in keys)
                with numpy.load(path, allow_pickle=False) as z:
                    got = {k: z[k] for k in z.files}  # every key readable without pickle
                ref = S.serialize(obj)
                for k in keys:
                    assert got[k].dtype != object
                    assert_same_bits(got[k], numpy.asarray(ref[k]), k)
        assert folder_listing(tmp_path) == ["f0.npz", "f1.npz"]  # no temporary files

    def test_save_npz_overwrites(self, tmp_path):
        path = tmp_path / "c.npz"
        m, o = trained(steps=2)
        S.save_npz(path, o)
        train(m, o, 2, 4)
        S.save_npz(path, o)
        with numpy.load(path) as z:
            assert int(z["t"]) == 4
        assert folder_listing(tmp_path) == ["c.npz"]

    def test_new_file_has_default_permissions(self, tmp_path):
        # Chainer's save_npz opens the path with open(file, 'wb'): the file is
        # created with mode 0o666 & ~umask.  The atomic save must not make the
        # checkpoint private (tempfile.mkstemp creates files with mode 0o600).
        umask = os.umask(0)
        os.umask(umask)
        path = tmp_path / "m.npz"
        S.save_npz(path, make_chain())
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------
# plain dictionaries
# ---------------------------------------------------------------------------
class TestDict:
    def test_copy_false_aliases(self):
        m, o = trained(steps=2)
        d = S.serialize(o)
        dm = S.serialize(m, copy=False)
        assert d["l1/W/v"] is m.l1.W.update_rule.state["v"]
        assert dm["l1/W"] is m.l1.W.array
        before = d["l1/W/v"].copy()
        train(m, o, 2, 3)
        assert not numpy.array_equal(d["l1/W/v"], before)  # live arrays
        assert_same_bits(d["l1/W/v"], m.l1.W.update_rule.state["v"])

    def test_copy_true_snapshot_and_restore(self):
        m, o = trained(steps=4)
        snap_o = S.serialize(o, copy=True)
        snap_m = S.serialize(m, copy=True)
        frozen = {k: v.copy() for k, v in list(snap_o.items()) + list(snap_m.items())}
        params = dict(m.namedparams())
        for k, v in snap_o.items():
            if k.endswith("/v"):
                assert not numpy.shares_memory(v, params["/" + k[:-2]].update_rule.state["v"])
        for k, v in snap_m.items():
            if "/" + k in params:
                assert not numpy.shares_memory(v, params["/" + k].array)
        ref_m, ref_o = trained(steps=4)
        train(m, o, 4, 8)
        train(ref_m, ref_o, 4, 8)
        for k, v in list(snap_o.items()) + list(snap_m.items()):
            assert_same_bits(v, frozen[k], k)  # unaffected by training
        # restore the snapshot into the trained objects and replay
        S.deserialize(snap_m, m)
        S.deserialize(snap_o, o)
        assert o.t == 4
        train(m, o, 4, 8)
        assert_same_training_state(ref_m, ref_o, m, o)
        # the snapshot is still independent of the restored objects
        for k, v in list(snap_o.items()) + list(snap_m.items()):
            assert_same_bits(v, frozen[k], k)

    def test_deserialize_into_fresh_objects(self):
        m, o = trained(steps=5)
        d_m, d_o = S.serialize(m, copy=True), S.serialize(o, copy=True)
        m2 = make_chain(seed=8, uninit_l2w=True)
        o2 = NesterovAG(lr=0.05).setup(m2)
        S.deserialize(d_m, m2)
        S.deserialize(d_o, o2)
        assert_same_training_state(m, o, m2, o2)

    def test_deserialize_is_all_or_nothing(self):
        m, o = trained(steps=5)
        d = S.serialize(o, copy=True)
        d["l2/b/v"] = numpy.zeros(7, F32)
        m2, o2 = trained(seed=2, steps=2)
        snap = snapshot(m2, o2)
        with pytest.raises(S.CheckpointError, match="l2/b/v"):
            S.deserialize(d, o2)
        assert_unchanged(m2, o2, snap)

    def test_deserialize_path_and_ignore(self):
        m, o = trained(steps=3)
        s = S.DictionarySerializer()
        s["opt"].save(o)
        m2, o2 = trained(seed=2, steps=1)
        keep = m2.l2.b.update_rule.state["v"].copy()
        S.deserialize(s.target, o2, path="opt/", ignore_names="opt/l2/b/v")
        assert o2.t == 3
        assert_same_bits(m2.l2.b.update_rule.state["v"], keep)
        assert_same_bits(m2.l2.W.update_rule.state["v"], m.l2.W.update_rule.state["v"])


# ---------------------------------------------------------------------------
# safe loading: no pickle
# ---------------------------------------------------------------------------
class TestPickle:
    def chainer_like_file(self, tmp_path, l2w_value=None):
        """What Chainer writes for a model whose l2.W is uninitialized."""
        m = make_chain(seed=0)
        d = {k: numpy.array(v) for k, v in S.serialize(m).items()}
        d["l2/W"] = numpy.asarray(None) if l2w_value is None else l2w_value
        path = tmp_path / "chainer.npz"
        numpy.savez(path, **d)
        return path, m

    def test_pickled_none_refused(self, tmp_path):
        path, _ = self.chainer_like_file(tmp_path)
        m2 = make_chain(seed=1)
        o2 = NesterovAG().setup(m2)
        snap = snapshot(m2, o2)
        with pytest.raises(S.CheckpointError) as ei:
            S.load_npz(path, m2)
        assert isinstance(ei.value, ValueError)
        assert "l2/W" in str(ei.value) and "allow_pickle=True" in str(ei.value)
        assert_unchanged(m2, o2, snap)

    def test_pickled_none_loads_with_allow_pickle(self, tmp_path):
        path, m = self.chainer_like_file(tmp_path)
        m2 = make_chain(seed=1, uninit_l2w=True)
        S.load_npz(path, m2, allow_pickle=True)
        assert m2.l2.W.array is None  # None -> stays uninitialized
        assert_same_bits(m2.l1.W.array, m.l1.W.array)
        assert_same_bits(m2.l2.b.array, m.l2.b.array)
        assert m2.l1.count == m.l1.count

    def test_pickled_object_array_refused(self, tmp_path):
        path, _ = self.chainer_like_file(
            tmp_path, l2w_value=numpy.array([1, "x", None], dtype=object))
        m2 = make_chain(seed=1)
        o2 = NesterovAG().setup(m2)
        snap = snapshot(m2, o2)
        with pytest.raises(ValueError) as ei:
            S.load_npz(path, m2)
        assert "l2/W" in str(ei.value) and "allow_pickle=True" in str(ei.value)
        assert_unchanged(m2, o2, snap)

    def test_save_object_array_is_typeerror_and_file_untouched(self, tmp_path):
        path = tmp_path / "c.npz"
        m, o = trained(steps=2)
        S.save_npz(path, o)
        data, st = path.read_bytes(), os.stat(path)
        with pytest.raises(TypeError, match="bad"):
            S.save_npz(path, {"t": numpy.asarray(1), "bad": numpy.array([1, "a"], dtype=object)})
        link = cynag.Link()
        link.add_persistent("bad", {"a": 1})
        with pytest.raises(TypeError, match="bad"):
            S.save_npz(path, link)
        with pytest.raises(TypeError):
            S.save_npz(str(path), {"x": numpy.asarray(object())}, compression=False)
        assert path.read_bytes() == data
        assert os.stat(path).st_ino == st.st_ino and os.stat(path).st_mtime_ns == st.st_mtime_ns
        assert folder_listing(tmp_path) == ["c.npz"]

    def test_save_dict_with_none_is_pickle_free(self, tmp_path):
        path = tmp_path / "d.npz"
        S.save_npz(path, {"a": numpy.ones(2, F32), "n": numpy.asarray(None), "m": None})
        with numpy.load(path, allow_pickle=False) as z:
            assert sorted(z.files) == sorted(["a", S.NONE_KEYS])
            assert sorted(z[S.NONE_KEYS]) == ["m", "n"]

    def test_reserved_key(self, tmp_path):
        with pytest.raises(ValueError):
            S.save_npz(tmp_path / "r.npz", {S.NONE_KEYS: numpy.ones(1)})
        assert folder_listing(tmp_path) == []


# ---------------------------------------------------------------------------
# atomic save: nothing lost
# ---------------------------------------------------------------------------
class TestAtomicSave:
    def good_checkpoint(self, tmp_path):
        m, o = trained(steps=3)
        path = tmp_path / "opt.npz"
        S.save_npz(path, o)
        return m, o, path, path.read_bytes()

    def check_previous_intact(self, tmp_path, path, data, m, o):
        assert folder_listing(tmp_path) == ["opt.npz"], "temporary files left behind"
        assert path.read_bytes() == data
        m2 = make_chain(seed=6)
        o2 = NesterovAG(lr=0.05).setup(m2)
        S.load_npz(path, o2)
        assert o2.t == 3
        assert_same_bits(m2.l2.b.update_rule.state["v"], m.l2.b.update_rule.state["v"])

    @pytest.mark.parametrize("compression", [True, False])
    @pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
    def test_crash_in_numpy_writer(self, tmp_path, monkeypatch, compression, exc):
        m, o, path, data = self.good_checkpoint(tmp_path)
        real = numpy.savez_compressed if compression else numpy.savez
        seen = []

        def partial_writer(file, *args, **kwds):
            bio = io.BytesIO()
            real(bio, *args, **kwds)
            full = bio.getvalue()
            file.write(full[: len(full) // 2])  # part of the data, then the crash
            seen.append(file)
            raise exc

        monkeypatch.setattr(numpy, "savez_compressed" if compression else "savez",
                            partial_writer)
        train(m, o, 3, 5)
        with pytest.raises(type(exc)):
            S.save_npz(path, o, compression=compression)
        assert seen, "the writer was not called"
        monkeypatch.undo()
        self.check_previous_intact(tmp_path, path, data, *trained(steps=3))

    def test_crash_in_file_write(self, tmp_path, monkeypatch):
        m, o, path, data = self.good_checkpoint(tmp_path)
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, f, limit):
                self._f, self._left = f, limit

            def write(self, b):
                b = bytes(b)
                if len(b) > self._left:
                    self._f.write(b[: self._left])
                    self._left = 0
                    raise OSError(28, "No space left on device")
                self._left -= len(b)
                return self._f.write(b)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()
                return False

            def __getattr__(self, name):
                return getattr(self._f, name)

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Failing(real_fdopen(*a, **k), 300))
        train(m, o, 3, 5)
        with pytest.raises(OSError):
            S.save_npz(path, o)
        monkeypatch.undo()
        self.check_previous_intact(tmp_path, path, data, *trained(steps=3))

    def test_crash_in_rename(self, tmp_path, monkeypatch):
        m, o, path, data = self.good_checkpoint(tmp_path)

        def boom(*a, **k):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", boom)
        train(m, o, 3, 5)
        with pytest.raises(OSError, match="rename failed"):
            S.save_npz(path, o)
        monkeypatch.undo()
        self.check_previous_intact(tmp_path, path, data, *trained(steps=3))

    def test_crash_on_new_path_leaves_nothing(self, tmp_path, monkeypatch):
        def boom(file, **kwds):
            file.write(b"PK\x03\x04garbage")
            raise KeyboardInterrupt

        monkeypatch.setattr(numpy, "savez_compressed", boom)
        with pytest.raises(KeyboardInterrupt):
            S.save_npz(tmp_path / "new.npz", make_chain())
        assert folder_listing(tmp_path) == []


# ---------------------------------------------------------------------------
# all-or-nothing load of bad files
# ---------------------------------------------------------------------------
def _opt_case(mutate):
    def make(src_m, src_o):
        d = read_npz_dict(npz_bytes(src_o))
        mutate(d)
        return d
    return make


def _del(key):
    def f(d):
        del d[key]
    return f


def _set(key, fn):
    def f(d):
        d[key] = fn(d[key]) if callable(fn) else fn
    return f


# (name, mutation of the optimizer file, exception, key named, applies to a fresh target)
OPT_BAD = [
    ("missing late v", _del("l2/b/v"), KeyError, "l2/b/v", True),
    ("missing late t", _del("l2/b/t"), KeyError, "l2/b/t", True),
    ("missing epoch", _del("epoch"), KeyError, "epoch", True),
    ("shape of late v", _set("l2/b/v", numpy.zeros(3, F32)), S.CheckpointError, "l2/b/v", True),
    ("0-d late v", _set("l2/b/v", numpy.zeros((), F32)), S.CheckpointError, "l2/b/v", True),
    ("int late v", _set("l2/b/v", lambda a: a.astype(numpy.int32)), S.CheckpointError,
     "l2/b/v", True),
    ("complex late v", _set("l2/b/v", lambda a: a.astype(numpy.complex64)), S.CheckpointError,
     "l2/b/v", True),
    ("str late v", _set("l2/b/v", numpy.array(["a", "b"])), S.CheckpointError, "l2/b/v", True),
    ("float late t", _set("l2/b/t", numpy.asarray(5.0)), S.CheckpointError, "'l2/b/t'", True),
    ("float t", _set("t", numpy.asarray(5.0)), S.CheckpointError, "'t'", True),
    ("float epoch", _set("epoch", numpy.asarray(1.5)), S.CheckpointError, "'epoch'", True),
    ("2-vector late t", _set("l2/b/t", numpy.array([5, 5])), S.CheckpointError, "'l2/b/t'", True),
    ("str late t", _set("l2/b/t", numpy.asarray("5")), S.CheckpointError, "'l2/b/t'", True),
]


class TestBadLoadOptimizer:
    @pytest.fixture
    def source(self):
        return trained(steps=5)

    def targets(self):
        trained_target = trained(seed=1, steps=2, lr=0.05)
        fresh_m = make_chain(seed=2, uninit_l2w=True)
        fresh = (fresh_m, NesterovAG(lr=0.05).setup(fresh_m))
        return {"trained": trained_target, "fresh": fresh}

    @pytest.mark.parametrize("name, mutate, exc, key, fresh_too", OPT_BAD,
                             ids=[c[0] for c in OPT_BAD])
    @pytest.mark.parametrize("compression", [False, True])
    def test_bad_value(self, source, name, mutate, exc, key, fresh_too, compression, tmp_path):
        d = read_npz_dict(npz_bytes(source[1]))
        mutate(d)
        path = tmp_path / "bad.npz"
        path.write_bytes(write_npz(d, compression))
        for kind, (m, o) in self.targets().items():
            if kind == "fresh" and not fresh_too:
                continue
            snap = snapshot(m, o)
            with pytest.raises(exc) as ei:
                S.load_npz(path, o)
            assert key in str(ei.value), (kind, str(ei.value))
            assert_unchanged(m, o, snap)
            # the good file still loads into the same objects afterwards
            S.load_npz(io.BytesIO(npz_bytes(source[1])), o)
            assert o.t == 5

    @pytest.mark.parametrize("where", ["l2/b/t", "epoch"])
    def test_one_element_vector_scalar(self, source, where, tmp_path):
        # A scalar stored as a 1-element vector: either loaded (as Chainer did on
        # NumPy 1.x) or refused -- but never half loaded.
        d = read_npz_dict(npz_bytes(source[1]))
        d[where] = numpy.array([int(d[where])])
        path = tmp_path / "v.npz"
        path.write_bytes(write_npz(d))
        m, o = trained(seed=1, steps=2, lr=0.05)
        snap = snapshot(m, o)
        try:
            S.load_npz(path, o)
        except Exception as e:  # refused: must be unchanged and name the key
            assert_unchanged(m, o, snap)
            assert where in str(e), str(e)
        else:
            assert o.t == 5 and o.epoch == 1 and m.l2.b.update_rule.t == 5

    def test_pickled_late_v(self, source, tmp_path):
        d = read_npz_dict(npz_bytes(source[1]))
        d["l2/b/v"] = numpy.asarray(None)
        path = tmp_path / "p.npz"
        path.write_bytes(write_npz(d))
        for kind, (m, o) in self.targets().items():
            snap = snapshot(m, o)
            with pytest.raises(S.CheckpointError) as ei:
                S.load_npz(path, o)
            assert "l2/b/v" in str(ei.value) and "allow_pickle=True" in str(ei.value)
            assert_unchanged(m, o, snap)

    def test_strict_false_keeps_missing_value(self, source, tmp_path):
        d = read_npz_dict(npz_bytes(source[1]))
        del d["l2/b/v"], d["epoch"]
        path = tmp_path / "s.npz"
        path.write_bytes(write_npz(d))
        m, o = trained(seed=1, steps=2, lr=0.05)
        v = m.l2.b.update_rule.state["v"]
        v_copy = v.copy()
        S.load_npz(path, o, strict=False)
        assert o.t == 5 and o.epoch == 0
        assert m.l2.b.update_rule.t == 5
        assert m.l2.b.update_rule.state["v"] is v
        assert_same_bits(v, v_copy)
        assert_same_bits(m.l2.W.update_rule.state["v"], source[0].l2.W.update_rule.state["v"])

    @pytest.mark.parametrize("bad", [numpy.zeros(5, F32), numpy.zeros((1, 1), F32),
                                     numpy.zeros(2, numpy.int32)])
    def test_fresh_target_checks_state_against_its_parameter(self, source, bad):
        # A rule without state has no array to load into: the stored v is
        # checked against the state the parameter would get (shape, kind of
        # number) before anything is assigned.
        d = S.serialize(source[1], copy=True)
        d["l2/b/v"] = bad
        m = make_chain(seed=2)
        o = NesterovAG(lr=0.05).setup(m)
        snap = snapshot(m, o)
        with pytest.raises(S.CheckpointError, match="l2/b/v"):
            S.deserialize(d, o)
        assert_unchanged(m, o, snap)
        S.deserialize(S.serialize(source[1], copy=True), o)   # a good one still loads
        assert o.t == 5

    def test_fresh_target_converts_state_to_the_parameter_dtype(self, source):
        # As loading into an existing state converts (numpy.copyto): a float64
        # v loaded into a fresh float32 rule becomes float32 and training
        # goes on as from a float32 checkpoint.
        d = S.serialize(source[1], copy=True)
        wide = dict(d)
        for k in d:
            if k.endswith("/v"):
                wide[k] = d[k].astype(numpy.float64)
        results = []
        for ckpt in (d, wide):
            m = make_chain(seed=2)
            o = NesterovAG(lr=0.05).setup(m)
            S.deserialize(ckpt, o)
            for _, p in m.namedparams():
                v = p.update_rule.state["v"]
                assert v.dtype == p.array.dtype and v.shape == p.array.shape
            train(m, o, 5, 8)
            results.append((m, o))
        assert_same_training_state(results[0][0], results[0][1], results[1][0], results[1][1])


class TestBadLoadModel:
    BAD = [
        ("missing late param", _del("l2/b"), KeyError, "l2/b"),
        ("missing late persistent", _del("l2/avg"), KeyError, "l2/avg"),
        ("shape of late param", _set("l2/b", numpy.zeros((2, 1), F32)), S.CheckpointError, "l2/b"),
        ("int late param", _set("l2/b", lambda a: a.astype(numpy.int64)), S.CheckpointError,
         "l2/b"),
        ("shape of persistent", _set("l2/avg", numpy.zeros(3, F32)), S.CheckpointError, "l2/avg"),
        ("float for int persistent", _set("l1/count", numpy.asarray(2.5)), S.CheckpointError,
         "l1/count"),
        ("pickled late param", _set("l2/b", numpy.asarray(None)), S.CheckpointError, "l2/b"),
    ]

    @pytest.mark.parametrize("name, mutate, exc, key", BAD, ids=[c[0] for c in BAD])
    def test_bad_value(self, name, mutate, exc, key, tmp_path):
        src_m, _ = trained(steps=4)
        d = read_npz_dict(npz_bytes(src_m))
        mutate(d)
        path = tmp_path / "bad.npz"
        path.write_bytes(write_npz(d))
        m, o = trained(seed=1, steps=2)
        snap = snapshot(m, o)
        with pytest.raises(exc) as ei:
            S.load_npz(path, m)
        assert key in str(ei.value), str(ei.value)
        assert_unchanged(m, o, snap)

    def test_bad_value_for_uninitialized_parameter(self, tmp_path):
        # A value that cannot become a float parameter, for a parameter that
        # is not initialized yet (loaded last): refused, and nothing loaded.
        src_m, _ = trained(steps=4)
        d = read_npz_dict(npz_bytes(src_m))
        del d["l2/avg"]
        d["l2/W"] = numpy.array([["a", "b"], ["c", "d"], ["e", "f"]])
        path = tmp_path / "bad.npz"
        path.write_bytes(write_npz(d))
        m = make_chain(seed=1, uninit_l2w=True)
        o = NesterovAG().setup(m)
        snap = snapshot(m, o)
        with pytest.raises(Exception) as ei:
            S.load_npz(path, m, strict=False)
        assert_unchanged(m, o, snap)
        assert "l2/W" in str(ei.value), str(ei.value)


class TestBadFiles:
    @pytest.fixture
    def good(self):
        src_m, src_o = trained(steps=5)
        return src_o, npz_bytes(src_o)

    def check_refused(self, tmp_path, data, exc=S.CheckpointError, key=None, **kw):
        m, o = trained(seed=1, steps=2, lr=0.05)
        snap = snapshot(m, o)
        path = tmp_path / "bad.npz"
        path.write_bytes(data)
        with pytest.raises(exc) as ei:
            S.load_npz(path, o, **kw)
        if key is not None:
            assert key in str(ei.value), str(ei.value)
        assert_unchanged(m, o, snap)
        with pytest.raises(exc):  # through a file object too
            S.load_npz(io.BytesIO(data), o, **kw)
        assert_unchanged(m, o, snap)
        return ei.value

    @pytest.mark.parametrize("compression", [True, False])
    def test_truncated(self, tmp_path, compression):
        m, o = trained(steps=5)
        data = npz_bytes(o, compression)
        for cut in sorted({1, 4, 30, len(data) // 3, len(data) // 2, len(data) - 23,
                           len(data) - 22, len(data) - 1}):
            self.check_refused(tmp_path, data[:cut])

    def _member_regions(self, data):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
        regions = {}
        for info in infos:
            off = info.header_offset
            fn, ex = struct.unpack("<HH", data[off + 26: off + 30])
            start = off + 30 + fn + ex
            regions[info.filename[:-4]] = (start, start + info.compress_size)
        return regions

    def _flip_each(self, tmp_path, data, key, src_o):
        start, end = self._member_regions(data)[key]
        failures = []
        m, o = trained(seed=1, steps=2, lr=0.05)
        snap = snapshot(m, o)
        for off in range(start, end):
            bad = bytearray(data)
            bad[off] ^= 0x5A
            try:
                S.load_npz(io.BytesIO(bytes(bad)), o)
            except S.CheckpointError as e:
                assert_unchanged(m, o, snap)
                if key not in str(e):
                    failures.append((off, "CheckpointError without the key: %s" % e))
            except Exception as e:  # noqa: BLE001 - we report what escaped
                assert_unchanged(m, o, snap)
                failures.append((off, "%s.%s: %s" % (type(e).__module__, type(e).__name__, e)))
            else:
                # a flip the format ignores (e.g. padding bits): data must be exact
                assert o.t == 5
                assert_same_bits(m.l2.b.update_rule.state["v"],
                                 src_o.target.l2.b.update_rule.state["v"])
                m, o = trained(seed=1, steps=2, lr=0.05)
                snap = snapshot(m, o)
        return failures

    def test_corrupted_member_stored(self, tmp_path, good):
        src_o = good[0]
        data = npz_bytes(src_o, compression=False)
        failures = self._flip_each(tmp_path, data, "l2/b/v", src_o)
        assert not failures, failures[:5]

    def test_corrupted_member_compressed(self, tmp_path, good):
        # Corrupt deflate data is reported by zlib (zlib.error), not only by
        # a CRC mismatch; either way the load must fail with a
        # CheckpointError naming the key.
        src_o, data = good
        failures = self._flip_each(tmp_path, data, "l2/b/v", src_o)
        assert not failures, "%d of the byte flips escaped: %s" % (len(failures), failures[:3])

    def test_crc_error(self, tmp_path, good):
        src_o = good[0]
        data = npz_bytes(src_o, compression=False)
        start, end = self._member_regions(data)["l2/b/v"]
        bad = bytearray(data)
        bad[end - 1] ^= 0x01  # last byte of the array data: only the CRC can tell
        err = self.check_refused(tmp_path, bytes(bad), key="l2/b/v")
        assert "CRC" in str(err)

    def test_not_a_zip(self, tmp_path):
        self.check_refused(tmp_path, b"this is not a checkpoint\n" * 10)

    def test_empty(self, tmp_path):
        self.check_refused(tmp_path, b"")

    def test_npy_instead_of_npz(self, tmp_path):
        bio = io.BytesIO()
        numpy.save(bio, numpy.arange(5, dtype=F32))
        self.check_refused(tmp_path, bio.getvalue())

    def test_missing_file(self, tmp_path):
        m, o = trained(steps=1)
        with pytest.raises(FileNotFoundError):
            S.load_npz(tmp_path / "nope.npz", o)


class TestIgnoreNames:
    @pytest.fixture
    def saved(self, tmp_path):
        src_m, src_o = trained(steps=5)
        s = S.DictionarySerializer()
        s["model"].save(src_m)
        path = tmp_path / "snap.npz"
        S.save_npz(path, s.target)
        return src_m, path

    @pytest.mark.parametrize("ignore", [
        "model/l2/b",
        lambda k: k == "model/l2/b",
        ["nothing", lambda k: k.endswith("l2/b")],
        ("model/l2/b",),
    ])
    def test_ignore(self, saved, ignore):
        src_m, path = saved
        m, o = trained(seed=1, steps=2)
        kept = m.l2.b.array.copy()
        S.load_npz(path, m, path="model/", ignore_names=ignore)
        assert_same_bits(m.l2.b.array, kept)
        assert_same_bits(m.l2.W.array, src_m.l2.W.array)
        assert m.l1.count == src_m.l1.count

    def test_ignored_key_may_be_missing_under_strict(self, tmp_path):
        src_m, _ = trained(steps=3)
        d = dict(S.serialize(src_m))
        del d["l2/b"]
        path = tmp_path / "x.npz"
        S.save_npz(path, d)
        m, o = trained(seed=1, steps=2)
        S.load_npz(path, m, ignore_names="l2/b")
        assert_same_bits(m.l1.W.array, src_m.l1.W.array)

    @pytest.mark.parametrize("bad", [5, [lambda k: False, 3.5], object()])
    def test_bad_type_is_valueerror(self, saved, bad):
        _, path = saved
        m, o = trained(seed=1, steps=2)
        snap = snapshot(m, o)
        with pytest.raises(ValueError, match="ignore_names"):
            S.load_npz(path, m, path="model/", ignore_names=bad)
        assert_unchanged(m, o, snap)


# ---------------------------------------------------------------------------
# Found in review
# ---------------------------------------------------------------------------
class _TwoStateRule(cynag.UpdateRule):
    """A rule with two state entries, to check that loading checks both."""

    def init_state(self, param):
        self.state["a"] = numpy.zeros_like(param.array)
        self.state["b"] = numpy.zeros_like(param.array)

    def update_core_cpu(self, param):
        self.state["a"] += 1


class _TwoStateMethod(cynag.GradientMethod):
    def create_update_rule(self):
        return _TwoStateRule(self.hyperparam)


@pytest.mark.parametrize("bad", ["missing", "text"])
def test_every_state_key_of_an_empty_rule_is_checked_before_assigning(bad):
    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(numpy.ones(3, numpy.float32))
    opt = _TwoStateMethod().setup(link)
    d = {"t": numpy.asarray(7), "epoch": numpy.asarray(1), "w/t": numpy.asarray(7),
         "w/a": numpy.ones(3, numpy.float32)}
    if bad == "text":
        d["w/b"] = numpy.asarray(["x", "y", "z"])
    with pytest.raises((KeyError, S.CheckpointError), match="w/b"):
        S.deserialize(d, opt)
    assert opt.t == 0 and link.w.update_rule.t == 0 and link.w.update_rule.state is None


def test_unsigned_persistent_from_signed_array_is_refused_before_assigning():
    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(numpy.ones(2, numpy.float32))
    link.add_persistent("z", numpy.zeros(2, numpy.uint32))
    d = {"w": numpy.full(2, 5, numpy.float32), "z": numpy.array([1, -1], numpy.int64)}
    with pytest.raises(TypeError, match="'z'"):
        S.deserialize(d, link)
    assert numpy.array_equal(link.w.array, numpy.ones(2, numpy.float32))


@pytest.mark.parametrize("value, stored", [(numpy.int8(1), numpy.asarray(300)),
                                           (numpy.float16(1), numpy.asarray(1e6)),
                                           (1, numpy.asarray(2.5))])
def test_scalars_need_a_safe_cast_as_in_chainer(value, stored):
    link = cynag.Link()
    link.add_persistent("s", value)
    with pytest.raises(TypeError, match="'s'"):
        S.deserialize({"s": stored}, link)
    assert link.s == value and type(link.s) is type(value)


def test_save_through_a_symlink_replaces_its_target(tmp_path):
    link = make_chain()
    real = tmp_path / "step-1.npz"
    S.save_npz(real, link)
    latest = tmp_path / "latest.npz"
    latest.symlink_to(real.name)
    train_link = make_chain(seed=3)
    S.save_npz(latest, train_link)
    assert latest.is_symlink()
    loaded = make_chain(seed=5)
    S.load_npz(real, loaded)
    for (_, a), (_, b) in zip(sorted(loaded.namedparams()), sorted(train_link.namedparams())):
        assert (a.array is None and b.array is None) or numpy.array_equal(a.array, b.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.npz", "step-1.npz"]


def test_save_with_a_long_file_name(tmp_path):
    path = tmp_path / ("c" * 240 + ".npz")
    S.save_npz(path, make_chain())
    S.load_npz(path, make_chain(seed=1))


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "x.npz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        S.save_npz(path, make_chain())


def test_npz_deserializer_used_directly_loads_state():
    model, opt = make_chain(), None
    opt = NesterovAG().setup(model)
    train(model, opt, 0, 2)
    d = S.serialize(opt, copy=True)
    fresh_model = make_chain()
    fresh = NesterovAG().setup(fresh_model)
    fresh.serialize(S.NpzDeserializer(d))
    for (_, p), (_, q) in zip(sorted(model.namedparams()), sorted(fresh_model.namedparams())):
        if p.update_rule.state is not None:
            assert numpy.array_equal(p.update_rule.state["v"], q.update_rule.state["v"])


def test_the_checking_pass_reads_strings_as_stored(tmp_path):
    """load_npz checks every value in a first pass before it assigns; a
    ``serialize`` that decodes a string it reads (Chainer's LogReport:
    ``json.loads(serializer('_log', ''))``) gets the stored string in both
    passes, and arrays are written only in the second."""
    import json

    class Log:
        def __init__(self, log):
            self.log, self.seen = log, []
            self.w = numpy.zeros(2, numpy.float32)

        def serialize(self, s):
            self.log = json.loads(s("_log", json.dumps(self.log)))
            self.seen.append((getattr(s, "checking", None), self.w.copy()))
            s("w", self.w)

    src = Log([{"loss": 1.5}])
    src.w[:] = 3
    path = str(tmp_path / "log.npz")
    cynag.serializers.save_npz(path, src)
    dst = Log([])

    def serialize(s):  # (LogReport's loading: json.loads('') would fail)
        dst.log = json.loads(s("_log", ""))
        dst.seen.append((s.checking, dst.w.copy()))
        s("w", dst.w)

    dst.serialize = serialize
    cynag.serializers.load_npz(path, dst)
    assert dst.log == [{"loss": 1.5}]
    assert [c for c, _ in dst.seen] == [True, False]
    assert (dst.seen[1][1] == 0).all() and (dst.w == 3).all()
