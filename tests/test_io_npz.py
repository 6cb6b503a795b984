"""The native .npz model format: round trips, format errors, dispatch, and a byte-mutation fuzz test."""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.io.npz import load_npz


def all_layers_net(rng):
    """A network that uses every layer kind and non-default hyper-parameters."""
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4), stride=(1, 2), padding=((1, 2), (0, 1)),
                  dilation=(2, 1)),
        dt.ReLU(),
        dt.MaxPool2d(2, stride=1, padding=(1, 0, 1, 1)),
        dt.AvgPool2d((2, 1), padding=(1, 0, 0, 0)),
        dt.SumPool2d(2, stride=1),
        dt.LpPool(3.0, kernel_size=2, stride=1),
        dt.Flatten(),
    ])


def classifier(rng):
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(3, 1, 3, 3)), rng.normal(size=3) - 0.5, padding=1), dt.ReLU(),
        dt.MaxPool2d(2), dt.AvgPool2d(2, stride=1, padding=1), dt.Flatten(),
        dt.Dense(rng.normal(size=(6, 75)), rng.normal(size=6) - 0.5), dt.ReLU(),
        dt.Dense(rng.normal(size=(4, 6)), -np.abs(rng.normal(size=4))),
    ])


def save_bytes(net, **kw):
    buf = io.BytesIO()
    dt.save(net, buf, **kw)
    return buf.getvalue()


def test_round_trip_every_layer(tmp_path, rng):
    net = all_layers_net(rng)
    dt.save(net, tmp_path / "m.npz", input_shape=(2, 9, 10))
    back = dt.load(tmp_path / "m.npz")
    assert [repr(a) for a in back] == [repr(b) for b in net]
    x = rng.normal(size=(2, 2, 9, 10))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


def test_round_trip_outputs_and_heatmaps_identical(tmp_path, rng):
    net = classifier(rng)
    path = tmp_path / "c.npz"
    dt.save(net, path)
    back = dt.load(path)
    for a, b in zip(net, back, strict=True):
        for name in ("weight", "bias"):
            if hasattr(a, name):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))  # float64 kept exactly
    x = rng.uniform(0, 1, size=(3, 1, 8, 8))
    for composite in (dt.composites.deep_taylor(0, 1), dt.composites.epsilon_plus_flat(), dt.methods.Sensitivity()):
        r1 = dt.Explainer(net, composite, backend="numpy").explain(x)
        r2 = dt.Explainer(back, composite, backend="numpy").explain(x)
        np.testing.assert_array_equal(r1.output, r2.output)
        np.testing.assert_array_equal(r1.relevance, r2.relevance)


