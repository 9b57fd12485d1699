from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from penjing.export.qdq import float_joins, pad_into_conv, prune_unused, quantize_biases


def test_gemm_without_trans_b_keeps_its_float_bias():
    """Regression: a Gemm that leaves transB at its default 0 holds its weight as
    (in, out), so per-channel weight scales run along the inputs, not the bias; the bias
    pass once took only an explicit transB=0 for that and failed on the shapes."""
    inits = [
        numpy_helper.from_array(np.int8(np.ones((3, 2))), "w"),
        numpy_helper.from_array(np.float32([0.1, 0.2, 0.3]), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
        numpy_helper.from_array(np.uint8(np.ones((1, 3))), "x"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.uint8(0), "x_zero"),
        numpy_helper.from_array(np.float32([1.0, -1.0]), "bias"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
        helper.make_node("Gemm", ["xf", "wf", "bias"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_biases(model) == 0
    assert model.graph.node[-1].input[2] == "bias"
    onnx.checker.check_model(model)


def _dq(name: str) -> tuple[list, list]:
    """A uint8 input `name` behind a DequantizeLinear whose output is `name`_f."""
    inits = [numpy_helper.from_array(np.uint8(np.ones((1, 2))), name),
             numpy_helper.from_array(np.float32(0.1), f"{name}_s"),
             numpy_helper.from_array(np.uint8(3), f"{name}_z")]
    return inits, [helper.make_node("DequantizeLinear", [name, f"{name}_s", f"{name}_z"],
                                    [f"{name}_f"])]


def test_a_join_counts_as_integer_only_between_dequantize_and_quantize():
    inits, nodes = [], []
    for name in ("a", "b"):
        i, n = _dq(name)
        inits += i
        nodes += n
    inits.append(numpy_helper.from_array(np.float32([[1.0, 2.0]]), "float"))
    nodes += [
        helper.make_node("Add", ["a_f", "b_f"], ["fused"], name="fused"),
        helper.make_node("Relu", ["fused"], ["fused_relu"]),  # ORT folds it into the Q
        helper.make_node("QuantizeLinear", ["fused_relu", "a_s", "a_z"], ["fused_q"]),
        helper.make_node("Mul", ["a_f", "b_f"], ["to_float"], name="to_float"),
        helper.make_node("Exp", ["to_float"], ["exp"]),
        helper.make_node("Concat", ["a_f", "b_f"], ["returned"], name="returned", axis=0),
        helper.make_node("Add", ["a_f", "float"], ["half"], name="half"),
        helper.make_node("QuantizeLinear", ["half", "a_s", "a_z"], ["half_q"]),
    ]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in [
        ("fused_q", TensorProto.UINT8), ("exp", TensorProto.FLOAT),
        ("returned", TensorProto.FLOAT), ("half_q", TensorProto.UINT8)]]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    # Mul feeds a float op, Concat a graph output: both dequantize around a float op;
    # the Add of a float constant is not a join of quantized values at all
    assert float_joins(model) == ({"add": 1}, ["to_float", "returned"])


def _padded_conv(pads: list[int], fill: float = 0.0, conv_pads: list[int] | None = None):
    """x → Pad(pads, fill) → Conv 3×3, pads built by Constant → Cast as the exporter does."""
    w = np.random.default_rng(0).normal(size=(2, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["p64"], value=numpy_helper.from_array(
            np.array(pads, np.float32))),
        helper.make_node("Cast", ["p64"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads", "fill"], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", "w"], ["y"], **({"pads": conv_pads} if conv_pads else {})),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, None, None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(fill), "fill")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_zero_padding_folds_into_the_conv_with_the_same_numbers():
    x = np.random.default_rng(1).normal(size=(1, 1, 5, 5)).astype(np.float32)
    cases = [([0, 0, 0, 1, 0, 0, 1, 2], None), ([0, 0, 1, 1, 0, 0, 1, 1], [1, 0, 0, 1])]
    for pads, conv_pads in cases:
        model = _padded_conv(pads, conv_pads=conv_pads)
        want = _run(model, x)
        assert pad_into_conv(model) == 1
        prune_unused(model)
        assert [n.op_type for n in model.graph.node] == ["Conv"]  # the pads chain is gone
        onnx.checker.check_model(model)
        np.testing.assert_array_equal(_run(model, x), want)


def test_padding_that_is_no_conv_padding_stays():
    for model in (_padded_conv([0, 0, 1, 1, 0, 0, 1, 1], fill=1.0),  # not zero
                  _padded_conv([0, 1, 1, 1, 0, 0, 1, 1]),  # a channel
                  _padded_conv([0, 0, -1, 0, 0, 0, 0, 0])):  # a crop
        assert pad_into_conv(model) == 0
        assert "Pad" in {n.op_type for n in model.graph.node}
