"""Explainer serialisation (its payload, never a pickle of internals) and dt.dask.explain on a real
LocalCluster (worker processes)."""

from __future__ import annotations

import json
import pickle
import sys
import zipfile

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.io import payload as payload_mod


@pytest.fixture
def images(rng) -> np.ndarray:
    return rng.uniform(0, 1, (90, 1, 28, 28)).astype(np.float32)


COMPOSITES = [
    dt.composites.deep_taylor(0.0, 1.0),
    dt.composites.epsilon_gamma_box(low=-0.5, high=1.0),
    dt.composites.epsilon_plus_flat(),
    dt.methods.Sensitivity(),
    dt.methods.GradientXInput(),
    dt.methods.IntegratedGradients(steps=4),        # compound methods: parameters, tuples
    dt.methods.Occlusion(window=(7, 7), stride=(7, 7)),
    dt.Composite(by_index={0: dt.rules.ZBox(np.zeros((1, 1, 1)), np.full((1, 28, 28), 1.0))},
                 by_name={"4": dt.rules.Epsilon(0.25)}, by_type={dt.Dense: dt.rules.Z()},
                 default=dt.rules.AlphaBeta(3.0, 2.0), name="mine"),
]


@pytest.mark.parametrize("composite", COMPOSITES, ids=lambda c: getattr(c, "name", type(c).__name__))
def test_pickle_round_trip(lenet, images, composite):
    for backend in dt.available_backends():
        ex = dt.Explainer(lenet, composite, backend=backend, threads=2 if backend == "cpu" else None)
        data = pickle.dumps(ex)
        payload_mod.clear_cache()
        ex2 = pickle.loads(data)
        assert ex2 is not ex and pickle.loads(data) is ex2   # cached by the payload's hash
        assert type(ex2.backend) is type(ex.backend)
        assert getattr(ex2.backend, "threads", None) == getattr(ex.backend, "threads", None)
        assert repr(ex2) == repr(ex)
        a, b = ex.explain(images), ex2.explain(images)
        np.testing.assert_array_equal(a.relevance, b.relevance)   # bitwise
        np.testing.assert_array_equal(a.output, b.output)
        assert a.method == b.method
        # the same Explainer always gives the same bytes (the cache key)
        assert payload_mod.dumps_explainer(ex) == payload_mod.dumps_explainer(ex2)


def test_payload_is_the_native_format_not_a_pickle(lenet, tmp_path):
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    data = payload_mod.dumps_explainer(ex)
    assert b"cdeeptaylor" not in data and b"\x80\x04\x95" not in data   # no pickle opcodes inside
    with zipfile.ZipFile(__import__("io").BytesIO(data)) as zf:
        names = zf.namelist()
        spec = json.loads(np.lib.format.read_array(zf.open("__explainer__.npy")).tobytes())
    assert "__deeptaylor__.npy" in names and "node0.weight.npy" in names
    assert spec["backend"] == "numpy" and spec["composite"]["first"]["rule"] == "ZBox"
    # the network part is an ordinary model file
    (tmp_path / "m.npz").write_bytes(data)
    with pytest.raises(dt.ModelFormatError, match="arrays no node uses|__explainer__|no node"):
        dt.load(tmp_path / "m.npz")   # a payload is not a model file (its extra members are refused)


def _rewrite(data: bytes, edit) -> bytes:
    """The payload with its members passed through ``edit(name, bytes) -> bytes``."""
    import io

    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info)))
    return buf.getvalue()


def _with_spec(data: bytes, change) -> bytes:
    def edit(name, raw):
        if name != "__explainer__.npy":
            return raw
        import io

        spec = json.loads(np.lib.format.read_array(io.BytesIO(raw)).tobytes())
        change(spec)
        out = io.BytesIO()
        np.lib.format.write_array(out, np.frombuffer(json.dumps(spec).encode(), np.uint8))
        return out.getvalue()

    return _rewrite(data, edit)