def test_float32_exact_weights_stored_as_float32(tmp_path, rng):
    w32 = rng.normal(size=(3, 4)).astype(np.float32)
    net = dt.Sequential([dt.Dense(w32, np.zeros(3)), dt.ReLU(), dt.Dense(rng.normal(size=(2, 3)))])
    dt.save(net, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert z["node0.weight"].dtype == np.float32
        assert z["node2.weight"].dtype == np.float64  # float64 values that float32 would round
    assert dt.load(tmp_path / "m.npz")[0].weight.dtype == np.float32  # float32 weights stay float32
    np.testing.assert_array_equal(dt.load(tmp_path / "m.npz")[2].weight, net[2].weight)


# ------------------------------------------------------------------------------------------ errors


def craft(meta, arrays=None, raw_meta=None):
    """An npz with the given description (dict, or raw bytes) and arrays."""
    buf = io.BytesIO()
    payload = raw_meta if raw_meta is not None else json.dumps(meta).encode()
    np.savez(buf, __deeptaylor__=np.frombuffer(payload, dtype=np.uint8), **(arrays or {}))
    return buf.getvalue()


def dense_meta(**over):
    meta = {"format": "deeptaylor.model", "version": 1, "layers": [{"kind": "Dense", "params": {}}]}
    meta.update(over)
    return meta


GOOD = {"layer0.weight": np.ones((2, 3), np.float32), "layer0.bias": np.zeros(2, np.float32)}


def test_crafted_baseline_loads():
    net = load_npz(craft(dense_meta(), GOOD))
    assert net[0].weight.shape == (2, 3)


@pytest.mark.parametrize(("meta", "arrays", "match"), [
    (dense_meta(version=3), GOOD, "newer"),
    (dense_meta(version=0), GOOD, "invalid model format version"),
    (dense_meta(version="1"), GOOD, "integer version"),
    (dense_meta(format="other"), GOOD, "format"),
    (dense_meta(layers=[]), GOOD, "no layers"),
    (dense_meta(layers=[{"kind": "Softmax", "params": {}}]), {}, "unknown layer kind"),
    (dense_meta(layers=[{"kind": 3}]), GOOD, "kind"),
    (dense_meta(layers=[{"kind": "Dense", "params": []}]), GOOD, "params must be an object"),
    (dense_meta(layers=[{"kind": "Dense", "params": {"x": 1}}]), GOOD, "unknown parameters"),
    (dense_meta(extra=1), GOOD, "unknown fields"),
    (dense_meta(), {"layer0.weight": np.ones((2, 3))}, "missing array"),
    (dense_meta(), {**GOOD, "layer5.weight": np.ones(2)}, "no layer uses"),
    (dense_meta(), {"layer0.weight": np.ones((2, 3)), "layer0.bias": np.zeros(3)}, "inconsistent"),
    (dense_meta(), {"layer0.weight": np.ones((2, 3, 1)), "layer0.bias": np.zeros(2)}, "inconsistent"),
    (dense_meta(), {"layer0.weight": np.ones((2, 3), np.int64), "layer0.bias": np.zeros(2)}, "dtype"),
    (dense_meta(), {"layer0.weight": np.full((2, 3), np.nan), "layer0.bias": np.zeros(2)}, "NaN"),
    (dense_meta(layers=[{"kind": "Conv2d", "params": {"stride": [1, 1], "padding": [0, 0, 0], "dilation": [1, 1]}}]),
     {"layer0.weight": np.ones((2, 1, 3, 3)), "layer0.bias": np.zeros(2)}, "padding"),
    (dense_meta(layers=[{"kind": "MaxPool2d", "params": {"kernel_size": [2, True], "stride": [2, 2],
                                                        "padding": [0, 0, 0, 0]}}]), {}, "kernel_size"),
    (dense_meta(layers=[{"kind": "MaxPool2d", "params": {"kernel_size": [2, 2], "stride": [2, 10**30],
                                                        "padding": [0, 0, 0, 0]}}]), {}, "stride"),
    (dense_meta(layers=[{"kind": "LpPool", "params": {"p": "2", "kernel_size": None, "stride": None}}]), {}, "p must"),
    (dense_meta(layers=[{"kind": "MaxPool2d", "params": {"kernel_size": [2, 2]}}]), {}, "missing parameters"),
    (dense_meta(layers=[{"kind": "Dense", "params": {}}, {"kind": "ReLU"}, {"kind": "Dense", "params": {}}]),
     {**GOOD, "layer2.weight": np.ones((2, 5)), "layer2.bias": np.zeros(2)}, "do not compose"),
    (dense_meta(input_shape=[4]), GOOD, "do not compose"),
    (dense_meta(input_shape="3"), GOOD, "input_shape"),
])
def test_inconsistent_files_raise(meta, arrays, match):
    with pytest.raises(dt.ModelFormatError, match=match):
        load_npz(craft(meta, arrays))


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b'"a string"'])
def test_bad_json_raises(raw):
    with pytest.raises(dt.ModelFormatError):
        load_npz(craft(None, GOOD, raw_meta=raw))


def test_pickled_object_array_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    buf = io.BytesIO()
    np.savez(buf, __deeptaylor__=np.frombuffer(json.dumps(dense_meta()).encode(), np.uint8),
             **{"layer0.weight": np.array([Boom()], dtype=object), "layer0.bias": np.zeros(2)})
    with pytest.raises(dt.ModelFormatError, match="non-numeric dtype"):
        load_npz(buf.getvalue())


def test_huge_shape_header_is_refused_before_allocating():
    data = craft(dense_meta(), GOOD)
    zin = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            if info.filename == "layer0.weight.npy":
                body = body.replace(b"(2, 3)", b"(99999999999, 3)".ljust(6))
            zout.writestr(info.filename, body)
    with pytest.raises(dt.ModelFormatError, match="declares shape|invalid shape|header"):
        load_npz(out.getvalue())


def test_other_members_and_missing_description():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("evil.py", b"raise SystemExit")
    with pytest.raises(dt.ModelFormatError, match="unexpected archive member"):
        load_npz(out.getvalue())
    buf = io.BytesIO()
    np.savez(buf, a=np.ones(2))
    with pytest.raises(dt.ModelFormatError, match="not a deeptaylor model"):
        load_npz(buf.getvalue())


