"""Trust at the edges (issue 14): inputs that used to slip past the checks or fail with an unrelated
error, the default backend ("auto"), and model files / images whose declared sizes would cost far
more than their bytes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.errors import BackendFallbackWarning, DeepTaylorWarning
from deeptaylor.io.npz import load_npz

HAVE_CPU = "cpu" in dt.available_backends()


def _dense_net() -> dt.Sequential:
    rng = np.random.default_rng(0)
    return dt.Sequential([dt.Dense(rng.normal(size=(4, 6)), -np.abs(rng.normal(size=4))), dt.ReLU(),
                          dt.Dense(rng.normal(size=(3, 4)), np.zeros(3))])


# ------------------------------------------------------------------------------- item 3: masked, matrix


@pytest.mark.parametrize("backend", dt.available_backends())
def test_masked_array_refused(backend):
    net = _dense_net()
    data = np.full((2, 6), 0.5)
    data[0, 1] = np.nan                          # hidden under the mask: used to reach the backend
    x = np.ma.array(data, mask=np.isnan(data))
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend=backend)
    with pytest.raises(dt.InputTypeError, match="masked"):
        ex.explain(x)
    # out of the zB box under the mask: refused the same way, not computed on the raw data
    y = np.ma.array(np.full((1, 6), 0.5), mask=[[False, True, False, False, False, False]])
    y.data[0, 1] = 7.0
    with pytest.raises(dt.InputTypeError, match="masked"):
        ex.explain(y)


@pytest.mark.parametrize("backend", dt.available_backends())
def test_matrix_refused(backend):
    ex = dt.Explainer(_dense_net(), dt.rules.ZPlus(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)   # numpy's note on np.matrix itself
        m = np.matrix(np.full((2, 6), 0.5))
    with pytest.raises(dt.InputTypeError, match="matrix"):
        ex.explain(m)


# ----------------------------------------------------------------------- item 12: API edges (explain)


@pytest.mark.parametrize("backend", dt.available_backends())
@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_input_converted(backend, dtype):
    net = _dense_net()
    x = np.random.default_rng(1).uniform(0, 1, (3, 6))
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend=backend)
    want = ex.explain(x.astype(dtype[1:].replace("f", "<f")))
    got = ex.explain(x.astype(dtype))
    np.testing.assert_array_equal(got.relevance, want.relevance)
    assert got.relevance.dtype.isnative


def test_uint64_target_beyond_int64():
    ex = dt.Explainer(_dense_net(), dt.rules.ZPlus(), backend="numpy")
    x = np.full((2, 6), 0.5)
    for target in (np.uint64(2**63), np.array([0, 2**64 - 1], dtype=np.uint64), 2**70, 2**63):
        with pytest.raises(dt.InputError, match="out of range"):
            ex.explain(x, target=target)
    assert ex.explain(x, target=np.uint64(2)).target.tolist() == [2, 2]


def test_torch_module_without_input_shape_names_the_fix():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8, 2))
    with pytest.raises(dt.ShapeError, match=r"input_shape=\(C, H, W\).*dt\.from_torch"):
        dt.Explainer(model, "epsilon-plus")


def test_non_network_names_its_type():
    class Module:  # looks like neither a Graph nor a torch module
        pass

    with pytest.raises(dt.InputTypeError, match="Module"):
        dt.Explainer(Module(), "epsilon-plus")


# ------------------------------------------------------------------------ item 13: backend="auto"


@pytest.mark.skipif(not HAVE_CPU, reason="compiled core not built")
def test_auto_default_uses_the_compiled_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = dt.Explainer(_dense_net(), dt.composites.deep_taylor(0.0, 1.0))
    assert ex.backend.name == "cpu"
    assert ex.fallback_reason is None
    res = ex.explain(np.full((2, 6), 0.5))
    assert res.backend == "cpu"
    assert res.relevance.dtype == np.float32


def test_auto_falls_back_with_a_warning_that_says_why(monkeypatch):
    """No built-in layer or rule is refused by the compiled engine today: a refusal is simulated."""
    if HAVE_CPU:
        from deeptaylor.backends.cpu import CpuBackend

        def refuse(self, net, assignment):
            raise dt.UnsupportedError("backend 'cpu' does not support layer 1 (ReLU) [simulated]")

        monkeypatch.setattr(CpuBackend, "check", refuse)
        why = "simulated"
    else:
        why = "not built"
    with pytest.warns(BackendFallbackWarning, match=why) as rec:
        ex = dt.Explainer(_dense_net(), dt.rules.ZPlus())
    assert issubclass(rec[0].category, DeepTaylorWarning)
    assert rec[0].filename == __file__        # points at the caller's line
    assert ex.backend.name == "numpy"
    assert why in ex.fallback_reason
    res = ex.explain(np.full((2, 6), 0.5))
    assert res.backend == "numpy"
    assert res.relevance.dtype == np.float64


def test_auto_falls_back_when_the_core_is_not_built(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deeptaylor._core", None)   # import fails as without a build
    with pytest.warns(BackendFallbackWarning, match="not built"):
        ex = dt.Explainer(_dense_net(), dt.rules.ZPlus())
    assert ex.explain(np.full((1, 6), 0.5)).backend == "numpy"


def test_explicit_backends_do_not_fall_back(monkeypatch):
    net = _dense_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(np.ones((1, 6))).backend == "numpy"
    with pytest.raises(dt.InputError, match="unknown backend"):
        dt.Explainer(net, dt.rules.ZPlus(), backend="gpu")
    if HAVE_CPU:
        from deeptaylor.backends.cpu import CpuBackend

        def refuse(self, net, assignment):
            raise dt.UnsupportedError("simulated")

        monkeypatch.setattr(CpuBackend, "check", refuse)
        with pytest.raises(dt.UnsupportedError):
            dt.Explainer(net, dt.rules.ZPlus(), backend="cpu")


# ------------------------------------------------------------ items 8, 9: model files that ask too much


def _zip(members: dict[str, bytes | tuple[bytes, int]], compression: int = 8) -> bytes:
    """A zip of ``name -> npy bytes`` (or ``(npy header, number of zero bytes after it)``, streamed)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            if isinstance(data, tuple):
                head, zeros = data
                with zf.open(name, "w", force_zip64=True) as fh:
                    fh.write(head)
                    block = bytes(1 << 22)
                    for s in range(0, zeros, len(block)):
                        fh.write(block[:min(len(block), zeros - s)])
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _meta(desc: dict) -> bytes:
    import json

    return _npy(np.frombuffer(json.dumps(desc).encode(), dtype=np.uint8))


