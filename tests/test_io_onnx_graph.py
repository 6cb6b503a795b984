"""ONNX graphs: models exported by both torch exporters (TorchScript ``dynamo=False`` and dynamo) to a
directory with external data (``m.onnx`` + ``m.onnx.data``), imported as a dt.Graph and checked against
torch (forward) and against ``from_torch`` (heatmaps); hand-built graphs against onnx's ReferenceEvaluator;
the refusals; and crafted external-data locations (absolute, '..', links out, missing, truncated)."""

from __future__ import annotations

import os
import sys
import types
import warnings

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.io.onnx import load_onnx
from deeptaylor.passes import canonicalize

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

RNG = np.random.default_rng(2024)
NAME_OK = r"^[A-Za-z0-9_.:/\-\[\]]+$"


def w(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def model(nodes, inits, in_shape, opset=13):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check_reference(m, x, **kw):
    net = load_onnx(m.SerializeToString(), **kw)
    ref = ReferenceEvaluator(m).run(None, {"x": x.astype(np.float32)})[0]
    got = net.forward(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    return net


def kinds(net):
    return [layer.kind for layer in net]


# ------------------------------------------------------------------------------------ hand-built graphs


def test_residual_add_sum_and_concat_graph():
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),  # residual
             helper.make_node("Sum", ["a", "r1", "c1"], ["s"], name="sum3"),
             helper.make_node("Concat", ["s", "x"], ["cat"], axis=1, name="cat"),
             helper.make_node("Relu", ["cat"], ["y"], name="out")]
    m = model(nodes, [init("W1", w(4, 2, 3, 3)), init("b1", w(4)), init("W2", w(4, 4, 3, 3))], ["N", 2, 5, 5])
    net = check_reference(m, RNG.normal(size=(3, 2, 5, 5)))
    assert isinstance(net, dt.Graph)
    assert not isinstance(net, dt.Sequential)
    assert net.names == ("conv1", "relu1", "conv2", "add", "sum3", "cat", "out")
    assert kinds(net) == ["Conv2d", "ReLU", "Conv2d", "Add", "Add", "Concat", "ReLU"]
    assert net.nodes[4].inputs == (4, 2, 1)
    assert net.input_shape == (2, 5, 5)


def test_names_are_sanitised_and_unique():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/block 1/relu#1"),
             helper.make_node("Relu", ["a"], ["b"], name="/block 1/relu#1"),
             helper.make_node("Relu", ["b"], ["y"])]
    net = load_onnx(model(nodes, [], ["N", 3]).SerializeToString())
    assert net.names == ("block_1/relu_1", "block_1/relu_1_2", "y")


