"""Make an exported QDQ graph one that ONNX Runtime fuses into integer kernels.

The PyTorch exporter writes weights as float initializers followed by QuantizeLinear,
and biases as float. ORT's QDQ fusions (QLinearConv, QGemm, ...) want the weight stored
as int8 behind a DequantizeLinear and, where a bias exists, an int32 bias quantized with
scale s_x·s_w. This pass does both with numpy, exactly as QuantizeLinear would.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops whose input 2 is a bias that ORT's fused integer kernels expect as int32.
_BIAS_OPS = {"Conv", "Gemm"}
_INT32_MAX = 2**31 - 1


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    for node in graph.node:  # the exporter shares equal constants through Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _axis(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    return 1  # ONNX's default


def _broadcast(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1):
    """ONNX QuantizeLinear in numpy: round half to even, saturate to the zero point's type."""
    info = np.iinfo(zero_point.dtype)
    s = _broadcast(scale.astype(np.float32), x.ndim, axis)
    z = _broadcast(zero_point.astype(np.int64), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


# Element-wise ops the exporter leaves on constant weights (the clamp of a weight range
# narrower than the int8 container, e.g. 7-bit weights): evaluated here so QuantizeLinear
# sees a constant and the weight is stored as integers.
_CONSTANT_OPS = {"Min": np.minimum, "Max": np.maximum}


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Replace QuantizeLinear(float constant) by its integer result; return how many.

    Min / Max nodes whose inputs are all constants are evaluated first."""
    graph = model.graph
    consts = _constants(graph)
    keep, new_inits, folded = [], [], 0
    for node in graph.node:
        op = _CONSTANT_OPS.get(node.op_type)
        if op is not None and len(node.input) == 2 and all(i in consts for i in node.input):
            consts[node.output[0]] = op(*(consts[i] for i in node.input))
            new_inits.append(numpy_helper.from_array(consts[node.output[0]], node.output[0]))
            continue
        if node.op_type == "QuantizeLinear" and all(i in consts for i in node.input[:3]):
            if len(node.input) < 3:
                keep.append(node)
                continue
            x, scale, zp = (consts[i] for i in node.input[:3])
            q = quantize_linear(x, scale, zp, _axis(node))
            new_inits.append(numpy_helper.from_array(q, name=node.output[0]))
            folded += 1
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    return folded


def quantize_biases(model: onnx.ModelProto) -> int:
    """Store float biases of Conv/Gemm fed by DequantizeLinear as int32 + DequantizeLinear."""
    graph = model.graph
    consts = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    new_nodes, new_inits, done = [], [], 0
    for node in graph.node:
        if node.op_type not in _BIAS_OPS or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)  # ONNX default
        if node.op_type == "Gemm" and trans_b == 0:
            continue  # per-channel weight scales would not run along the bias
        s_x = consts.get(dq_x.input[1])
        s_w = consts.get(dq_w.input[1])
        if s_x is None or s_w is None or s_x.size != 1:
            continue
        if s_w.size != 1 and _axis(dq_w) != 0:
            continue
        bias = consts[node.input[2]].astype(np.float64)
        scale = (np.float64(s_x.reshape(())) * s_w.astype(np.float64)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy() if scale.size != 1 else scale
        q = np.rint(bias / scale.astype(np.float64))
        if np.abs(q).max(initial=0) > _INT32_MAX:
            continue
        name = f"{node.input[2]}_int32"
        new_inits += [
            numpy_helper.from_array(q.astype(np.int32), name=name),
            numpy_helper.from_array(scale.reshape(scale.shape), name=f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int32), name=f"{name}_zero"),
        ]
        axis = [helper.make_attribute("axis", 0)] if scale.size != 1 else []
        dq = helper.make_node(
            "DequantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_dq"],
            name=f"{node.name}_bias_dq",
        )
        dq.attribute.extend(axis)
        new_nodes.append((node, dq))
        node.input[2] = f"{name}_dq"
        done += 1
    for consumer, dq in new_nodes:
        index = list(graph.node).index(consumer)
        graph.node.insert(index, dq)
    graph.initializer.extend(new_inits)
    return done


def _constant_value(model: onnx.ModelProto, name: str, consts: dict[str, np.ndarray]):
    """The value of `name` when only constants feed it (a chain of ops the exporter left
    unfolded, such as the pads of nn.ZeroPad2d), by ONNX's reference evaluator; else None."""
    if name in consts:
        return consts[name]
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, todo = set(), [name]
    while todo:
        value = todo.pop()
        if not value or value in consts:
            continue
        node = producer.get(value)
        if node is None:  # a graph input: not a constant
            return None
        if id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    from onnx.reference import ReferenceEvaluator

    nodes = [n for n in model.graph.node if id(n) in needed]  # graph order is topological
    read = {i for n in nodes for i in n.input}
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k in read]
    sub = helper.make_model(
        helper.make_graph(nodes, "constant", [], [helper.make_value_info(name, onnx.TypeProto())],
                          inits),
        opset_imports=model.opset_import)
    try:
        return np.asarray(ReferenceEvaluator(sub).run(None, {})[0])
    except Exception:  # noqa: BLE001 - an op the reference cannot run: leave the graph as is
        return None