def _dense_desc(input_shape=None) -> dict:
    return {"format": "deeptaylor.model", "version": 2, "network": "Sequential", "input_shape": input_shape,
            "nodes": [{"name": "0", "kind": "Dense", "inputs": [0], "params": {}}]}


def _peak_mib(fn) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize("case", ["bias", "input_shape", "extra"])
def test_npz_member_checked_against_its_layer_before_decompressing(case):
    """A ~256 KiB file whose Dense weight member holds 256 MiB of zeros that the layer cannot use
    (bias of another length / features not the declared input's / an array no node uses): refused
    from the headers, without decompressing it (peak memory far below the member)."""
    n = 1 << 25                                         # 2**25 float64 = 256 MiB
    members = {"__deeptaylor__.npy": _meta(_dense_desc([n] if case != "input_shape" else [7])),
               "node0.weight.npy": (_npy_header((1, n)), 8 * n),
               "node0.bias.npy": _npy(np.zeros(2 if case == "bias" else 1))}
    if case == "extra":
        members["node0.weight.npy"] = _npy(np.zeros((1, 4)))
        members["__deeptaylor__.npy"] = _meta(_dense_desc([4]))
        members["node7.weight.npy"] = (_npy_header((1, n)), 8 * n)
    data = _zip(members)
    assert len(data) < 1 << 20

    def load():
        with pytest.raises(dt.ModelFormatError) as info:
            load_npz(data)
        return info

    assert _peak_mib(load) < 32


def test_npz_streamed_into_one_array():
    """A consistent big member is decompressed straight into its array (no second copy of the bytes)."""
    n = 1 << 23                                          # 64 MiB of float64 zeros
    data = _zip({"__deeptaylor__.npy": _meta(_dense_desc([n])), "node0.weight.npy": (_npy_header((1, n)), 8 * n),
                 "node0.bias.npy": _npy(np.zeros(1))})
    box = []
    peak = _peak_mib(lambda: box.append(load_npz(data)))
    assert box[0][0].weight.shape == (1, n)
    assert peak < 64 * 2 + 24          # the array and the layer's own copy, not also the bytes