def test_load_dispatch_errors(tmp_path, rng):
    with pytest.raises(dt.ModelFormatError, match="cannot read"):
        dt.load(tmp_path / "missing.npz")
    (tmp_path / "a.npz").write_bytes(b"not a zip at all")
    with pytest.raises(dt.ModelFormatError, match="not a valid .npz"):
        dt.load(tmp_path / "a.npz")
    (tmp_path / "a.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(dt.ModelFormatError, match="unknown model format"):
        dt.load(tmp_path / "a.h5")
    # content wins over the extension: a native model saved under another name still loads
    net = classifier(rng)
    dt.save(net, tmp_path / "model.bin")
    assert len(dt.load(tmp_path / "model.bin")) == len(net)
    with pytest.raises(TypeError):
        dt.save("not a net", tmp_path / "x.npz")


def test_load_keyword_arguments_are_library_errors(tmp_path, rng):
    dt.save(classifier(rng), tmp_path / "x.npz", input_shape=(1, 8, 8))
    for kwargs, match in (({"input_shape": (1, 8, 8)}, "native deeptaylor .npz model.*input shape is stored"),
                          ({"inputshape": (1, 8, 8)}, r"unexpected keyword arguments \['inputshape'\]")):
        with pytest.raises(dt.InputTypeError, match=match):  # also a TypeError, as before
            dt.load(tmp_path / "x.npz", **kwargs)


def _mutations(data: bytes, seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip a few bytes
            for _ in range(int(rng.integers(1, 8))):
                b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            b = b[: int(rng.integers(len(b)))]
        elif kind == 2:  # insert random bytes
            pos = int(rng.integers(len(b)))
            b[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 16))).astype(np.uint8).tobytes()
        else:  # overwrite a run inside the stored .npy headers / JSON (where structure lives)
            pos = int(rng.integers(len(b) - 16))
            b[pos:pos + 8] = rng.integers(0, 256, size=8).astype(np.uint8).tobytes()
        yield bytes(b)


def test_fuzz_mutated_npz_raises_only_model_format_error(rng):
    data = save_bytes(classifier(rng), input_shape=(1, 8, 8))
    loaded = 0
    for mutated in _mutations(data, seed=2024, count=250):
        try:
            net = load_npz(mutated)
        except dt.DeepTaylorError:
            continue
        loaded += 1
        assert isinstance(net, dt.Sequential)
    assert loaded < 250  # the mutations do break files


def _json_mutations(meta, seed: int, count: int):
    """Valid JSON, wrong content: one value of the description replaced, deleted or duplicated."""
    rng = np.random.default_rng(seed)
    values = [None, True, False, -1, 0, 1, 3, 2 ** 40, 1.5, float("nan"), "x", "Dense", [], [1], [2, 2],
              [1, 1, 1, 1], [-1, 0, 0, 0], {}, {"kind": "ReLU", "params": {}}, {"kind": "Dense"}]

    def slots(node, out):
        """(container, key) of every value below ``node``."""
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            out.append((node, k))
            slots(v, out)
        return out

    for _ in range(count):
        m = json.loads(json.dumps(meta))
        where = slots(m, [])
        parent, key = where[int(rng.integers(len(where)))]
        action = rng.integers(3)
        if action == 0:
            parent[key] = values[int(rng.integers(len(values)))]
        elif action == 1:
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(key, parent[key])
        else:
            parent[f"{key}_extra"] = parent[key]
        yield json.dumps(m).encode()


def test_fuzz_crafted_json_mutations(rng):
    """Mutate the JSON description itself (zip and CRCs intact): bytes (mostly undecodable JSON), then the
    parsed values (valid JSON), so the validation code is reached. Every outcome is a network or a
    ModelFormatError, and most mutations must be rejected, for several different reasons."""
    desc = {"format": "deeptaylor.model", "version": 1, "input_shape": [1, 8, 8], "layers": [
        {"kind": "Conv2d", "params": {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1]}},
        {"kind": "ReLU", "params": {}}, {"kind": "MaxPool2d", "params": {"kernel_size": [2, 2], "stride": [2, 2],
                                                                       "padding": [0, 0, 0, 0]}},
        {"kind": "Flatten", "params": {}}, {"kind": "Dense", "params": {}}]}
    meta = json.dumps(desc).encode()
    arrays = {"layer0.weight": rng.normal(size=(3, 1, 3, 3)), "layer0.bias": np.zeros(3),
              "layer4.weight": rng.normal(size=(2, 48)), "layer4.bias": np.zeros(2)}
    assert len(load_npz(craft(None, arrays, raw_meta=meta))) == 5
    for mutations, count, min_reasons in ((_mutations(meta, seed=7, count=150), 150, 3),
                                          (_json_mutations(desc, seed=8, count=300), 300, 20)):
        rejected, reasons = 0, set()
        for mutated in mutations:
            try:
                net = load_npz(craft(None, arrays, raw_meta=mutated))
            except dt.ModelFormatError as exc:  # the loader's error for bad files, nothing else
                rejected += 1
                reasons.add(re.sub(r"[0-9]+", "#", str(exc))[:60])  # the reason, numbers aside
                continue
            assert isinstance(net, dt.Sequential)
        assert rejected >= 0.8 * count, (rejected, count)
        assert len(reasons) >= min_reasons, sorted(reasons)


