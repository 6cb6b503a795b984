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
        r1 = dt.Explainer(net, composite).explain(x)
        r2 = dt.Explainer(back, composite).explain(x)
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
