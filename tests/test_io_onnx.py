"""ONNX import: hand-built graphs (onnx.helper) checked against onnx's own ReferenceEvaluator, models
exported by torch.onnx.export checked against torch, clear errors, and a byte-mutation fuzz test."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.io.onnx import load_onnx
from deeptaylor.passes import canonicalize

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

RNG = np.random.default_rng(99)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def model(nodes, inits, in_shape, out_shape=None, opset=13, input_name="x"):
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check_against_reference(m, x, **kw):
    net = load_onnx(m.SerializeToString(), **kw)
    ref = ReferenceEvaluator(m).run(None, {m.graph.input[0].name: x.astype(np.float32)})[0]
    got = net.forward(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    return net


def w(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def test_gemm_mlp_with_trans_alpha_beta_dropout_identity():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1, alpha=0.5, beta=2.0, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Dropout", ["r1"], ["d1"]),
             helper.make_node("Identity", ["d1"], ["i1"]),
             helper.make_node("Gemm", ["i1", "W2"], ["y"], name="fc2")]
    m = model(nodes, [init("W1", w(7, 5)), init("b1", w(1, 7)), init("W2", w(7, 3))], ["N", 5], ["N", 3])
    net = check_against_reference(m, RNG.normal(size=(4, 5)))
    assert [layer.kind for layer in net] == ["Dense", "ReLU", "Dense"]


def test_matmul_add_and_constant_nodes():
    nodes = [helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(w(5, 4))),
             helper.make_node("MatMul", ["x", "B"], ["h"]),
             helper.make_node("Constant", [], ["c"], value_floats=[0.1, -0.2, 0.3, 0.4]),
             helper.make_node("Add", ["h", "c"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    net = check_against_reference(model(nodes, [], [2, 5]), RNG.normal(size=(2, 5)))
    assert np.allclose(net[0].bias, [0.1, -0.2, 0.3, 0.4], atol=1e-7)


def lenet_nodes(conv_kw, pool_kw, gap=False):
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c1"], name="conv1", **conv_kw),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool_kw),
             helper.make_node("Conv", ["p1", "Wc2"], ["c2"], name="conv2", pads=[0, 1, 1, 0]),
             helper.make_node("Relu", ["c2"], ["r2"])]
    if gap:
        nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
    else:
        nodes += [helper.make_node("AveragePool", ["r2"], ["a"], kernel_shape=[2, 2], strides=[2, 2],
                                   pads=[1, 0, 0, 1], count_include_pad=1),
                  helper.make_node("Reshape", ["a", "shape"], ["f"])]
    return nodes


@pytest.mark.parametrize(("conv_kw", "pool_kw", "gap"), [
    ({"pads": [1, 2, 2, 1], "strides": [1, 2]}, {"kernel_shape": [2, 2], "strides": [2, 2]}, False),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
     False),
    ({"auto_pad": "SAME_LOWER", "kernel_shape": [4, 4], "dilations": [1, 2]},
     {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "VALID"}, True),
    ({"auto_pad": "VALID"}, {"kernel_shape": [3, 3], "strides": [3, 3], "ceil_mode": 1}, True),
])
def test_conv_pool_graphs_match_reference(conv_kw, pool_kw, gap):
    k = conv_kw.get("kernel_shape", [4, 4])
    inits = [init("Wc", w(4, 2, *k)), init("bc", w(4)), init("Wc2", w(3, 4, 2, 2)),
             numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")]
    nodes = lenet_nodes(conv_kw, pool_kw, gap)
    tail = [helper.make_node("Gemm", ["f", "Wd"], ["y"], transB=1)]
    # size the classifier from a first import without it
    head = model(nodes, inits, [1, 2, 12, 12])
    feats = load_onnx(head.SerializeToString()).output_shape((1, 2, 12, 12))[1]
    m = model(nodes + tail, [*inits, init("Wd", w(5, feats))], ["batch", 2, 12, 12], ["batch", 5])
    check_against_reference(m, RNG.uniform(size=(3, 2, 12, 12)))


def test_batchnorm_nodes_folded_by_canonicalize_after_conv_and_gemm():
    c = 4
    bn = [init(n, v) for n, v in (("s", RNG.uniform(0.5, 2, c)), ("b", w(c)), ("m", w(c)), ("v", RNG.uniform(0.5, 2, c)))]
    bn2 = [init(n + "2", v) for n, v in (("s", RNG.uniform(0.5, 2, 3)), ("b", w(3)), ("m", w(3)),
                                          ("v", RNG.uniform(0.5, 2, 3)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "Wd", "bd"], ["g"], transB=1),
             helper.make_node("BatchNormalization", ["g", "s2", "b2", "m2", "v2"], ["y"])]
    m = model(nodes, [init("W", w(c, 1, 3, 3)), init("Wd", w(3, c * 36)), init("bd", w(3)), *bn, *bn2],
              ["N", 1, 6, 6], opset=15)  # onnx's reference BatchNormalization-9 uses batch statistics
    net = check_against_reference(m, RNG.uniform(size=(2, 1, 6, 6)))
    # BatchNormalization is a node of the imported graph; the shared pass folds it (exact: one consumer)
    assert [layer.kind for layer in net] == ["Conv2d", "BatchNorm2d", "ReLU", "Flatten", "Dense", "BatchNorm1d"]
    folded = canonicalize(net)
    assert [layer.kind for layer in folded] == ["Conv2d", "ReLU", "Flatten", "Dense"]
    x = RNG.uniform(size=(2, 1, 6, 6))
    # the folded weights stay float32 as the file's (canonicalize keeps the dtype): float32 rounding
    np.testing.assert_allclose(folded.forward(x), net.forward(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize(("opset", "axes"), [(13, [2, 3]), (13, [-1, -2]), (18, [-1, -2]), (18, [3, 2])])
def test_reduce_mean_over_the_map_is_global_average_pooling(opset, axes, keepdims):
    """``AdaptiveAvgPool2d(1)`` as the dynamo exporter writes it: axes as an attribute (opset < 18) or an
    input (opset >= 18), followed by the flatten its output rank needs."""
    if opset < 18:
        mean = helper.make_node("ReduceMean", ["r"], ["m"], axes=axes, keepdims=keepdims)
        inits = []
    else:
        mean = helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=keepdims)
        inits = [ints("axes", axes)]
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             mean, helper.make_node("Reshape", ["m", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "Wd"], ["y"], transB=1)]
    inits += [init("Wc", w(4, 2, 3, 3)), ints("shape", [-1, 4]), init("Wd", w(3, 4))]
    m = model(nodes, inits, ["N", 2, 5, 6], ["N", 3], opset=opset)
    net = check_against_reference(m, RNG.normal(size=(3, 2, 5, 6)))
    # keepdims=0: ReduceMean's own Flatten, the Reshape of a rank-2 tensor adds none; keepdims=1: the Reshape's
    assert [layer.kind for layer in net] == ["Conv2d", "ReLU", "AvgPool2d", "Flatten", "Dense"]
    assert net[2].kernel_size == (5, 6)


@pytest.mark.parametrize(("attrs", "axes", "shape", "match"), [
    ({}, [1], [1, 2, 4, 4], r"axes=\[1\].*only the mean over the spatial axes"),
    ({}, [2], [1, 2, 4, 4], r"axes=\[2\]"),
    ({}, [1], [1, 6], "rank-2"),
    ({}, None, [1, 2, 4, 4], "over all axes"),
    ({}, [2, 3], [1, 2, "H", "W"], "input_shape"),
])
def test_reduce_mean_other_axes_refused(attrs, axes, shape, match):
    nodes = [helper.make_node("ReduceMean", ["x"] + (["axes"] if axes is not None else []), ["y"], **attrs)]
    bad(nodes, [ints("axes", axes)] if axes is not None else [], shape, match, opset=18)


def test_reduce_mean_with_empty_axes_and_noop_is_the_identity():
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], noop_with_empty_axes=1),
             helper.make_node("Relu", ["m"], ["y"])]
    net = check_against_reference(model(nodes, [], [2, 5], opset=18), RNG.normal(size=(2, 5)))
    assert [layer.kind for layer in net] == ["ReLU"]


def bad(nodes, inits, shape, match, error=dt.UnsupportedError, opset=13, **kw):
    with pytest.raises(error, match=match):
        load_onnx(model(nodes, inits, shape, opset=opset).SerializeToString(), **kw)


def test_unsupported_op_names_node_and_op():
    bad([helper.make_node("Softmax", ["x"], ["y"], name="act7")], [], [1, 3],
        r"node 'act7' \(op 'Softmax'\) is not supported.*supported ops: Conv")


@pytest.mark.parametrize(("nodes", "inits", "shape", "match"), [
    ([helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])], [], [1, 2, 5, 5], "extra outputs"),
    ([helper.make_node("Reshape", ["x", "s"], ["y"])],
     [numpy_helper.from_array(np.array([2, -1], np.int64), "s")], [1, 2, 3, 3], "not a flatten"),
    ([helper.make_node("Flatten", ["x"], ["y"], axis=2)], [], [1, 2, 3, 3], "axis"),
    ([helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)], [init("W", w(3, 3))], [1, 3], "transA"),
    ([helper.make_node("MatMul", ["x", "x"], ["y"])], [], [3, 3], "MatMul of two computed tensors"),
    ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])], [], [1, 2, "H", "W"],
     "single chain.*pass input_shape"),
    ([helper.make_node("GlobalAveragePool", ["x"], ["y"])], [], ["N", 2, "H", "W"], "input_shape"),
])
def test_unsupported_graphs(nodes, inits, shape, match):
    bad(nodes, inits, shape, match)


def test_input_shape_argument():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    m = model(nodes, [], ["N", 2, "H", "W"]).SerializeToString()
    net = load_onnx(m, input_shape=(2, 6, 4))
    assert net[0].kernel_size == (6, 4)
    m2 = model(nodes, [], ["N", 2, 6, 6]).SerializeToString()
    with pytest.raises(dt.ShapeError, match="contradicts"):
        load_onnx(m2, input_shape=(3, 6, 6))


def test_declared_output_shape_is_checked():
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    m = model(nodes, [init("W", w(3, 4))], ["N", 4], ["N", 7])
    with pytest.raises(dt.ModelFormatError, match="declares output shape"):
        load_onnx(m.SerializeToString())


def test_format_errors():
    with pytest.raises(dt.ModelFormatError, match="not a readable ONNX model|no graph"):
        load_onnx(b"\x08\x07\x12\xff\xff")
    with pytest.raises(dt.ModelFormatError, match="no graph"):
        load_onnx(b"")
    ext = numpy_helper.from_array(w(3, 4), "W")
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    ext.external_data.add(key="location", value="/etc/passwd")
    bad([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [ext], [1, 4], "external data",
        error=dt.ModelFormatError)
    bad([helper.make_node("Relu", ["x"], ["y"])], [], [1, 4], "opset 3", opset=3)
    bad([helper.make_node("Conv", ["x", "W"], ["y"], strides=[0, 1], auto_pad="SAME_UPPER")],
        [init("W", w(1, 1, 3, 3))], [1, 1, 5, 5], r"strides \[0, 1\].*must be positive", error=dt.ModelFormatError)
    bad([helper.make_node("Relu", ["nowhere"], ["y"])], [], [1, 4], "undefined tensor", error=dt.ModelFormatError)
    broken = numpy_helper.from_array(w(3, 4), "W")
    broken.dims[0] = 5
    bad([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [broken], [1, 4], "cannot be decoded|holds shape",
        error=dt.ModelFormatError)


def test_load_dispatches_onnx_by_extension_and_content(tmp_path):
    m = model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [init("W", w(3, 4))], ["N", 4])
    for name in ("m.onnx", "m.bin", "m", "m.npz"):  # content wins over the extension
        (tmp_path / name).write_bytes(m.SerializeToString())
        assert dt.load(tmp_path / name)[0].weight.shape == (3, 4)
    m2 = model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], [], ["N", 2, "H", "W"])
    (tmp_path / "g.npz").write_bytes(m2.SerializeToString())
    assert dt.load(tmp_path / "g.npz", input_shape=(2, 3, 5))[0].kernel_size == (3, 5)
    with pytest.raises(dt.InputTypeError, match="unexpected keyword"):
        dt.load(tmp_path / "m.onnx", shape=(4,))


# ------------------------------------------------------------------------------------- torch export

torch_cases = {
    "mlp": (lambda nn: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)),
            (1, 8, 8)),
    "lenet": (lambda nn: nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                       nn.Conv2d(6, 8, 3, padding="same"), nn.ReLU(), nn.AvgPool2d(2),
                                       nn.Flatten(), nn.Linear(8 * 7 * 7, 10)), (1, 28, 28)),
    "bn": (lambda nn: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                                    nn.ReLU(), nn.Linear(6, 3)), (3, 16, 16)),
    # padding that exporters write as Pad nodes: ZeroPad2d, AvgPool2d's (TorchScript opset < 11), a -inf
    # ConstantPad2d before max pooling (how to_torch writes asymmetric padding), even-kernel 'same'
    "pads": (lambda nn: nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(2, 4, 3), nn.ReLU(),
                                      nn.AvgPool2d(3, stride=2, padding=1),
                                      nn.ConstantPad2d((1, 0, 1, 1), -float("inf")),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 3, 4, padding="same"), nn.Flatten()), (2, 9, 10)),
}


def torch_model(torch, name):
    factory, shape = torch_cases[name]
    torch.manual_seed(0)
    net_t = factory(torch.nn).eval()
    for mod in net_t.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return net_t, shape


def check_against_torch(torch, data, net_t, shape):
    net = load_onnx(data)
    x = np.random.default_rng(5).uniform(-0.2, 1, size=(4, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = net_t(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert net.output_shape((4, *shape)) == ref.shape
    return net


@pytest.mark.parametrize("fold", [True, False])  # False: BatchNormalization nodes kept, initializers as inputs
@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17])  # 7, 9: AvgPool2d padding and ZeroPad2d as Pad attributes
@pytest.mark.parametrize("name", sorted(torch_cases))
def test_torch_exported_models_match_torch(name, opset, fold):
    torch = pytest.importorskip("torch")
    net_t, shape = torch_model(torch, name)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net_t, torch.zeros(2, *shape), buf, dynamo=False, opset_version=opset,
                              do_constant_folding=fold, keep_initializers_as_inputs=not fold, input_names=["image"],
                              dynamic_axes={"image": {0: "batch"}})
    except ImportError as exc:  # pragma: no cover - an exporter dependency is missing; any other error fails
        pytest.skip(f"torch.onnx.export unavailable: {exc}")
    check_against_torch(torch, buf.getvalue(), net_t, shape)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("optimize", [True, False])  # False: BatchNormalization, Pad and shape arithmetic kept
@pytest.mark.parametrize("name", sorted(torch_cases))
def test_torch_dynamo_exported_models_match_torch(name, optimize, dynamic):
    """torch's default exporter (``dynamo=True``, opset 18): AdaptiveAvgPool2d(1) as ReduceMean, flatten as a
    Reshape (allowzero=1) whose target is computed from Shape(start, end) when not optimised, padding as Pad."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    net_t, shape = torch_model(torch, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net_t, (torch.zeros(2, *shape),), dynamo=True, optimize=optimize,
                                        verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
    except ImportError as exc:  # pragma: no cover - an exporter dependency is missing; any other error fails
        pytest.skip(f"torch.onnx.export(dynamo=True) unavailable: {exc}")
    data = program.model_proto.SerializeToString()
    ops = {n.op_type for n in onnx.load_model_from_string(data).graph.node}
    if name == "bn":
        assert "ReduceMean" in ops
    if name == "pads":
        assert "Pad" in ops  # the ZeroPad2d and -inf ConstantPad2d at least
    net = check_against_torch(torch, data, net_t, shape)
    if name == "pads":
        assert [layer.kind for layer in net] == ["Conv2d", "ReLU", "AvgPool2d", "MaxPool2d", "Conv2d", "Flatten"]
        assert [net[i].padding for i in (0, 3, 4)] == [(0, 1, 1, 2), (1, 1, 1, 0), (1, 2, 1, 2)]