# ------------------------------------------------------------------------------------- graphs (version 2)


def every_layer_graph(rng):
    """A graph with every layer class (non-default hyper-parameters), a residual Add, a Concat, a
    fan-out of 3, a gated Mul and a layer object used twice (shared weights)."""
    x = dt.Input((4, 9, 10))
    h = dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.3, rng.normal(size=4) * 0.1, stride=1, padding=((1, 1), (1, 1)),
                  groups=2)(x, name="grouped")
    h = dt.BatchNorm2d(rng.uniform(-0.1, 0.1, 4), rng.uniform(0.5, 2, 4), rng.uniform(0.5, 1.5, 4),
                       rng.normal(size=4) * 0.1, eps=1e-3)(h, name="bn")
    h = dt.LeakyReLU(0.2)(h, name="layer1.0.act")
    shared = dt.Conv2d(rng.normal(size=(4, 4, 3, 3)) * 0.2, None, padding=1, dilation=1)
    a = shared(h, name="shared_a")
    b = dt.ELU(0.7)(shared(dt.ReLU6()(h), name="shared_b"))
    r = dt.Add()(a, b, h, name="res")                     # h: fan-out of 3 (bn-act, shared_a's and res's)
    g = dt.Mul()(r, dt.Sigmoid()(dt.AdaptiveAvgPool2d((1, 1))(dt.SiLU()(r))), name="se")  # (C, 1, 1) gate
    v = dt.Dense(rng.normal(size=(2, 4)))(dt.GELU("tanh")(dt.GlobalAvgPool()(r)))
    v = dt.Mul()(dt.Hardsigmoid()(v), v)                     # a same-shape gate (ordered by the API)
    u = dt.Upsample(2)(dt.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)(g))
    u = dt.ConvTranspose2d(rng.normal(size=(4, 2, 3, 3)) * 0.3, rng.normal(size=4) * 0.1, stride=2, padding=1,
                           output_padding=1, groups=2)(u, name="up")
    u = dt.ChannelShuffle(2)(dt.Tanh()(u))
    c = dt.Concat(axis=1)(dt.Slice(1, 3)(u), dt.Hardswish()(dt.Identity()(u)), name="cat")
    c = dt.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)(c)
    c = dt.SumPool2d(2, stride=1)(dt.Dropout(0.3)(c))
    c = dt.AdaptiveAvgPool2d((3, 2))(dt.LpPool(3.0, kernel_size=2, stride=1)(c))
    f = dt.Flatten()(c)
    f = dt.BatchNorm1d(rng.uniform(-0.1, 0.1, 36), rng.uniform(0.5, 2, 36))(f)
    g2 = dt.Dense(rng.normal(size=(3, 36)).astype(np.float32), rng.normal(size=3))(f, name="head")
    out = dt.Concat()(dt.GlobalSumPool()(dt.ReLU()(g2)), g2, v)
    return dt.Graph(x, out)


def residual_graph(rng, bias=-0.1):
    x = dt.Input((3, 8, 8))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 3, 3, 3)) * 0.3, -np.abs(rng.normal(size=4)) * abs(bias),
                            padding=1)(x, name="conv1"))
    y = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 4, 3, 3)) * 0.3, -np.abs(rng.normal(size=4)) * abs(bias),
                            padding=1)(h, name="conv2"))
    y = dt.Add()(y, h, name="res")
    z = dt.Concat()(y, h, name="cat")
    out = dt.Dense(rng.normal(size=(5, 8 * 16)), -np.abs(rng.normal(size=5)) * abs(bias))(
        dt.Flatten()(dt.AvgPool2d(2)(z)), name="fc")
    return dt.Graph(x, out)


def test_every_layer_class_is_covered(rng):
    net = every_layer_graph(rng)
    assert {type(layer) for layer in net} == set(dt.layers.BUILTIN_LAYERS)