@pytest.mark.parametrize("pool", [
    {"op": "AveragePool", "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},  # count_include_pad=0
    {"op": "AveragePool", "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 0], "count_include_pad": 1},
    {"op": "AveragePool", "kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    {"op": "MaxPool", "kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"op": "MaxPool", "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
])
def test_pools_with_ceil_mode_and_count_include_pad(pool):
    pool = dict(pool)
    op = pool.pop("op")
    nodes = [helper.make_node(op, ["x"], ["y"], **pool)]
    check_reference(model(nodes, [], ["N", 2, 6, 7], opset=19), RNG.normal(size=(2, 2, 6, 7)))


def test_grouped_and_depthwise_conv_and_conv_transpose():
    nodes = [helper.make_node("Conv", ["x", "Wg", "bg"], ["g"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["g", "Wd"], ["d"], group=6, strides=[2, 1], pads=[0, 1, 1, 0]),
             helper.make_node("ConvTranspose", ["d", "Wt", "bt"], ["t"], strides=[2, 2], pads=[1, 0, 0, 1],
                              output_padding=[1, 0]),  # (onnx's reference has no grouped ConvTranspose)
             helper.make_node("ConvTranspose", ["t", "Wt2"], ["y"], dilations=[2, 1])]
    inits = [init("Wg", w(6, 2, 3, 3)), init("bg", w(6)), init("Wd", w(6, 1, 2, 2)), init("Wt", w(6, 4, 3, 3)),
             init("bt", w(4)), init("Wt2", w(4, 3, 2, 2))]
    net = check_reference(model(nodes, inits, ["N", 4, 7, 6]), RNG.normal(size=(2, 4, 7, 6)))
    assert [layer.groups for layer in net] == [2, 6, 1, 1]
    assert kinds(net) == ["Conv2d", "Conv2d", "ConvTranspose2d", "ConvTranspose2d"]


def test_batchnorm_anywhere_is_a_node():
    bn = [init("s", RNG.uniform(0.5, 2, 3)), init("b", w(3)), init("m", w(3)), init("v", RNG.uniform(0.5, 2, 3))]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["n"], epsilon=1e-3, name="bn"),
             helper.make_node("Conv", ["n", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn2")]
    net = check_reference(model(nodes, [*bn, init("W", w(3, 3, 1, 1))], ["N", 3, 4, 4], opset=15),
                          RNG.normal(size=(2, 3, 4, 4)))
    assert kinds(net) == ["ReLU", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    assert net[1].eps == pytest.approx(1e-3)
    assert kinds(canonicalize(net)) == ["ReLU", "BatchNorm2d", "Conv2d"]  # the second one folds


@pytest.mark.parametrize(("opset", "split"), [(11, "attr"), (13, "input"), (18, "num_outputs"), (13, "equal")])
def test_split_and_slice_on_channels(opset, split):
    kw, ins, inits = {}, ["x"], []
    if split == "attr":
        kw["split"] = [2, 4]
    elif split == "input":
        ins.append("sp")
        inits.append(ints("sp", [2, 4]))
    elif split == "num_outputs":
        kw["num_outputs"] = 2
    nodes = [helper.make_node("Split", ins, ["a", "b"], axis=1, name="split", **kw),
             helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Slice", ["x", "st", "en", "ax"], ["s"], name="slice"),
             helper.make_node("Concat", ["rb", "a", "s"], ["y"], axis=-3)]
    inits += [ints("st", [1, 0]), ints("en", [-2, 1 << 40]), ints("ax", [1, 3])]
    net = check_reference(model(nodes, inits, ["N", 6, 3, 3], opset=opset), RNG.normal(size=(2, 6, 3, 3)))
    assert "split:0" in net.names
    assert "split:1" in net.names
    halves = [(0, 2), (2, 6)] if split in ("attr", "input") else [(0, 3), (3, 6)]
    assert sorted((layer.start, layer.stop) for layer in net if layer.kind == "Slice") == sorted([*halves, (1, 4)])


def test_channel_shuffle_from_reshape_transpose_reshape():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s5"], ["g"]),
             helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s4"], ["y"], name="shuffle")]
    net = check_reference(model(nodes, [ints("s5", [0, 3, -1, 2, 5]), ints("s4", [-1, 12, 2, 5])], [2, 12, 2, 5]),
                          RNG.normal(size=(2, 12, 2, 5)))
    assert kinds(net) == ["ReLU", "ChannelShuffle"]
    assert net[1].groups == 3


@pytest.mark.parametrize("order", ["torchscript", "onnxscript", "half_first"])
def test_erf_gelu_pattern(order):
    if order == "torchscript":  # x * (erf(x / sqrt 2) + 1) * 0.5
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["y"], name="gelu")]
    elif order == "onnxscript":  # x * (0.5 * (erf(x / sqrt 2) + 1))
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["one", "e"], ["p"]), helper.make_node("Mul", ["half", "p"], ["h"]),
                 helper.make_node("Mul", ["x", "h"], ["y"], name="gelu")]
    else:  # (0.5 x) * (1 + erf(x * (1 / sqrt 2)))
        nodes = [helper.make_node("Mul", ["x", "isqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "half"], ["hx"]),
                 helper.make_node("Mul", ["hx", "p"], ["y"], name="gelu")]
    inits = [init("sqrt2", np.sqrt(2)), init("isqrt2", 1 / np.sqrt(2)), init("one", 1.0), init("half", 0.5)]
    net = check_reference(model(nodes, inits, ["N", 3, 4, 4]), RNG.normal(size=(2, 3, 4, 4)) * 2)
    assert kinds(net) == ["GELU"]
    assert net[0].approximate == "none"


@pytest.mark.parametrize(("node", "kind"), [
    (helper.make_node("Clip", ["x", "zero", "six"], ["y"]), "ReLU6"),
    (helper.make_node("Clip", ["x", "zero"], ["y"]), "ReLU"),
    (helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2), "LeakyReLU"),
    (helper.make_node("Elu", ["x"], ["y"], alpha=0.7), "ELU"),
    (helper.make_node("Sigmoid", ["x"], ["y"]), "Sigmoid"),
    (helper.make_node("Tanh", ["x"], ["y"]), "Tanh"),
    (helper.make_node("HardSigmoid", ["x"], ["y"], alpha=1 / 6, beta=0.5), "Hardsigmoid"),
    (helper.make_node("HardSwish", ["x"], ["y"]), "Hardswish"),
    (helper.make_node("Gelu", ["x"], ["y"], approximate="tanh"), "GELU"),
])
def test_activations(node, kind):
    opset = 20 if node.op_type == "Gelu" else 14
    net = check_reference(model([node], [init("zero", 0.0), init("six", 6.0)], ["N", 3, 2, 2], opset=opset),
                          RNG.normal(size=(2, 3, 2, 2)) * 4)
    assert kinds(net) == [kind]


def test_clip_attributes_before_opset_11():
    net = check_reference(model([helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], [], ["N", 5], opset=9),
                          RNG.normal(size=(3, 5)) * 4)
    assert kinds(net) == ["ReLU6"]


def test_self_gates_become_silu_and_hardswish_and_other_gates_mul():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["a"], name="silu"),
             helper.make_node("HardSigmoid", ["a"], ["h"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["h", "a"], ["b"], name="hswish"),
             helper.make_node("GlobalAveragePool", ["b"], ["p"]), helper.make_node("Conv", ["p", "W"], ["q"]),
             helper.make_node("Sigmoid", ["q"], ["gate"]),
             helper.make_node("Mul", ["gate", "b"], ["y"], name="se")]
    net = check_reference(model(nodes, [init("W", w(3, 3, 1, 1))], ["N", 3, 4, 4]), RNG.normal(size=(2, 3, 4, 4)))
    assert kinds(net) == ["SiLU", "Hardswish", "AvgPool2d", "Conv2d", "Sigmoid", "Mul"]
    assert net.names[:2] == ("silu", "hswish")
    se = net.node("se")
    assert se.inputs == (2, 5)  # the signal first, the gate second (dt.Mul orders them)


def test_constants_become_bias_or_affine_nodes():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("Add", ["c", "cb"], ["cb1"]),  # the conv's bias
             helper.make_node("Relu", ["cb1"], ["r"]),
             helper.make_node("Mul", ["r", "scale"], ["m"]),  # per channel: affine node
             helper.make_node("Sub", ["m", "two"], ["s"]),  # scalar: affine node
             helper.make_node("Sub", ["three", "s"], ["s2"]),
             helper.make_node("Div", ["s2", "four"], ["d"]),  # a pending scale, then a node
             helper.make_node("Relu", ["d"], ["y"])]
    inits = [init("W", w(3, 2, 2, 2)), init("cb", w(1, 3, 1, 1)), init("scale", w(3, 1, 1)), init("two", 2.0),
             init("three", 3.0), init("four", 4.0)]
    net = check_reference(model(nodes, inits, ["N", 2, 4, 4]), RNG.normal(size=(2, 2, 4, 4)))
    assert kinds(net) == ["Conv2d", "ReLU", "BatchNorm2d", "BatchNorm2d", "BatchNorm2d", "BatchNorm2d", "ReLU"]
    assert np.allclose(net[0].bias, numpy_helper.to_array(inits[1]).reshape(-1))


def test_bias_not_folded_into_a_layer_read_twice():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Add", ["hb", "h"], ["y"])]
    net = check_reference(model(nodes, [init("W", w(4, 4)), init("b", w(4))], ["N", 4]), RNG.normal(size=(3, 4)))
    assert kinds(net) == ["Dense", "BatchNorm1d", "Add"]
    assert not np.any(net[0].bias)


@pytest.mark.parametrize(("opset", "form"), [(9, "upsample"), (10, "resize10"), (13, "scales"), (13, "sizes"),
                                              (13, "asymmetric"), (19, "half_pixel")])
def test_nearest_upsampling(opset, form):
    if form == "upsample":
        nodes = [helper.make_node("Upsample", ["x", "sc"], ["y"], mode="nearest")]
    elif form == "resize10":
        nodes = [helper.make_node("Resize", ["x", "sc"], ["y"], mode="nearest")]
    elif form == "sizes":
        nodes = [helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="nearest")]
    elif form == "asymmetric":
        nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest",
                                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    else:
        nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest",
                                  coordinate_transformation_mode=form if form != "scales" else "half_pixel")]
    inits = [init("sc", [1, 1, 2, 3]), ints("sz", [2, 3, 6, 12])]
    m = model(nodes, inits, [2, 3, 3, 4], opset=opset)
    x = RNG.normal(size=(2, 3, 3, 4))
    if form == "resize10":  # onnx's reference evaluator lacks Resize-10 (Upsample-9's semantics)
        net = load_onnx(m.SerializeToString())
        np.testing.assert_array_equal(net.forward(x), np.repeat(np.repeat(x, 2, axis=2), 3, axis=3))
    else:
        net = check_reference(m, x)
    assert kinds(net) == ["Upsample"]
    assert net[0].scale_factor == (2, 3)