def test_npz_corrupt_lzma_member_is_a_model_format_error():
    import io
    import zipfile

    net = _dense_net()
    buf = io.BytesIO()
    dt.save(net, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    members = {i.filename: src.read(i) for i in src.infolist()}
    members["node0.weight.npy"] = members["node0.weight.npy"] + bytes(4096)   # compressible: LZMA data of some size
    for method in (zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED):
        good = _zip(members, compression=method)
        info = zipfile.ZipFile(io.BytesIO(good)).getinfo("node0.weight.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        bad = bytearray(good)
        for k in range(start + 8, start + info.compress_size - 2):
            bad[k] ^= 0x5A
        with pytest.raises(dt.ModelFormatError, match="corrupt|truncated"):
            load_npz(bytes(bad))


def _conv_desc(**params) -> dict:
    p = {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1}
    p.update(params)
    return {"format": "deeptaylor.model", "version": 2, "network": "Graph", "input_shape": [1, 1, 1],
            "nodes": [{"name": "stem.conv", "kind": "Conv2d", "inputs": [0], "params": p},
                      {"name": "pool", "kind": "GlobalSumPool", "inputs": [1], "params": {}}]}


def _conv_file(desc: dict, kernel: int = 1) -> bytes:
    return _zip({"__deeptaylor__.npy": _meta(desc), "node0.weight.npy": _npy(np.ones((2, 1, kernel, kernel))),
                 "node0.bias.npy": _npy(np.zeros(2))})


@pytest.mark.parametrize(("params", "kernel", "match"), [
    ({"padding": [5000, 5000, 5000, 5000]}, 1, "padding"),
    ({"padding": [0, 0, 40, 0]}, 3, "padding"),
    ({"stride": [1, 5000]}, 1, "stride"),
    ({"dilation": [2000, 1]}, 3, "dilat"),
])
def test_loader_refuses_hyper_parameters_beyond_its_limits(params, kernel, match):
    with pytest.raises(dt.ModelFormatError, match=rf"'stem\.conv'.*{match}.*limit|'stem\.conv'.*limit.*{match}"):
        load_npz(_conv_file(_conv_desc(**params), kernel))


def test_loader_accepts_paddings_real_models_use():
    for pad, k in ((16, 1), (3, 3), (1, 1), (5, 5)):
        net = load_npz(_conv_file(_conv_desc(padding=[pad] * 4), k))
        assert net.nodes[0].layer.padding == (pad,) * 4


def test_loader_refuses_huge_pooling_and_upsampling():
    for kind, params in (("MaxPool2d", {"kernel_size": [5000, 1], "stride": [1, 1], "padding": [0, 0, 0, 0],
                                         "ceil_mode": False}),
                         ("Upsample", {"scale_factor": [1000, 1000], "mode": "nearest"}),
                         ("AdaptiveAvgPool2d", {"output_size": [100000, 1]})):
        desc = {"format": "deeptaylor.model", "version": 2, "network": "Graph", "input_shape": None,
                "nodes": [{"name": "big", "kind": kind, "inputs": [0], "params": params},
                          {"name": "pool", "kind": "GlobalSumPool", "inputs": [1], "params": {}}]}
        with pytest.raises(dt.ModelFormatError, match=r"'big'.*limit"):
            load_npz(_zip({"__deeptaylor__.npy": _meta(desc)}))


# ------------------------------------------------------------------------- item 12: dt.load(bytes)


def test_load_bytes():
    import io

    net = _dense_net()
    buf = io.BytesIO()
    dt.save(net, buf)
    for data in (buf.getvalue(), bytearray(buf.getvalue()), memoryview(buf.getvalue())):
        back = dt.load(data)
        np.testing.assert_array_equal(back[0].weight, net[0].weight)
    for junk in (b"hello\x00world", b"", b"\x80\x04\x95junk"):
        with pytest.raises(dt.ModelFormatError):
            dt.load(junk)


def test_load_onnx_bytes():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "W")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    assert onnx.load_from_string(data).graph.node
    net = dt.load(data)
    np.testing.assert_array_equal(net[0].weight, w)