def _same_layers(a, b):
    assert a.names == b.names
    assert [n.inputs for n in a.nodes] == [n.inputs for n in b.nodes]
    for la, lb in zip(a, b, strict=True):
        assert type(la) is type(lb)
        assert repr(la) == repr(lb)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if hasattr(la, attr):
                va, vb = getattr(la, attr), getattr(lb, attr)
                np.testing.assert_array_equal(va, vb)
                assert va.dtype == vb.dtype or va.dtype == np.float64 and vb.dtype == np.float32
        for attr in ("eps", "param", "ceil_mode", "count_include_pad", "output_padding", "groups",
                     "output_size", "scale_factor", "mode", "axis", "start", "stop", "p", "padding", "stride",
                     "dilation", "kernel_size"):
            assert getattr(la, attr, None) == getattr(lb, attr, None), attr


def test_graph_round_trip_every_layer(tmp_path, rng):
    net = every_layer_graph(rng)
    dt.save(net, tmp_path / "g.npz")
    back = dt.load(tmp_path / "g.npz")
    assert type(back) is dt.Graph
    assert back.input_shape == net.input_shape == (4, 9, 10)
    _same_layers(net, back)
    assert back.nodes[net.index("shared_a")].layer is back.nodes[net.index("shared_b")].layer  # still shared
    assert repr(back) == repr(net)
    x = rng.normal(size=(2, 4, 9, 10))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    for method in (dt.methods.Sensitivity(), dt.methods.GradientXInput(), "epsilon-plus", "epsilon-alpha2-beta1"):
        r1 = dt.Explainer(net, method, backend="numpy").explain(x, target=1, return_layers=True)
        r2 = dt.Explainer(back, method, backend="numpy").explain(x, target=1, return_layers=True)
        np.testing.assert_array_equal(r1.relevance, r2.relevance)
        assert list(r1.layers) == list(r2.layers)
    assert back.node("head").layer.weight.dtype == np.float32  # float32 weights stay float32


@pytest.mark.parametrize("composite", ["deep-taylor", "epsilon-plus-flat", "epsilon-alpha2-beta1",
                                       "epsilon-gamma-box", "gradient-x-input"])
def test_residual_concat_graph_same_heatmaps(tmp_path, rng, composite):
    net = residual_graph(rng)
    path = tmp_path / "r.npz"
    dt.save(net, path)
    back = dt.load(path)
    assert type(back) is dt.Graph
    assert back.names == net.names
    x = rng.uniform(0, 1, size=(3, 3, 8, 8))
    r1 = dt.Explainer(net, composite, backend="numpy").explain(x, return_layers=True)
    r2 = dt.Explainer(back, composite, backend="numpy").explain(x, return_layers=True)
    np.testing.assert_array_equal(r1.output, r2.output)
    np.testing.assert_array_equal(r1.relevance, r2.relevance)
    assert list(r1.layers) == list(r2.layers)


def test_sequential_stays_sequential_and_graph_without_shape(tmp_path, rng):
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(2, 2, 3, 3)), groups=2), dt.BatchNorm2d(np.zeros(2), np.ones(2)),
                         dt.GELU(), dt.GlobalAvgPool(), dt.Dense(rng.normal(size=(3, 2)))])
    dt.save(net, tmp_path / "s.npz", input_shape=(4, 5, 5))
    back = dt.load(tmp_path / "s.npz")
    assert type(back) is dt.Sequential
    _same_layers(net, back)
    # a graph built from nodes without a declared input shape round-trips without one
    g = dt.Graph.from_nodes(None, residual_graph(rng).nodes)
    dt.save(g, tmp_path / "g.npz")
    assert dt.load(tmp_path / "g.npz").input_shape == ()
    dt.save(g, tmp_path / "g2.npz", input_shape=(3, 8, 8))
    assert dt.load(tmp_path / "g2.npz").input_shape == (3, 8, 8)
    with pytest.raises(dt.ShapeError, match="declared input shape"):
        dt.save(residual_graph(rng), tmp_path / "x.npz", input_shape=(3, 9, 9))


def test_unsaveable_layer_named(tmp_path, rng):
    class MyReLU(dt.ReLU):
        __slots__ = ()

    x = dt.Input((4,))
    net = dt.Graph(x, dt.Dense(rng.normal(size=(2, 4)))(MyReLU()(x, name="custom")))
    with pytest.raises(dt.ModelFormatError, match="custom.*not a built-in"):
        dt.save(net, tmp_path / "x.npz")