def test_dynamo_export_of_even_kernel_same_conv_unoptimised_is_pad_then_conv():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(4)
    net_t = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 4, padding="same"), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net_t, (torch.zeros(1, 2, 9, 9),), dynamo=True, optimize=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    data = program.model_proto.SerializeToString()
    ops = [n.op_type for n in onnx.load_model_from_string(data).graph.node]
    assert ops.index("Pad") == ops.index("Conv") - 1  # torch pads the extra row/column itself
    net = check_against_torch(torch, data, net_t, (2, 9, 9))
    assert [layer.kind for layer in net] == ["Conv2d", "ReLU", "Flatten"]
    assert net[0].padding == (1, 2, 1, 2)


@pytest.mark.parametrize("fold", [True, False])  # False: also Identity nodes aliasing constants
@pytest.mark.parametrize("dynamic", [True, False])
def test_torch_view_flatten_exports(dynamic, fold):
    """``x.view(x.size(0), -1)`` exports as Shape/Gather/Unsqueeze/Concat/Reshape (dynamic batch) or as a
    constant shape (static batch); both import as a Flatten that works for any batch size."""
    torch = pytest.importorskip("torch")

    class View(torch.nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), View(),
                            torch.nn.Linear(72, 3)).eval()
    m[1].running_var.fill_(2.0)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, torch.zeros(1, 1, 8, 8), buf, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "b"}} if dynamic else None, do_constant_folding=fold)
    except ImportError as exc:  # pragma: no cover - an exporter dependency is missing; any other error fails
        pytest.skip(f"torch.onnx.export unavailable: {exc}")
    if dynamic:
        assert any(n.op_type == "Shape" for n in onnx.load_model_from_string(buf.getvalue()).graph.node)
    net = load_onnx(buf.getvalue())
    # without constant folding the BatchNormalization stays a node, which the shared pass folds
    assert [layer.kind for layer in canonicalize(net)] == ["Conv2d", "ReLU", "Flatten", "Dense"]
    x = np.random.default_rng(2).uniform(size=(5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-6)


def test_shape_constant_cannot_fake_a_feature_dimension():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["g"], axis=0),
             helper.make_node("Concat", ["g", "g"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i")]
    bad(nodes, inits, ["N", 6], "not a flatten")


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


@pytest.mark.parametrize("allowzero", [0, 1])
def test_batch_size_from_sliced_shape_reshape_and_concat(allowzero):
    """The dynamo exporter's unoptimised flatten: Shape(start=0, end=1) -> Squeeze -> Reshape([-1]) ->
    Concat with the feature count -> Reshape(allowzero=1): the batch size is carried symbolically."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
             helper.make_node("Squeeze", ["s"], ["n"]),
             helper.make_node("Reshape", ["n", "minus1"], ["n1"]),
             helper.make_node("Concat", ["n1", "feats"], ["t"], axis=0),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "t"], ["f"], allowzero=allowzero),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    m = model(nodes, [ints("minus1", [-1]), ints("feats", [18]), init("W", w(4, 18))], ["N", 2, 3, 3], ["N", 4],
              opset=18)
    net = check_against_reference(m, RNG.normal(size=(5, 2, 3, 3)))
    assert [layer.kind for layer in net] == ["ReLU", "Flatten", "Dense"]


def pad_node(opset, pads, value=None, axes=None, mode=None, out="p", name="pad"):
    """A Pad of ``x`` in the form of ``opset``: attributes before 11, inputs from 11, ``axes`` from 18."""
    kw = {} if mode is None else {"mode": mode}
    if opset < 11:
        if value is not None:
            kw["value"] = value
        return helper.make_node("Pad", ["x"], [out], pads=pads, name=name, **kw), []
    ins, inits = ["x", "pads"], [ints("pads", pads)]
    if value is not None or axes is not None:
        ins.append("" if value is None else "pad_value")
        inits += [] if value is None else [init("pad_value", np.float32(value))]
    if axes is not None:
        ins.append("pad_axes")
        inits.append(ints("pad_axes", axes))
    return helper.make_node("Pad", ins, [out], name=name, **kw), inits


@pytest.mark.parametrize(("opset", "pads", "value", "axes", "op", "kw"), [
    (9, [0, 0, 1, 2, 0, 0, 2, 0], None, None, "Conv", {"pads": [1, 0, 0, 1]}),
    (9, [0, 0, 1, 1, 0, 0, 1, 1], 0, None, "AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}),  # int attr
    (9, [0, 0, 1, 0, 0, 0, 0, 1], -np.inf, None, "MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    (13, [0, 0, 0, 0, 0, 0, 1, 1], 0.0, None, "Conv", {"pads": [1, 1, 1, 1]}),  # torch 'same', even kernel
    (13, [0, 0, 1, 0, 0, 0, 0, 0], None, None, "Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (13, [0, 0, 1, 1, 0, 0, 1, 1], None, None, "AveragePool",  # count_include_pad=0: the Pad's zeros count
     {"kernel_shape": [3, 3], "count_include_pad": 0}),
    (13, [0, 0, 1, 0, 0, 0, 1, 1], -np.inf, None, "MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2],
                                                              "ceil_mode": 1}),
    (18, [1, 0, 2, 1], 0.0, [2, 3], "Conv", {}),
    (18, [0, 1, 1, 0], None, [-1, -2], "AveragePool", {"kernel_shape": [2, 2], "pads": [0, 1, 0, 0],
                                                        "count_include_pad": 1}),  # its own pads add up
    (18, [0, 0, 0, 0, 0, 0, 0, 0], 3.0, None, "MaxPool", {"kernel_shape": [2, 2]}),  # pads nothing: dropped
])
def test_constant_pad_is_folded_into_the_next_conv_or_pool(opset, pads, value, axes, op, kw):
    pad, inits = pad_node(opset, pads, value, axes)
    nodes = [pad]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["p", "W"], ["y"], kernel_shape=[4, 4], **kw))
        inits.append(init("W", w(3, 2, 4, 4)))
    else:
        nodes.append(helper.make_node(op, ["p"], ["y"], **kw))
    m = model(nodes, inits, ["N", 2, 9, 8], opset=opset)
    net = check_against_reference(m, RNG.normal(size=(2, 2, 9, 8)))
    assert [layer.kind for layer in net] == [{"Conv": "Conv2d", "AveragePool": "AvgPool2d"}.get(op, "MaxPool2d")]


@pytest.mark.parametrize(("pads", "value", "mode", "after", "match"), [
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, None, "MaxPool", "before MaxPool.*-inf"),
    ([0, 0, 1, 1, 0, 0, 1, 1], -np.inf, None, "Conv", "value -inf before Conv"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 1.5, None, "Conv", "constant value 1.5"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, "reflect", "Conv", "mode='reflect'"),
    ([0, 1, 0, 0, 0, 0, 0, 0], 0.0, None, "Conv", "batch or channel"),
    ([0, 0, -1, 0, 0, 0, 0, 0], 0.0, None, "Conv", "negative pads"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, None, "Relu", "not into Relu"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, None, None, "end of the graph"),
    ([0, 0, 1, 1, 0, 0, 1, 1], -np.inf, None, "Pad", "-inf, then one with value 0"),
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, None, "GlobalAveragePool", "not into GlobalAveragePool"),
])
def test_other_pads_are_refused_naming_the_node(pads, value, mode, after, match):
    pad, inits = pad_node(13, pads, value, mode=mode, name="the_pad")
    nodes = [pad]
    if after == "Conv":
        nodes.append(helper.make_node("Conv", ["p", "W"], ["y"]))
        inits.append(init("W", w(3, 2, 3, 3)))
    elif after == "MaxPool":
        nodes.append(helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2]))
    elif after == "Pad":
        nodes += [helper.make_node("Pad", ["p", "pads"], ["p2"]),
                  helper.make_node("MaxPool", ["p2"], ["y"], kernel_shape=[3, 3])]
    elif after is not None:
        nodes.append(helper.make_node(after, ["p"], ["y"]))
    bad(nodes, inits, [1, 2, 6, 6], r"node 'the_pad' \(op 'Pad'\).*" + match)


def test_consecutive_pads_add_up():
    first, inits = pad_node(13, [0, 0, 1, 0, 0, 0, 0, 1], out="p0")
    nodes = [first, helper.make_node("Pad", ["p0", "pads2"], ["p"]), helper.make_node("Conv", ["p", "W"], ["y"])]
    inits += [ints("pads2", [0, 0, 0, 1, 0, 0, 1, 0]), init("W", w(3, 2, 3, 3))]
    net = check_against_reference(model(nodes, inits, ["N", 2, 6, 7]), RNG.normal(size=(2, 2, 6, 7)))
    assert net[0].padding == (1, 1, 1, 1)


def test_infinite_scalars_only_as_pad_values():
    """Initializers may hold a -inf scalar (a Pad value); an infinite weight or bias is still an error."""
    for nodes, inits in [([helper.make_node("Gemm", ["x", "W"], ["y"])], [init("W", [[np.inf]])]),
                         ([helper.make_node("Gemm", ["x", "W", "b"], ["y"])],
                          [init("W", [[1.0]]), init("b", [np.inf])]),
                         ([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                          [init("W", [[1.0]]), init("b", -np.inf)])]:
        bad(nodes, inits, [1, 1], "contains NaN or Inf", error=dt.ModelFormatError)
    bad([helper.make_node("Gemm", ["x", "W"], ["y"])], [init("W", [[1.0, np.inf]])], [1, 2], "contains NaN or Inf",
        error=dt.ModelFormatError)
    bad([helper.make_node("Relu", ["x"], ["y"])], [init("unused", np.nan)], [1, 2], "contains NaN or Inf",
        error=dt.ModelFormatError)


def test_constant_pads_computed_by_slice_transpose_constantofshape():
    """TorchScript's ZeroPad2d export (opset >= 11) computes Pad's pads from torch's order with
    ConstantOfShape/Concat/Reshape/Slice(step -1)/Transpose/Reshape/Cast: all evaluated at import."""
    nodes = [helper.make_node("ConstantOfShape", ["four"], ["z"], value=ints("v", [0])),
             helper.make_node("Concat", ["torch_pads", "z"], ["c"], axis=0),
             helper.make_node("Reshape", ["c", "m12"], ["c2"]),
             helper.make_node("Slice", ["c2", "s_start", "s_end", "s_axes", "s_steps"], ["rev"]),
             helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
             helper.make_node("Reshape", ["tr", "m1"], ["flat"]),
             helper.make_node("Cast", ["flat"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "W"], ["y"])]
    inits = [ints("four", [4]), ints("torch_pads", [1, 2, 0, 1]), ints("m12", [-1, 2]), ints("s_start", [-1]),
             ints("s_end", [-(2 ** 63) + 1]), ints("s_axes", [0]), ints("s_steps", [-1]), ints("m1", [-1]),
             init("W", w(3, 2, 3, 3))]
    m = model(nodes, inits, ["N", 2, 7, 7])
    net = check_against_reference(m, RNG.normal(size=(2, 2, 7, 7)))
    assert [layer.kind for layer in net] == ["Conv2d"]
    assert net[0].padding == (0, 1, 1, 2)  # torch's (left 1, right 2, top 0, bottom 1)


@pytest.mark.parametrize(("nodes", "inits", "match"), [
    # the batch size used as the feature count, or as an index, axis or target shape
    ([helper.make_node("Shape", ["x"], ["s"], end=1), helper.make_node("Concat", ["m1", "s"], ["t"], axis=0),
      helper.make_node("Reshape", ["x", "t"], ["y"])], [ints("m1", [-1])], r"Reshape to \[-1, 'batch'\]"),
    ([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "s"], ["g"]),
      helper.make_node("Reshape", ["x", "g"], ["y"])], [], "depend on the batch size"),
    ([helper.make_node("Shape", ["x"], ["s"], start=0, end=1), helper.make_node("Reshape", ["m1", "s"], ["t"]),
      helper.make_node("Reshape", ["x", "t"], ["y"])], [ints("m1", [-1])], "depend on the batch size"),
    ([helper.make_node("Shape", ["x"], ["s"], start=-1), helper.make_node("ConstantOfShape", ["s"], ["t"]),
      helper.make_node("Reshape", ["x", "t"], ["y"])], [], "only an integer value"),
    ([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "one"], ["t"]),
      helper.make_node("Reshape", ["x", "t"], ["y"])], [ints("one", [1])], "depend on the batch size"),
    ([helper.make_node("Mul", ["big", "big"], ["t"]), helper.make_node("Reshape", ["x", "t"], ["y"])],
     [ints("big", [2 ** 40, 1])], "integer arithmetic on values beyond"),
])
def test_batch_size_marker_cannot_become_a_number(nodes, inits, match):
    bad(nodes, inits, ["N", 6], match)


def test_shape_of_constants_and_integer_arithmetic():
    """TorchScript without constant folding computes ZeroPad2d's pads as 2 * 4 - len(torch_pads) zeros
    after them: Shape of a constant, Gather, Mul, Sub, ConstantOfShape, Concat."""
    nodes = [helper.make_node("Shape", ["torch_pads"], ["n"]),
             helper.make_node("Gather", ["n", "zero"], ["n0"], axis=0),
             helper.make_node("Mul", ["four", "two"], ["eight"]),
             helper.make_node("Sub", ["eight", "n0"], ["rest"]),
             helper.make_node("Add", ["rest", "zero"], ["rest2"]),
             helper.make_node("ConstantOfShape", ["rest2"], ["z"], value=ints("v", [0])),
             helper.make_node("Concat", ["z", "torch_pads"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2])]
    inits = [ints("torch_pads", [0, 0, 1, 0]), ints("zero", [0]), ints("four", 4), ints("two", 2)]
    net = check_against_reference(model(nodes, inits, ["N", 2, 5, 5]), RNG.normal(size=(2, 2, 5, 5)))
    assert net[0].padding == (0, 1, 0, 0)  # x3_end (H, bottom) = 1


def test_shape_start_end_of_unknown_sizes_needs_input_shape():
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Reshape", ["x", "s"], ["y"])]
    bad(nodes, [], ["N", 2, "H", "W"], "not static; pass input_shape", opset=18)


# ----------------------------------------------------------------------------------------------- fuzz


def test_fuzz_mutated_onnx_raises_only_library_errors():
    nodes = lenet_nodes({"pads": [1, 1, 1, 1]}, {"kernel_shape": [2, 2], "strides": [2, 2]}, gap=True)
    nodes.append(helper.make_node("Gemm", ["f", "Wd", "bd"], ["y"], transB=1))
    inits = [init("Wc", w(4, 2, 4, 4)), init("bc", w(4)), init("Wc2", w(3, 4, 2, 2)), init("Wd", w(5, 3)),
             init("bd", w(5))]
    data = model(nodes, inits, ["N", 2, 12, 12], ["N", 5]).SerializeToString()
    assert len(load_onnx(data)) == 8
    rng = np.random.default_rng(31)
    failures = 0
    for _ in range(200):
        b = bytearray(data)
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        elif kind == 1:
            b = b[: int(rng.integers(len(b)))]
        else:
            pos = int(rng.integers(len(b)))
            b[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 12))).astype(np.uint8).tobytes()
        try:
            net = load_onnx(bytes(b))
        except dt.DeepTaylorError:
            failures += 1
            continue
        assert isinstance(net, dt.Graph)
    assert failures > 0
