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


def test_auto_raises_without_a_warning_when_no_backend_can_run_it():
    class MyZPlus(dt.rules.ZPlus):
        __slots__ = ()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(dt.UnsupportedError, match="MyZPlus"):
            dt.Explainer(_dense_net(), MyZPlus())


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


# ------------------------------------------------------------- item 9: the fallback PNG reader's limit


def _png(w: int, h: int, rows: bytes | None = None, ctype: int = 0) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    data = zlib.compress(rows if rows is not None else b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_read_png_refuses_huge_images_from_the_header(tmp_path):
    from deeptaylor import heatmap as hm

    p = tmp_path / "bomb.png"
    p.write_bytes(_png(50000, 50000))
    with pytest.raises(dt.InputError, match="limit"):
        hm.read_png(p)
    p.write_bytes(_png(5000, 5000))                 # the audit's 14.7 s file: refused by default
    with pytest.raises(dt.InputError, match="limit"):
        hm.read_png(p)
    # within the limit (or with the limit raised) an image decodes; Sub-filtered rows decode exactly
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    sub = np.concatenate([img[:, :1], (img[:, 1:].astype(np.int16) - img[:, :-1]) % 256], axis=1).astype(np.uint8)
    rows = b"".join(b"\x01" + r.tobytes() for r in sub)
    p.write_bytes(_png(5, 6, rows, ctype=2))
    np.testing.assert_array_equal(hm.read_png(p), img)
    np.testing.assert_array_equal(hm.read_png(p, max_pixels=None), img)
    with pytest.raises(dt.InputError, match="limit"):
        hm.read_png(p, max_pixels=29)


def test_read_png_does_not_inflate_past_the_declared_size(tmp_path):
    from deeptaylor import heatmap as hm

    p = tmp_path / "long.png"
    p.write_bytes(_png(4, 4, b"\0" * (64 << 20)))  # 64 MiB of rows behind a 4x4 header
    with pytest.raises(dt.InputError, match="expected"):
        assert _peak_mib(lambda: hm.read_png(p)) < 8
    assert _peak_mib(lambda: pytest.raises(dt.InputError, hm.read_png, p)) < 8


# ------------------------------------------------------------- item 11: the command line, one line and 2


def _cli(argv, capsys) -> tuple[int, str, str]:
    from deeptaylor.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deeptaylor: error:")
    return lines[0]


@pytest.fixture
def model_file(tmp_path):
    rng = np.random.default_rng(0)
    net = dt.Sequential([dt.Flatten(), dt.Dense(rng.normal(size=(3, 16)), -np.abs(rng.normal(size=3))), dt.ReLU(),
                         dt.Dense(rng.normal(size=(2, 3)), np.zeros(2))])
    path = tmp_path / "m.npz"
    dt.save(net, path, input_shape=(1, 4, 4))
    return path


@pytest.mark.parametrize("case", ["garbage", "truncated", "bad_data", "bomb", "warn_bomb"])
def test_cli_bad_images_one_line(tmp_path, model_file, capsys, case):
    d = tmp_path / "imgs"
    d.mkdir()
    good = _png(4, 4, b"".join(b"\0" + bytes(range(4)) for _ in range(4)))
    data = {"garbage": b"\x89PNG\r\n\x1a\n" + bytes(range(137)),            # 145 bytes
            "truncated": good[:45],
            "bad_data": good[:33] + _png(4, 4, b"\x07" * 3)[33:],
            "bomb": _png(30000, 30000),
            "warn_bomb": _png(10000, 10000)}[case]
    (d / "a.png").write_bytes(data)
    rc, _, err = _cli(["explain", "--model", model_file, "--input", d, "--out", tmp_path / "o"], capsys)
    line = _one_line_error(rc, err)
    assert "a.png" in line
    assert "internal error" not in line


def test_cli_npy_header_declaring_a_huge_array(tmp_path, model_file, capsys):
    p = tmp_path / "x.npy"
    with open(p, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 784)})
        fh.write(bytes(64))
    rc, _, err = _cli(["explain", "--model", model_file, "--input", p, "--out", tmp_path / "o"], capsys)
    assert "declares shape" in _one_line_error(rc, err)


def test_cli_bad_image_shape_and_scale(tmp_path, model_file, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.full((2, 16), 0.5, np.float32))
    base = ["explain", "--model", model_file, "--input", x, "--out", tmp_path / "o"]
    for shape in ("0,5", "5,0", "-4,-4"):
        rc, _, err = _cli([*base, f"--image-shape={shape}"], capsys)
        assert "--image-shape" in _one_line_error(rc, err)
    rc, _, err = _cli([*base, "--scale", str(10**9)], capsys)
    assert rc == 2
    assert "--scale" in err
    assert "Traceback" not in err
    rc, _, err = _cli([*base, "--scale", "64", "--image-shape", "2000,2000"], capsys)
    # (2000 x 2000 does not divide 16 values: a clear error either way, never an allocation)
    _one_line_error(rc, err)


