"""Group-quantized weights in an ONNX file: integers in blocks behind DequantizeLinear.

A weight quantized in groups (`weight_only(4, 32)`) has one scale per `size` values of a
row, which QuantizeLinear in opset 17 cannot hold. During export each such weight is a
`penjing::GroupQuantized` marker node (penjing.quant.linear.fakequant); `store_blocked` replaces
it by the quantizer's own integers and scales behind a blocked DequantizeLinear (opset
21: int4 for 4 bits and fewer, int8 up to 8). ONNX Runtime fuses a blocked
DequantizeLinear → MatMul into its 4-bit kernel MatMulNBits when the block size is a
power of two ≥ 16. It does not fuse DequantizeLinear → Gather (an embedding lookup), so
`gather_block_quantized` writes those as ORT's contrib op GatherBlockQuantized, which
reads only the rows it gathers; otherwise the whole table would be dequantized per run.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from penjing.export.qdq import prune_unused
from penjing.quant.linear.fakequant import WeightQuant
from penjing.quant.linear.primitives import PerGroup, quantize

MARKER = ("penjing", "GroupQuantized")
BLOCKED_OPSET = 21  # DequantizeLinear's block_size and the int4 / uint4 types
CONTRIB = "com.microsoft"


class Blocks(NamedTuple):
    """One group-quantized weight as the file stores it."""

    q: np.ndarray  # integers, the weight's shape
    scale: np.ndarray  # (rows, groups) float32
    zero: np.ndarray  # (rows, groups) int64
    spec: object  # its QuantSpec
    name: str  # state key of the weight: names its initializers in the file


def group_quantizers(model: nn.Module) -> dict[int, Blocks]:
    """{id of a group-wise WeightQuant: its Blocks} for every weight of `model` quantized
    in groups; the value quantized is what reaches the quantizer (after any mask)."""
    found = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            with torch.no_grad():
                value = chain.original
                for p in chain:
                    if isinstance(p, WeightQuant) and isinstance(p.spec.granularity, PerGroup):
                        q = quantize(value.float(), p.scale, p.zero_point, p.spec)
                        found[id(p)] = Blocks(
                            q.numpy(), p.scale.detach().float().numpy(),
                            p.zero_point.detach().numpy().astype(np.int64), p.spec,
                            ".".join(n for n in (module_name, tensor) if n))
                    value = p(value)
    return found


def _int_tensor(name: str, q: np.ndarray, bits: int, signed: bool) -> TensorProto:
    """`q` as an ONNX initializer: int4 / uint4 (two to a byte, low nibble first) for 4
    bits and fewer, else int8 / uint8."""
    if bits > 4:
        return numpy_helper.from_array(q.astype(np.int8 if signed else np.uint8), name)
    flat = q.astype(np.uint8).ravel() & 0x0F  # two's complement nibbles for negatives
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, kind, list(q.shape), packed.tobytes(), raw=True)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _plain_gemm_weight(node: onnx.NodeProto, weight: str) -> bool:
    """Whether `node` is a Gemm computing A @ weightᵀ (+ C), nothing scaled: a Linear on
    2-D inputs, which a MatMul on the transposed weight can replace."""
    if node.op_type != "Gemm" or list(node.input[1:2]) != [weight] or node.input[0] == weight:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)


def store_blocked(model: onnx.ModelProto, quantizers: dict) -> int:
    """Replace every GroupQuantized marker by integers behind a blocked DequantizeLinear
    (weights of more than 8 bits by their dequantized floats); return how many.

    A 2-D weight read only through Transpose (a Linear that became MatMul) or as the
    transposed B of a Gemm (a Linear on 2-D inputs; the Gemm becomes MatMul + Add) is
    stored transposed, blocked along axis 0, so that the DequantizeLinear feeds the MatMul
    directly, as ORT's MatMulNBits fusion wants; a weight of more dimensions is blocked
    as (rows, rest) and reshaped back. A layer the model calls more than once is stored
    once; ORT then runs it as DequantizeLinear → MatMul in float (it fuses no shared
    initializer)."""
    graph = model.graph
    readers = _readers(graph)
    graph_outputs = {o.name for o in graph.output}
    nodes, inits, done = [], [], 0
    dropped: set[int] = set()
    made: set[tuple[str, bool]] = set()  # a layer called twice is stored once per layout
    markers = [n for n in graph.node if (n.domain, n.op_type) == MARKER]
    for marker in markers:
        tag = next(a.i for a in marker.attribute if a.name == "tag")
        if tag not in quantizers:
            raise ValueError(
                f"ONNX node {marker.name!r} marks a group-quantized weight this model does not "
                "hold; export the model whose quantizers wrote it"
            )
        q, scale, zero, spec, key = quantizers[tag]
        out, base = marker.output[0], f"{key}_int{8 if spec.bits > 4 else 4}"
        dropped.add(id(marker))
        done += 1
        if spec.bits > 8:  # no integer type of ONNX DequantizeLinear holds it
            rows = q.reshape(q.shape[0], -1)
            floats = _dequantize_rows(rows, scale, zero, spec.granularity.size)
            inits.append(numpy_helper.from_array(floats.reshape(q.shape), out))
            continue
        size = spec.granularity.size
        users = readers.get(out, [])
        transposed = (q.ndim == 2 and users and out not in graph_outputs
                      and all((u.op_type == "Transpose" and _perm(u) in (None, [1, 0]))
                              or _plain_gemm_weight(u, out) for u in users))
        zeros = zero.any()
        if transposed:
            base += "_t"
            if (base, True) not in made:
                made.add((base, True))
                inits.append(_int_tensor(base, q.T, spec.bits, spec.signed))
                inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.T),
                                                     f"{base}_scale"))
                if zeros:
                    inits.append(_int_tensor(f"{base}_zero", zero.T, spec.bits, spec.signed))
            for user in users:
                dropped.add(id(user))
                if user.op_type == "Transpose":
                    nodes.append((user, _dequantize(base, zeros, user.output[0], 0, size)))
                    continue
                # Gemm(A, W, C, transB=1) = A @ Wᵀ + C: a MatMul on the dequantized Wᵀ,
                # which ORT fuses into MatMulNBits, then the bias
                weight_t, product = f"{user.name}_weight_t", f"{user.name}_product"
                nodes.append((user, _dequantize(base, zeros, weight_t, 0, size)))
                bias = user.input[2] if len(user.input) > 2 and user.input[2] else None
                nodes.append((user, helper.make_node(
                    "MatMul", [user.input[0], weight_t], [product if bias else user.output[0]],
                    name=f"{user.name}_matmul")))
                if bias:
                    nodes.append((user, helper.make_node(
                        "Add", [product, bias], [user.output[0]], name=f"{user.name}_bias")))
            continue
        if (base, False) not in made:
            made.add((base, False))
            inits.append(_int_tensor(base, q.reshape(q.shape[0], -1), spec.bits, spec.signed))
            inits.append(numpy_helper.from_array(scale, f"{base}_scale"))
            if zeros:
                inits.append(_int_tensor(f"{base}_zero", zero, spec.bits, spec.signed))
            if q.ndim != 2:
                inits.append(numpy_helper.from_array(np.array(q.shape, np.int64),
                                                     f"{base}_shape"))
        if q.ndim == 2:
            nodes.append((marker, _dequantize(base, zeros, out, 1, size)))
            continue
        nodes.append((marker, _dequantize(base, zeros, f"{out}_rows", 1, size)))
        nodes.append((marker, helper.make_node("Reshape", [f"{out}_rows", f"{base}_shape"],
                                               [out], name=f"{out}_reshape")))
    placed = []
    for node in graph.node:
        placed += [new for old, new in nodes if old is node]
        if id(node) not in dropped:
            placed.append(node)
    del graph.node[:]
    graph.node.extend(placed)
    graph.initializer.extend(inits)
    return done


def _dequantize(base: str, zeros: bool, out: str, axis: int, size: int) -> onnx.NodeProto:
    inputs = [base, f"{base}_scale"] + ([f"{base}_zero"] if zeros else [])
    return helper.make_node("DequantizeLinear", inputs, [out], name=f"{out}_dequantize",
                            axis=axis, block_size=size)


def _dequantize_rows(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray, size: int):
    """(q − z)·s of a (rows, n) integer array in groups of `size` along each row."""
    index = np.arange(rows.shape[1]) // size
    return ((rows - zero[:, index]) * scale[:, index]).astype(np.float32)


def _power_of_two_block(size: int) -> bool:
    return size >= 16 and size & (size - 1) == 0


def gather_block_quantized(model: onnx.ModelProto) -> int:
    """Turn blocked DequantizeLinear (along axis 1 of a 2-D table) → Gather(axis 0) into
    ORT's GatherBlockQuantized, which dequantizes only the gathered rows; return how many.
    Needs a block size that is a power of two ≥ 16 (the op's rule)."""
    graph = model.graph
    readers = _readers(graph)
    consts = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    new_inits = []
    for dq in graph.node:
        attrs = {a.name: a.i for a in dq.attribute}
        if dq.op_type != "DequantizeLinear" or "block_size" not in attrs:
            continue
        users = readers.get(dq.output[0], [])
        table = consts.get(dq.input[0])
        if (table is None or len(table.dims) != 2 or attrs.get("axis", 1) != 1
                or not _power_of_two_block(attrs["block_size"]) or not users
                or dq.output[0] in graph_outputs
                or any(u.op_type != "Gather" or u.input[0] != dq.output[0]
                       or any(a.name == "axis" and a.i != 0 for a in u.attribute)
                       for u in users)):
            continue
        data, zero = dq.input[0], dq.input[2] if len(dq.input) > 2 else ""
        bits = 4
        if table.data_type in (TensorProto.INT8, TensorProto.UINT8):
            # the op reads 8-bit tables as uint8 with its zero point at 128 by default
            bits = 8
            data = _as_uint8(table, new_inits)
            zero = _as_uint8(consts[zero], new_inits) if zero else ""
        for user in users:
            inputs = [data, user.input[1], dq.input[1]] + ([zero] if zero else [])
            replaced[id(user)] = helper.make_node(
                "GatherBlockQuantized", inputs, list(user.output), name=f"{user.name}_quantized",
                domain=CONTRIB, gather_axis=0, quantize_axis=1, block_size=attrs["block_size"],
                bits=bits)
        dropped.add(id(dq))
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return len(replaced)


def _as_uint8(tensor: TensorProto, out: list) -> str:
    """A uint8 copy of an int8 / uint8 initializer with 128 added to signed values."""
    values = numpy_helper.to_array(tensor)
    if values.dtype == np.int8:
        values = (values.astype(np.int16) + 128).astype(np.uint8)
    name = f"{tensor.name}_u8"
    out.append(numpy_helper.from_array(values.astype(np.uint8), name))
    return name


def finish_blocked(model: onnx.ModelProto, quantizers: dict, opset: int,
                   contrib_ops: bool = True) -> onnx.ModelProto:
    """Integers for every marked weight, GatherBlockQuantized for embedding lookups when
    `contrib_ops`, the opset that blocked DequantizeLinear needs, no dead constants."""
    store_blocked(model, quantizers)
    if contrib_ops:
        gather_block_quantized(model)
    imports = [o for o in model.opset_import if o.domain != MARKER[0]]
    for o in imports:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    del model.opset_import[:]
    model.opset_import.extend(imports)
    prune_unused(model)
    return model