def test_chain_without_static_size_is_a_sequential():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    net = load_onnx(model(nodes, [init("W", w(3, 2, 3, 3))], ["N", 2, "H", "W"]).SerializeToString())
    assert isinstance(net, dt.Sequential)
    assert net.output_shape((1, 2, 7, 9)) == (1, 3, 7, 9)


@pytest.mark.parametrize(("nodes", "inits", "shape", "match"), [
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
      helper.make_node("Mul", ["a", "b"], ["y"], name="prod")], [], ["N", 4], r"'prod'.*neither operand is a gate"),
    ([helper.make_node("Erf", ["x"], ["y"], name="erf")], [], ["N", 4], r"'erf'.*GELU pattern"),
    ([helper.make_node("Div", ["x", "c"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
      helper.make_node("Add", ["e", "c"], ["y"])], [init("c", 1.4142135)], ["N", 4], "GELU pattern"),
    ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [init("lo", -1.0), init("hi", 1.0)], ["N", 4],
     r"Clip to \[-1.0, 1.0\]"),
    ([helper.make_node("HardSigmoid", ["x"], ["y"])], [], ["N", 4], "alpha=0.2"),
    ([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")], [init("sc", [1, 1, 2, 2])],
     ["N", 1, 2, 2], "mode='linear'"),
    ([helper.make_node("Resize", ["x", "", "sc"], ["y"])], [init("sc", [1, 1, 1.5, 2])], ["N", 1, 2, 2],
     "integer scales"),
    ([helper.make_node("Resize", ["x", "", "sc"], ["y"], coordinate_transformation_mode="asymmetric")],
     [init("sc", [1, 1, 2, 2])], ["N", 1, 2, 2], "asymmetric"),
    ([helper.make_node("Concat", ["x", "x"], ["y"], axis=2)], [], ["N", 1, 2, 2], "axis=2"),
    ([helper.make_node("Concat", ["x", "c"], ["y"], axis=1)], [init("c", np.ones((1, 1, 2, 2)))], ["N", 1, 2, 2],
     "constants"),
    ([helper.make_node("Split", ["x"], ["a", "b"], axis=2)], [], ["N", 1, 2, 2], "axis=2"),
    ([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2])], [], ["N", 1, 2, 2], r"perm=\[0, 1, 3, 2\]"),
    ([helper.make_node("Reshape", ["x", "s"], ["y"])], [ints("s", [0, 2, 2])], ["N", 1, 2, 2], "only flattening"),
    ([helper.make_node("Reshape", ["x", "s"], ["y"])], [ints("s", [3, -1])], ["N", 1, 2, 2], "not a flatten"),
    ([helper.make_node("Sub", ["x", "x"], ["y"])], [], ["N", 4], "Sub of two computed"),
    ([helper.make_node("Div", ["c", "x"], ["y"])], [init("c", 2.0)], ["N", 4], "division by a computed"),
    ([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], [ints("s", [1]), ints("e", [2]), ints("a", [2])],
     ["N", 1, 3, 3], "only a contiguous range of channels"),
    ([helper.make_node("Add", ["x", "c"], ["y"])], [init("c", np.ones((1, 1, 1, 2)))], ["N", 2, 2, 2],
     "not a per-channel bias"),
    ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])], [], ["N", "F"],
     "pass input_shape"),
])
def test_refusals_name_the_node(nodes, inits, shape, match):
    with pytest.raises(dt.UnsupportedError, match=match):
        load_onnx(model(nodes, inits, shape, opset=13).SerializeToString())