def pad_into_conv(model: onnx.ModelProto) -> int:
    """Fold a zero-filling Pad of the spatial axes into the Conv that alone reads it (the
    conv's own `pads`): TensorFlow-style "same" padding written as nn.ZeroPad2d or F.pad
    then a conv. ONNX Runtime does this itself for float graphs, but not across a
    DequantizeLinear, and a separate Pad copies the whole activation. A quantized conv
    pads with its input's zero point, which is 0.0 exactly, so the numbers are the same.
    Returns how many Pads were folded."""
    graph = model.graph
    consts = _constants(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        users = readers.get(pad.output[0], []) if pad.op_type == "Pad" else []
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in outputs:
            continue
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        auto_pad = attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET"
        if (mode != b"constant" or auto_pad != b"NOTSET" or conv.input[0] != pad.output[0]
                or len(pad.input) > 3 and pad.input[3]):  # axes: opset 18's partial pads
            continue
        if len(pad.input) > 2 and pad.input[2]:
            fill = _constant_value(model, pad.input[2], consts)
            if fill is None or fill.any():
                continue
        amounts = _constant_value(model, pad.input[1], consts)
        if amounts is None:
            continue
        amounts = amounts.astype(np.int64).ravel()
        rank = amounts.size // 2
        if rank < 3 or amounts[[0, 1, rank, rank + 1]].any() or (amounts < 0).any():
            continue  # batch or channel padding, or a crop: not a conv's pads
        spatial = rank - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * 2 * spatial
        new = [old[i] + int(amounts[2 + i]) for i in range(spatial)]
        new += [old[spatial + i] + int(amounts[rank + 2 + i]) for i in range(spatial)]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    return len(folded)


def pad_before_dequantize(model: onnx.ModelProto) -> int:
    """Run a zero-filling Pad on the integers: DequantizeLinear → Pad becomes Pad (filled
    with the zero point, which is 0.0 exactly) → DequantizeLinear, so the Conv after it
    (TensorFlow-style "same" padding written as F.pad then F.conv2d) reads a
    DequantizeLinear and ORT fuses it into QLinearConv. Returns how many were moved."""
    graph = model.graph
    consts = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    moved = []
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Pad" else None
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if dq is None or dq.op_type != "DequantizeLinear" or mode != b"constant":
            continue
        fill = node.input[2] if len(node.input) > 2 else ""
        zero = consts.get(dq.input[2]) if len(dq.input) > 2 else None
        if (fill and (fill not in consts or consts[fill].any())) or zero is None or zero.size != 1:
            continue  # a fill other than 0.0, or no single zero point to fill with
        name = f"{node.output[0]}_integer"
        graph.initializer.append(numpy_helper.from_array(zero.reshape(()), f"{name}_fill"))
        pad_inputs = [dq.input[0], node.input[1], f"{name}_fill", *node.input[3:]]
        del node.input[:]
        node.input.extend(pad_inputs)
        after = helper.make_node("DequantizeLinear", [name, *dq.input[1:]], [node.output[0]],
                                 name=f"{node.name}_dequantize")
        node.output[0] = name
        moved.append((node, after, dq))
    for pad, after, _ in moved:
        graph.node.insert(list(graph.node).index(pad) + 1, after)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for dq in {id(dq): dq for _, _, dq in moved}.values():
        if dq.output[0] not in read:  # the Pad was its only reader
            graph.node.remove(dq)
    return len(moved)


def prune_unused(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that nothing reads any more (ONNX ops have no side
    effects): constants of folded weights, the pads chain of a folded Pad."""
    graph = model.graph
    while True:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        nodes = [n for n in graph.node if any(o in used for o in n.output)]
        if len(nodes) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def finish_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Integer weights, int32 biases, zero padding inside the convs, no dead constants:
    the graph ORT's QDQ fusions expect."""
    fold_weight_quantizers(model)
    pad_into_conv(model)
    pad_before_dequantize(model)
    quantize_biases(model)
    prune_unused(model)
    return model


_INTEGER_OPS = ("Conv", "Gemm", "MatMul")
_MOVES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def float_layers(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """How many Conv / Gemm / MatMul nodes read dequantized values on both inputs (ONNX
    Runtime fuses those into integer kernels), and the names of those that do not."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in _MOVES:  # ORT moves these past the DQ
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    fused, left = 0, []
    for node in model.graph.node:
        if node.op_type not in _INTEGER_OPS:
            continue
        if all(dequantized(name) for name in node.input[:2]):
            fused += 1
        else:
            left.append(node.name or node.op_type)
    return fused, left


_JOIN_OPS = {"Add": "add", "Mul": "mul", "Concat": "cat"}
# Clips ORT folds into the QuantizeLinear after them (the range already starts at its bound)
_CLIPS = ("Relu", "Clip")


def float_joins(model: onnx.ModelProto) -> tuple[dict[str, int], list[str]]:
    """How many Add / Mul / Concat nodes of each kind ('add', 'mul', 'cat') read only
    dequantized values and feed only QuantizeLinear (ONNX Runtime runs those as QLinearAdd,
    QLinearMul, QLinearConcat), and the names of the joins of dequantized values that do not
    (ONNX Runtime runs those in float, dequantizing and quantizing around them)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def quantized_after(name: str) -> bool:
        users = readers.get(name, [])
        if name in graph_outputs or not users:
            return False
        if len(users) == 1 and users[0].op_type in _CLIPS:
            return quantized_after(users[0].output[0])
        return all(u.op_type == "QuantizeLinear" for u in users)

    fused: dict[str, int] = {}
    left = []
    for node in model.graph.node:
        kind = _JOIN_OPS.get(node.op_type)
        if kind is None:
            continue
        sources = [producer.get(name) for name in node.input]
        dequantized = [s is not None and s.op_type == "DequantizeLinear" for s in sources]
        if all(dequantized) and len(sources) >= 2 and quantized_after(node.output[0]):
            fused[kind] = fused.get(kind, 0) + 1
        elif sum(dequantized) >= 2:
            left.append(node.name or node.op_type)
    return fused, left
