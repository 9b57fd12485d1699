from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from penjing.export.qdq import quantize_biases


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