# ------------------------------------------------------------------------------------- external data


def ext_model(tmp_path, location, data=None, offset=None, length=None, dims=(3, 4), name="m.onnx"):
    """A Gemm model in ``tmp_path / name`` whose weight is external data at ``location``."""
    t = TensorProto()
    t.name = "W"
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    if offset is not None:
        t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))
    m = model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [t], ["N", 4])
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def test_external_data_inside_the_directory_is_read(tmp_path):
    W = w(3, 4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 8 + W.tobytes() + b"tail")
    path = ext_model(tmp_path, "sub/w.bin", offset=8, length=48)
    net = dt.load(path)
    np.testing.assert_array_equal(net[0].weight, W.astype(np.float64))
    os.symlink(tmp_path / "sub" / "w.bin", tmp_path / "link.bin")  # a link that stays inside is fine
    assert np.array_equal(load_onnx(ext_model(tmp_path, "link.bin", offset=8, length=48))[0].weight, net[0].weight)
    (tmp_path / "whole.bin").write_bytes(W.tobytes())  # no offset, no length: the whole file
    assert np.array_equal(load_onnx(ext_model(tmp_path, "./whole.bin"))[0].weight, net[0].weight)


def test_crafted_external_data_locations_are_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(w(3, 4).tobytes())
    d = tmp_path / "model"
    d.mkdir()
    os.symlink(outside, d / "out_link.bin")
    os.symlink(tmp_path, d / "up")
    (d / "short.bin").write_bytes(b"\0" * 40)
    (d / "ok.bin").write_bytes(b"\0" * 48)
    (d / "dir.bin").mkdir()
    cases = [
        (str(outside), {}, "not a relative path"),
        ("../outside.bin", {}, "not a relative path"),
        ("sub/../../outside.bin", {}, "not a relative path"),
        ("..\\outside.bin", {}, "not a relative path"),
        ("C:/outside.bin", {}, "not a relative path"),
        ("", {}, "not a relative path"),
        ("out_link.bin", {}, "outside the model's directory"),
        ("up/outside.bin", {}, "outside the model's directory"),
        ("missing.bin", {}, "cannot be opened"),
        ("short.bin", {}, "40 bytes for a tensor of shape \\(3, 4\\) that needs 48"),
        ("short.bin", {"length": 48}, "beyond the file's 40 bytes"),
        ("ok.bin", {"offset": 8, "length": 48}, "beyond the file"),
        ("ok.bin", {"offset": 1 << 62, "length": 48}, "beyond the file"),
        ("ok.bin", {"length": 44}, "44 bytes for a tensor"),
        ("ok.bin", {"offset": "x"}, "not integers"),
        ("dir.bin", {}, "not a regular file|cannot be opened"),
        (".", {}, "outside the model's directory|not a regular file|cannot be opened"),
    ]
    for location, kw, match in cases:
        path = ext_model(d, location, **kw)
        with pytest.raises(dt.ModelFormatError, match=match) as info:
            dt.load(path)
        assert "'W'" in str(info.value), location  # the tensor is named