# ----------------------------------------------------------------------------- version 1 (0.1) files


V1_DESC = {"format": "deeptaylor.model", "version": 1, "input_shape": [1, 8, 8], "layers": [
    {"kind": "Conv2d", "params": {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1]}},
    {"kind": "ReLU", "params": {}},
    {"kind": "MaxPool2d", "params": {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0, 0, 0]}},
    {"kind": "AvgPool2d", "params": {"kernel_size": [2, 2], "stride": [1, 1], "padding": [1, 1, 1, 1]}},
    {"kind": "SumPool2d", "params": {"kernel_size": [2, 2], "stride": [1, 1], "padding": [0, 0, 0, 0]}},
    {"kind": "LpPool", "params": {"p": 2.0, "kernel_size": None, "stride": None}},
    {"kind": "Flatten", "params": {}},
    {"kind": "Dense", "params": {}},
    {"kind": "GlobalSumPool", "params": {}}]}


def test_version1_files_still_load(rng):
    """A file exactly as 0.1 wrote it (version 1, ``layers``, ``layer{i}.*`` arrays) loads as a Sequential."""
    w = rng.normal(size=(3, 1, 3, 3))
    arrays = {"layer0.weight": w.astype(np.float32), "layer0.bias": np.zeros(3, np.float32),
              "layer7.weight": rng.normal(size=(2, 1)), "layer7.bias": np.zeros(2)}
    net = load_npz(craft(V1_DESC, arrays))
    assert type(net) is dt.Sequential
    assert len(net) == 9
    assert net[0].weight.dtype == np.float32
    assert not net[2].ceil_mode
    assert net[3].count_include_pad
    np.testing.assert_array_equal(net[0].weight, w.astype(np.float32))
    # version 1 knows only the 0.1 parameters and kinds
    bad = json.loads(json.dumps(V1_DESC))
    bad["layers"][0]["params"]["groups"] = 1
    with pytest.raises(dt.ModelFormatError, match="unknown parameters"):
        load_npz(craft(bad, arrays))
    bad = json.loads(json.dumps(V1_DESC))
    bad["layers"][1] = {"kind": "Add", "params": {}}
    with pytest.raises(dt.ModelFormatError, match="unknown layer kind 'Add'"):
        load_npz(craft(bad, arrays))


def test_bundled_version1_model_loads():
    """The bundled detection model is a checked-in 0.1 (version 1) file."""
    from importlib.resources import files

    from deeptaylor.io.npz import read_npz

    data = (files("deeptaylor") / "data" / "detection_1568_400_1.npz").read_bytes()
    net, info = read_npz(data)
    assert info["version"] == 1
    assert info["network"] == "Sequential"
    assert type(net) is dt.Sequential
    assert net.output_shape((2, 1568)) == (2, 1)
    # saved again it is a version 2 file with the same network
    back = load_npz(save_bytes(net))
    _same_layers(net, back)


# ---------------------------------------------------------------------------------- bad graph files


def graph_desc():
    """A small valid version-2 graph description and its arrays: conv -> relu -> add(relu, input) ..."""
    desc = {"format": "deeptaylor.model", "version": 2, "network": "Graph", "input_shape": [2, 4, 4], "nodes": [
        {"name": "conv", "kind": "Conv2d", "inputs": [0],
         "params": {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}},
        {"name": "relu", "kind": "ReLU", "inputs": [1], "params": {}},
        {"name": "res", "kind": "Add", "inputs": [2, 0], "params": {}},
        {"name": "cat", "kind": "Concat", "inputs": [3, 2], "params": {"axis": 1}},
        {"name": "flat", "kind": "Flatten", "inputs": [4], "params": {}},
        {"name": "fc", "kind": "Dense", "inputs": [5], "params": {}}]}
    arrays = {"node0.weight": np.full((2, 2, 3, 3), 0.1), "node0.bias": np.zeros(2),
              "node5.weight": np.full((3, 64), 0.01), "node5.bias": np.zeros(3)}
    return desc, arrays


def _node(desc, name):
    return next(n for n in desc["nodes"] if n["name"] == name)


def test_graph_desc_baseline_loads():
    desc, arrays = graph_desc()
    net = load_npz(craft(desc, arrays))
    assert type(net) is dt.Graph
    assert net.names == ("conv", "relu", "res", "cat", "flat", "fc")
    assert net.input_shape == (2, 4, 4)