def test_cli_corrupt_lzma_model(tmp_path, model_file, capsys):
    import io
    import zipfile

    src = zipfile.ZipFile(model_file)
    members = {i.filename: src.read(i) for i in src.infolist()}
    members["node1.weight.npy"] += b""
    good = _zip(members, compression=zipfile.ZIP_LZMA)
    info = zipfile.ZipFile(io.BytesIO(good)).getinfo("node1.weight.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    bad = bytearray(good)
    for k in range(start + 6, start + info.compress_size - 2):
        bad[k] ^= 0x33
    model = tmp_path / "bad.npz"
    model.write_bytes(bytes(bad))
    x = tmp_path / "x.npy"
    np.save(x, np.full((2, 16), 0.5, np.float32))
    rc, _, err = _cli(["explain", "--model", model, "--input", x, "--out", tmp_path / "o"], capsys)
    assert "corrupt" in _one_line_error(rc, err)


def test_cli_flat_input_reshaped_to_the_stored_image_shape(tmp_path, model_file, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.full((3, 16), 0.5, np.float32))
    rc, _, err = _cli(["explain", "--model", model_file, "--input", x, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert np.load(tmp_path / "o" / "relevance.npy").shape == (3, 16)


def test_cli_version(capsys):
    from deeptaylor.cli import main

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deeptaylor ")
    assert out.split()[1][0].isdigit()


def test_cli_composite_help_lists_every_name(capsys):
    from deeptaylor.cli import main

    assert main(["explain", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())   # argparse wraps lines, also at hyphens
    for name in dt.composites.names():
        assert name in text, name
    assert "..." not in text


def test_cli_broken_pipe_is_quiet(tmp_path, model_file):
    """`deeptaylor explain ... | head -c 1`: no 'Broken pipe' message, no traceback."""
    import subprocess
    import sys

    x = tmp_path / "x.npy"
    np.save(x, np.full((3, 16), 0.5, np.float32))
    code = ("import sys, os; from deeptaylor.cli import main; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "explain", "--model", str(model_file), "--input", str(x),
                           "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.stderr == ""
    assert proc.returncode == 141


# ---------------------------------------------- item 16: the CLI and the experiment say when they fall back


def _refuse_on_cpu(monkeypatch):
    from deeptaylor.backends.cpu import CpuBackend

    def refuse(self, net, assignment):
        raise dt.UnsupportedError("backend 'cpu' does not support layer 1 (Dense) [simulated]")

    monkeypatch.setattr(CpuBackend, "check", refuse)


@pytest.mark.skipif(not HAVE_CPU, reason="compiled core not built")
def test_cli_runs_on_cpu_and_says_when_it_falls_back(tmp_path, model_file, capsys, monkeypatch):
    x = tmp_path / "x.npy"
    np.save(x, np.full((3, 16), 0.5, np.float32))
    base = ["explain", "--model", model_file, "--input", x, "--out", tmp_path / "o", "--no-progress"]
    rc, out, err = _cli(base, capsys)
    assert rc == 0, err
    assert "on backend cpu" in out
    assert err == ""
    rc, out, err = _cli([*base, "--backend", "cpu"], capsys)
    assert rc == 0, err
    assert "on backend cpu" in out
    _refuse_on_cpu(monkeypatch)
    rc, out, err = _cli(base, capsys)
    assert rc == 0, err
    assert "on backend numpy" in out
    assert err.startswith("deeptaylor: note: backend='auto' uses the NumPy reference")
    assert "simulated" in err
    rc, out, err = _cli([*base, "--backend", "cpu"], capsys)    # explicit: no silent fallback
    assert "simulated" in _one_line_error(rc, err)


@pytest.mark.skipif(not HAVE_CPU, reason="compiled core not built")
def test_experiment_methods_run_on_cpu_and_warn_on_fallback(monkeypatch):
    from deeptaylor import datasets as ds
    from deeptaylor.experiment import explain_methods

    net = ds.load_detection_model()
    images, labels = ds.load_sample()
    x = ds.mnist_detection(images, labels, 8, seed=0).flat().astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = explain_methods(net, x)
    assert {r.backend for r in res.values()} == {"cpu"}
    _refuse_on_cpu(monkeypatch)
    with pytest.warns(BackendFallbackWarning, match="simulated"):
        res = explain_methods(net, x, methods=("z+",))
    assert res["z+"].backend == "numpy"
    with pytest.raises(dt.UnsupportedError):
        explain_methods(net, x, backend="cpu", methods=("z+",))


def test_flatten_output_shape_overflow_is_a_shape_error():
    with pytest.raises(dt.ShapeError, match="overflows int64"):
        dt.Flatten().output_shape((1, 2**40, 2**40, 2**40))
    assert dt.Flatten().output_shape((2, 3, 4, 5)) == (2, 60)
    assert dt.Flatten().output_shape((2, 2**31, 2**31, 1)) == (2, 2**62)