class _Forged:
    """Pickles as an Explainer does, with the given payload bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return (payload_mod.loads_explainer, (self.data,))


def test_tampered_payload_is_refused(lenet):
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    data = payload_mod.dumps_explainer(ex)
    payload_mod.clear_cache()
    # one flipped byte in a weight: the zip's CRC catches it
    pos = data.index(b"node0.weight.npy") + 200
    flipped = data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]
    cases = {
        "flipped weight byte": flipped,
        "truncated": data[: len(data) // 2],
        "a pickle": pickle.dumps({"weights": [1.0, 2.0]}),
        "unknown rule": _with_spec(data, lambda s: s["composite"]["default"].update(rule="os.system")),
        "rule parameter of the wrong type": _with_spec(
            data, lambda s: s["composite"]["default"]["params"].update(use_bias="yes")),
        "private name": _with_spec(data, lambda s: s["composite"]["default"].update(rule="_number")),
        "unknown backend": _with_spec(data, lambda s: s.update(backend="gpu")),
        "bad threads": _with_spec(data, lambda s: s.update(threads=-3)),
        "unknown field": _with_spec(data, lambda s: s.update(extra=1)),
        "missing array": _with_spec(data, lambda s: s["composite"]["first"]["params"]["low"].update(
            array="explainer.99.low")),
        "unknown layer kind": _with_spec(data, lambda s: s["composite"].update(by_type=[["Evil", {
            "rule": "Z", "params": {}}]])),
        "unknown layer in the model description": _rewrite(data, lambda n, raw: raw.replace(
            b'"kind": "MaxPool2d"', b'"kind": "Upsample__"')),
    }
    import io

    model_only = io.BytesIO()
    dt.save(lenet, model_only)
    cases["a plain model file"] = model_only.getvalue()
    for what, bad in cases.items():
        with pytest.raises(dt.ModelFormatError):
            payload_mod.loads_explainer(bad)
        # as a worker receives it: the pickle of an Explainer is (loads_explainer, (payload,))
        reduced = ex.__reduce__()
        assert reduced[0] is payload_mod.loads_explainer
        forged = pickle.dumps(_Forged(bad))
        with pytest.raises(dt.ModelFormatError):
            pickle.loads(forged)
        assert what


def test_what_cannot_travel_is_refused(lenet):
    class Doubled(dt.methods.CompoundMethod):   # a user's method: no name the reader could know
        __slots__ = ()

        def compute(self, passes, x, targets):
            out, grad = passes.gradient(x, targets) if hasattr(passes, "gradient") else (None, None)
            return out, 2 * grad, {}

    ex = dt.Explainer(lenet, Doubled(), backend="numpy")
    with pytest.raises(dt.UnsupportedError, match="not a method of deeptaylor.methods"):
        pickle.dumps(ex)

    class Backend:
        name = "mine"
        dtype = np.float64

        def check(self, net, assignment):
            pass

        def run(self, *a):  # pragma: no cover - never run
            raise AssertionError

    ex2 = dt.Explainer(lenet, "deep-taylor", backend=Backend())
    with pytest.raises(dt.UnsupportedError, match="backend"):
        pickle.dumps(ex2)


def test_without_dask_the_error_names_the_extra(lenet, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    with pytest.raises(dt.UnsupportedError, match=r'pip install "deeptaylor\[dask\]"'):
        dt.dask.explain(ex, images)


# ------------------------------------------------------------------------------------------------ Dask

# distributed may warn while its processes shut down (unclosed sockets or comms when the machine is slow,
# deprecations of its own dependencies): those are about the cluster, not deeptaylor, so only the tests
# that use the cluster ignore them, and only these kinds (none was emitted in the runs here)
CLUSTER_WARNINGS = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:distributed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:tornado"),
]


def cluster_warnings(fn):
    """Apply :data:`CLUSTER_WARNINGS` to a test that uses the cluster."""
    for mark in CLUSTER_WARNINGS:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: 2 worker processes x 1 thread, closed (processes ended) after the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as c:
        yield c


def _worker_state():
    from deeptaylor.io import payload as p

    return [(getattr(ex.backend, "plans", None), getattr(ex.backend, "threads", None)) for ex in p._CACHE.values()]


@cluster_warnings
@pytest.mark.parametrize("backend", dt.available_backends())
def test_dask_on_a_local_cluster_equals_local(lenet, images, backend, client):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    client.run(payload_mod.clear_cache)
    ex = dt.Explainer(lenet, "deep-taylor", backend=backend)
    x = da.from_array(images, chunks=(15, 1, 14, 28))       # split along H too: rechunked to whole samples
    res = dt.dask.explain(ex, x)
    assert isinstance(res.relevance, da.Array) and res.relevance.chunks[0] == (15,) * 6
    assert res.relevance.chunks[1:] == ((1,), (28,), (28,))
    rel, out = dask.compute(res.relevance, res.output)
    ref = ex.explain(images, batch_size=15)
    np.testing.assert_array_equal(rel, ref.relevance)   # bitwise, the same chunks as explain's batches
    np.testing.assert_array_equal(out, ref.output)
    assert rel.dtype == ref.relevance.dtype
    # each worker process built the Explainer once and one plan (cpu), for three chunks each
    state = client.run(_worker_state)
    assert len(state) == 2
    for entries in state.values():
        assert len(entries) == 1
        if backend == "cpu":
            assert entries[0][0] == 1
    # per-sample targets, rechunked to x's chunks; threads set per worker
    t = np.arange(len(images)) % 10
    got = dt.dask.explain(ex, x, target=da.from_array(t, chunks=40), threads=1).relevance.compute()
    np.testing.assert_array_equal(got, ex.explain(images, target=t, batch_size=15).relevance)
    # several targets per sample: (N, K) arrays, "all", ("top", k): relevance (N, K, *sample)
    kinds = (np.stack([t, (t + 1) % 10], axis=1), "all", ("top", 2)) if backend == "cpu" else (("top", 2),)
    for many in kinds:
        res_k = dt.dask.explain(ex, x, target=many, threads=1)
        ref_k = ex.explain(images, target=many, batch_size=15)
        assert res_k.relevance.shape == ref_k.relevance.shape
        np.testing.assert_array_equal(res_k.relevance.compute(), ref_k.relevance)
    if backend == "cpu":   # the threads=1 Explainer is a second cache entry on each worker
        assert all(sorted(e[1] for e in entries if e[1] is not None) == [1] and len(entries) == 2
                   for entries in client.run(_worker_state).values())


@cluster_warnings
def test_dask_errors_surface(lenet, images, client):
    da = pytest.importorskip("dask.array")
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    with pytest.raises(dt.InputTypeError, match="dask array"):
        dt.dask.explain(ex, images)
    with pytest.raises(dt.InputTypeError, match="float32 or float64"):
        dt.dask.explain(ex, da.from_array((images * 255).astype(np.uint8), chunks=30))
    with pytest.raises(dt.ShapeError):
        dt.dask.explain(ex, da.from_array(images[:, 0], chunks=30))
    with pytest.raises(dt.ShapeError):
        dt.dask.explain(ex, da.from_array(np.zeros((4, 1, 30, 30), np.float32), chunks=2))
    with pytest.raises(dt.ShapeError, match=r"shape \(90,\)"):
        dt.dask.explain(ex, da.from_array(images, chunks=30), target=np.zeros(5, np.int64))
    with pytest.raises(dt.InputError, match="out of range"):
        dt.dask.explain(ex, da.from_array(images, chunks=30), target=10)
    bad = images.copy()
    bad[40, 0, 1, 1] = -2.0
    lazy = dt.dask.explain(ex, da.from_array(bad, chunks=30)).relevance   # nothing checked until computed
    with pytest.raises(dt.InputError, match="ZBox"):
        lazy.compute()