def _edit(fn):
    desc, arrays = graph_desc()
    fn(desc, arrays)
    return desc, arrays


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d, a: _node(d, "res").update(inputs=[2, 4]), r"node 2 'res'.*forward reference"),      # cycle
    (lambda d, a: _node(d, "res").update(inputs=[3, 0]), r"node 2 'res'.*forward reference"),      # self loop
    (lambda d, a: _node(d, "relu").update(inputs=[-1]), r"node 1 'relu'.*input -1"),
    (lambda d, a: _node(d, "relu").update(inputs=[True]), r"node 1 'relu'"),
    (lambda d, a: _node(d, "relu").update(inputs=[]), r"node 1 'relu'.*inputs must be"),
    (lambda d, a: _node(d, "relu").update(inputs="1"), r"node 1 'relu'.*inputs must be"),
    (lambda d, a: _node(d, "res").update(inputs=[2]), r"node 2 'res' \(Add\).*two or more"),      # arity
    (lambda d, a: _node(d, "relu").update(inputs=[1, 0]), r"node 1 'relu' \(ReLU\).*takes 1"),
    (lambda d, a: _node(d, "res").update(name="relu"), r"node 2 'relu'.*two nodes are named"),
    (lambda d, a: _node(d, "res").update(name="a b"), r"node 2: name must be"),
    (lambda d, a: _node(d, "res").update(name=""), r"node 2: name must be"),
    (lambda d, a: _node(d, "res").update(name=7), r"node 2: name must be"),
    (lambda d, a: _node(d, "res").pop("params"), r"node 2 'res'.*missing fields \['params'\]"),
    (lambda d, a: _node(d, "res").update(extra=1), r"node 2 'res'.*unknown fields"),
    (lambda d, a: _node(d, "cat").update(inputs=[3, 3]) or _node(d, "res").update(inputs=[1, 0]),
     r"node 'relu'.*never used"),
    (lambda d, a: d.update(input_shape=[3, 4, 4]), r"node 0 'conv' \(Conv2d\)"),                  # shapes
    (lambda d, a: _node(d, "cat").update(inputs=[3, 0]) or d.update(input_shape=[2, 4, 5]),
     r"do not compose"),
    (lambda d, a: _node(d, "cat")["params"].update(axis=2), r"node 3 'cat' \(Concat\).*axis"),
    (lambda d, a: _node(d, "conv")["params"].update(groups=3), r"node 0 'conv' \(Conv2d\).*groups"),
    (lambda d, a: _node(d, "conv")["params"].pop("groups"), r"node 0 'conv' \(Conv2d\).*missing parameters"),
    (lambda d, a: a.pop("node5.bias"), r"node 5 'fc' \(Dense\).*missing array node5.bias"),
    (lambda d, a: a.update({"node1.weight": np.ones(2)}), r"no node uses"),
    (lambda d, a: a.update({"layer0.weight": np.ones(2)}), r"no node uses"),
    (lambda d, a: d.update(network="Sequential"), r"node 2 'res'|Sequential"),
    (lambda d, a: d.update(network="Tree"), r"'network' must be"),
    (lambda d, a: d.pop("nodes"), r"no nodes"),
    (lambda d, a: d.update(layers=[]), r"unknown fields"),
    (lambda d, a: d["nodes"].append({"name": "again", "inputs": [6], "shares": 5}), r"'again'.*"),  # shape
    (lambda d, a: d["nodes"].insert(1, {"name": "again", "inputs": [1], "shares": 1}), r"'again'.*'shares'"),
    (lambda d, a: d["nodes"].insert(1, {"name": "again", "inputs": [1], "shares": 0, "kind": "ReLU"}),
     r"'again'.*unknown fields"),
    (lambda d, a: d["nodes"].append({"name": "out", "kind": "Upsample", "inputs": [6],
                                     "params": {"scale_factor": [2, 2], "mode": "bilinear"}}), r"'out'.*mode"),
    (lambda d, a: _node(d, "relu").update(kind="LeakyReLU", params={"negative_slope": "0.1"}),
     r"node 1 'relu' \(LeakyReLU\).*negative_slope"),
    (lambda d, a: _node(d, "relu").update(kind="ELU", params={"alpha": float("inf")}), r"'relu' \(ELU\).*alpha"),
    (lambda d, a: _node(d, "relu").update(kind="GELU", params={"approximate": "erf"}), r"'relu' \(GELU\)"),
    (lambda d, a: _node(d, "relu").update(kind="BatchNorm2d", params={"eps": 1e-5}),
     r"'relu' \(BatchNorm2d\).*missing array node1.running_mean"),
    (lambda d, a: _node(d, "relu").update(kind="BatchNorm2d", params={"eps": 1e-5}) or a.update(
        {"node1.running_mean": np.zeros(2), "node1.running_var": -np.ones(2), "node1.weight": np.ones(2),
         "node1.bias": np.zeros(2)}), r"'relu' \(BatchNorm2d\).*negative"),
    (lambda d, a: _node(d, "relu").update(kind="MaxPool2d", params={"kernel_size": [3, 3], "stride": [1, 1],
                                                                    "padding": [1, 1, 1, 1], "ceil_mode": 1}),
     r"'relu' \(MaxPool2d\).*ceil_mode"),
    (lambda d, a: _node(d, "relu").update(kind="Slice", params={"axis": 1, "start": 2, "stop": 2}),
     r"'relu' \(Slice\).*stop"),
    (lambda d, a: _node(d, "relu").update(kind="Upsample", params={"scale_factor": [2 ** 24, 2 ** 24],
                                                                   "mode": "nearest"}), r"'relu'|'res'"),
])
def test_bad_graph_files_name_the_node(edit, match):
    desc, arrays = _edit(edit)
    with pytest.raises(dt.ModelFormatError, match=match):
        load_npz(craft(desc, arrays))