def test_external_data_in_a_bytes_model_says_to_load_from_the_path(tmp_path):
    path = ext_model(tmp_path, "w.bin")
    with pytest.raises(dt.ModelFormatError, match="load the model from its path"):
        load_onnx(path.read_bytes())


def test_external_data_size_beyond_the_limit_is_refused_before_reading(tmp_path):
    path = ext_model(tmp_path, "w.bin", dims=(1 << 20, 1 << 20))
    with pytest.raises(dt.ModelFormatError, match="W"):
        dt.load(path)


# ------------------------------------------------------------------------------------ torch exports


def torch_modules():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
            self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

        def forward(self, x):
            h = F.relu(self.b1(self.c1(x)))
            h = F.relu(self.b2(self.c2(h)) + h)
            h = F.relu(self.c3(h) + self.down(h))
            return self.fc(torch.flatten(self.pool(h), 1))

    class Concatenating(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(7, 5, 3, padding=1)
            self.bn, self.fc = nn.BatchNorm2d(12), nn.Linear(12 * 3 * 3, 5)

        def forward(self, x):
            h = torch.cat([x, F.leaky_relu(self.c1(x), 0.1)], 1)
            h = torch.cat([h, F.elu(self.c2(h))], 1)
            h = F.max_pool2d(F.relu(self.bn(h)), 3, 2, ceil_mode=True)
            h = F.avg_pool2d(h, 2, 2, padding=1, count_include_pad=False)
            return self.fc(h.flatten(1))

    class Grouped(nn.Module):  # grouped + depthwise conv, chunk, channel shuffle, ReLU6, hardswish, GELU
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
            self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = F.relu6(self.c1(x))
            a, b = h.chunk(2, dim=1)
            h = torch.cat([a, F.hardswish(b)], 1)
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, c, hh, ww)
            h = self.pw(F.gelu(self.dw(h)))
            return self.fc(h.mean((2, 3)))

    class Gated(nn.Module):  # squeeze-excitation, SiLU, x * hardsigmoid(x), a full-size gate, tanh
        def __init__(self):
            super().__init__()
            self.c, self.f1, self.f2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            h = F.silu(self.c(x))
            h = h * torch.sigmoid(self.f2(F.relu(self.f1(F.adaptive_avg_pool2d(h, 1)))))
            h = self.c2(h)
            h = h * F.hardsigmoid(h)
            h = h * torch.sigmoid(self.c2(h))
            return self.fc(torch.tanh(F.adaptive_avg_pool2d(h, 1)).flatten(1))

    class Upsampling(nn.Module):  # transposed convs, nearest upsampling (integer, anisotropic), concat
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.t = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
            self.up, self.c2 = nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(10, 4, 3, padding=1)
            self.tg = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=2)
            self.fc = nn.Linear(4 * 16 * 32, 3)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            h = torch.sigmoid(self.c2(torch.cat([self.t(h), self.up(h), x], 1)))
            h = F.interpolate(self.tg(h), scale_factor=(1, 2), mode="nearest")
            return self.fc(F.relu(h).flatten(1))

    return torch, {"residual": (Residual, (3, 16, 16)), "concatenating": (Concatenating, (3, 8, 8)),
                   "grouped": (Grouped, (4, 6, 6)), "gated": (Gated, (3, 8, 8)), "upsampling": (Upsampling, (2, 8, 8))}


def build(name):
    torch, cases = torch_modules()
    cls, shape = cases[name]
    torch.manual_seed(0)
    m = cls().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return torch, m, shape


def export(torch, m, shape, exporter, directory):
    """Write ``directory / m.onnx`` with its weights in ``m.onnx.data``: the dynamo exporter does that by
    itself (torch 2.13's default); the TorchScript one's file is re-saved so (as onnx.save_model does
    for models over 2 GB)."""
    path = directory / "m.onnx"
    x = torch.zeros(2, *shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter.startswith("dynamo"):
                pytest.importorskip("onnxscript")
                torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False, external_data=True,
                                  optimize=exporter == "dynamo")
            else:
                opset = {"torchscript": None, "torchscript13": 13}[exporter]
                torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                                  dynamic_axes={"x": {0: "batch"}}, do_constant_folding=False)
                mp = onnx.load(str(path))
                onnx.save_model(mp, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location="m.onnx.data", size_threshold=0)
    except ImportError as exc:  # pragma: no cover - an exporter dependency is missing; any other error fails
        pytest.skip(f"torch.onnx.export unavailable: {exc}")
    mp = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in mp.graph.initializer)
    assert (directory / "m.onnx.data").exists()
    return path, mp


EXPORTERS = ["dynamo", "torchscript", "torchscript13"]  # torchscript13: Erf GELU, HardSigmoid*x, Clip inputs
MODELS = ["residual", "concatenating", "grouped", "gated", "upsampling"]