def test_shared_node_loads_shared():
    desc, arrays = graph_desc()
    desc["nodes"][1:1] = [{"name": "conv_again", "inputs": [1], "shares": 0}]
    for n in desc["nodes"][2:]:
        n["inputs"] = [v + 1 if v >= 1 else v for v in n["inputs"]]
    arrays = {"node0.weight": np.full((2, 2, 3, 3), 0.1), "node0.bias": np.zeros(2),
              "node6.weight": np.full((3, 64), 0.01), "node6.bias": np.zeros(3)}
    net = load_npz(craft(desc, arrays))
    assert net.nodes[0].layer is net.nodes[1].layer


def test_fuzz_crafted_json_mutations_graph(rng):
    """The crafted-JSON fuzz test on a version-2 graph file: every outcome is a Graph or a ModelFormatError."""
    net = residual_graph(rng)
    data = save_bytes(net)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        arrays = {name[:-4]: np.load(io.BytesIO(z.read(name))) for name in z.namelist()}
    desc = json.loads(arrays.pop("__deeptaylor__").tobytes())
    assert load_npz(craft(desc, arrays)).names == net.names
    for mutations, count, min_reasons in ((_mutations(json.dumps(desc).encode(), seed=9, count=150), 150, 3),
                                          (_json_mutations(desc, seed=10, count=400), 400, 20)):
        rejected, reasons = 0, set()
        for mutated in mutations:
            try:
                back = load_npz(craft(None, arrays, raw_meta=mutated))
            except dt.ModelFormatError as exc:
                rejected += 1
                reasons.add(re.sub(r"[0-9]+", "#", str(exc))[:60])
                continue
            assert isinstance(back, dt.Graph)
            back.shapes((1,) + (back.input_shape or (3, 8, 8)))  # what loads is a working graph
        assert rejected >= 0.7 * count, (rejected, count)
        assert len(reasons) >= min_reasons, sorted(reasons)


def test_fuzz_mutated_graph_npz_bytes(rng):
    data = save_bytes(residual_graph(rng))
    for mutated in _mutations(data, seed=11, count=200):
        try:
            net = load_npz(mutated)
        except dt.DeepTaylorError:
            continue
        assert isinstance(net, dt.Graph)


def test_implausible_activation_size_refused():
    up = {"kind": "Upsample", "params": {"scale_factor": [64, 64], "mode": "nearest"}}
    desc = {"format": "deeptaylor.model", "version": 2, "network": "Graph", "input_shape": [2, 4, 4], "nodes": [
        {"name": "up1", "inputs": [0], **up}, {"name": "up2", "inputs": [1], **up}, {"name": "up3", "inputs": [2], **up},
        {"name": "pool", "kind": "GlobalSumPool", "inputs": [3], "params": {}}]}
    # 2 x 16384 x 16384 values per sample pass; 2 x 2**20 x 2**20 do not
    with pytest.raises(dt.ModelFormatError, match=r"node 2 'up3' \(Upsample\): implausible output shape"):
        load_npz(craft(desc, {}))
    desc["nodes"][0]["params"] = {"scale_factor": [2 ** 24, 2 ** 24], "mode": "nearest"}
    with pytest.raises(dt.ModelFormatError, match=r"node 0 'up1' \(Upsample\) scale_factor .*loader's limit"):
        load_npz(craft(desc, {}))