def heatmap_diff(a, b):
    scale = np.abs(b).max(axis=tuple(range(1, b.ndim)), keepdims=True)
    return float(np.max(np.abs(a - b) / np.where(scale > 0, scale, 1)))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exported_graphs_match_torch(tmp_path, exporter, name):
    torch, m, shape = build(name)
    path, mp = export(torch, m, shape, exporter, tmp_path)
    net = dt.load(path)
    assert isinstance(net, dt.Graph)
    assert net.input_shape == shape
    assert all(__import__("re").match(NAME_OK, n) for n in net.names)
    assert len(set(net.names)) == len(net.names)
    onnx_names = {n.name.lstrip("/") for n in mp.graph.node}
    assert sum(n in onnx_names for n in net.names) >= len(net) // 2  # named after the ONNX nodes
    x = np.random.default_rng(5).uniform(-0.2, 1, size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy().astype(np.float64)
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    expected = {"grouped": {"Conv2d", "Slice", "ChannelShuffle", "ReLU6", "Hardswish", "GELU"},
                "gated": {"SiLU", "Mul", "Hardswish", "Sigmoid", "Tanh"},
                "upsampling": {"ConvTranspose2d", "Upsample", "Concat"},
                "residual": {"Add"}, "concatenating": {"Concat", "LeakyReLU", "ELU", "MaxPool2d", "AvgPool2d"}}[name]
    assert expected <= set(kinds(net)), kinds(net)
    if name == "grouped":
        assert {layer.groups for layer in net if layer.kind == "Conv2d"} == {1, 2, 8}


@pytest.mark.parametrize("name", MODELS)
def test_exported_graphs_explain_as_from_torch(tmp_path, name):
    """Heatmaps (epsilon_plus_flat, NumPy reference) of both exports agree with each other and with the
    same torch module through from_torch."""
    torch, m, shape = build(name)
    x = np.random.default_rng(7).uniform(0.05, 0.95, size=(2, *shape)).astype(np.float32)
    maps = {}
    for exporter in ("dynamo", "torchscript"):
        d = tmp_path / exporter
        d.mkdir()
        net = dt.load(export(torch, m, shape, exporter, d)[0])
        maps[exporter] = dt.Explainer(net, "epsilon_plus_flat", backend="numpy").explain(x).relevance
    assert heatmap_diff(maps["dynamo"], maps["torchscript"]) <= 1e-5
    try:
        ref_net = dt.from_torch(m, input_shape=shape)
    except dt.UnsupportedError as exc:  # pragma: no cover - from_torch (torch.fx) does not read the model yet
        pytest.skip(f"from_torch: {exc}")
    ref = dt.Explainer(ref_net, "epsilon_plus_flat", backend="numpy").explain(x).relevance
    assert heatmap_diff(maps["dynamo"], ref) <= 1e-5


def import_torchvision():
    """torchvision 0.28.0 from PyPI is built for CUDA torch; its compiled ops fail to register beside the
    CPU torch, so an empty ``torchvision._meta_registrations`` is registered first (the models are pure
    Python)."""
    pytest.importorskip("torch")
    name = "torchvision._meta_registrations"
    if "torchvision" not in sys.modules and name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure: skip
        pytest.skip(f"torchvision does not import: {type(exc).__name__}: {exc}")
    if not hasattr(torchvision, "models") or not hasattr(torchvision.models, "resnet18"):
        pytest.skip("torchvision is a stand-in (no model zoo)")
    return torchvision


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), [
    *[(arch, exporter) for arch in ("resnet18", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5")
      for exporter in ("dynamo", "torchscript")],
    ("densenet121", "dynamo_unoptimised"),
])
def test_torchvision_models_exported_to_onnx(tmp_path, arch, exporter):
    """The torchvision zoo through ONNX: forward equals torch; heatmaps equal from_torch's (<= 1e-5).

    One exception, a property of the file and not of the import: the dynamo exporter's optimiser
    (``optimize=True``, its default) folds the BatchNorms that follow a convolution into its weights in
    float32, which moves the weights by an ulp from the float64 fold that ``from_torch`` and
    ``canonicalize`` compute; DenseNet's epsilon_plus_flat heatmaps amplify that to ~1e-3 (max-normalised).
    Exported unoptimised (BatchNormalization nodes kept, folded by ``canonicalize``), they agree to 1e-9."""
    tv = import_torchvision()
    import torch

    torch.manual_seed(0)
    m = getattr(tv.models, arch)(weights=None).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    shape = (3, 64, 64)
    path, _ = export(torch, m, shape, exporter, tmp_path)
    net = dt.load(path)
    x = np.random.default_rng(3).uniform(0.05, 0.95, size=(2, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy().astype(np.float64)
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    try:
        ref_net = dt.from_torch(m, input_shape=shape)
    except dt.UnsupportedError as exc:  # pragma: no cover - from_torch (torch.fx) does not read the model yet
        pytest.skip(f"from_torch: {exc}")
    got = dt.Explainer(net, "epsilon_plus_flat", backend="numpy").explain(x).relevance
    want = dt.Explainer(ref_net, "epsilon_plus_flat", backend="numpy").explain(x).relevance
    assert heatmap_diff(got, want) <= (2e-3 if (arch, exporter) == ("densenet121", "dynamo") else 1e-5)
