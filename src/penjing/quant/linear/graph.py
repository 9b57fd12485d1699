"""Insert activation quantizers into a traced copy of a model (torch.fx).

For each chosen layer: a quantizer on its input and one on its output. Where the output
goes next decides where that quantizer sits (`ACTIVATIONS`, one table):

- a *clipping* activation (ReLU, ReLU6, Hardtanh, clamp) that directly follows the layer
  takes the quantizer after it: the range is the clipped one (one-sided from 0 for ReLU,
  ReLU6 and clamp(0, …), so uint8 spends no code on negatives), and ONNX Runtime fuses
  the Relu / Clip into QLinearConv because the QuantizeLinear after it already carries
  that range. Quantizing before it would spend the 256 codes on the wide pre-activation
  range and need a second quantizer after.
- an *own-quantizer* activation (SiLU, Hardswish, GELU, Sigmoid, Tanh, …) changes the
  range non-linearly: the layer's output is quantized before it, and its output gets a
  quantizer of its own when a quantized layer reads it.

A value that reaches a layer through value-preserving ops (max-pool, flatten, reshape,
dropout, a clip) from an already quantized value reuses that quantizer's scale, so ONNX
Runtime keeps the whole chain in integers. A new input quantizer goes ahead of pure
reshapes (flatten, view, dropout) and is reused after them, so the op before them (a
global average pool) runs on integers too.

A value is quantized once, and every op that reads it reads the quantized value, as ONNX
Runtime's `quantize_static` does: a block input read by a conv and by a residual add gives
both the same integers. Element-wise joins of tensors (`JOINS`: add, mul, cat) get their
inputs and their output quantized when their output reaches a quantized layer or all their
inputs are quantized anyway; ONNX Runtime then runs them as QLinearAdd, QLinearMul and
QLinearConcat instead of dequantizing around a float op. A join feeding only float ops
(a transformer's residual stream into LayerNorm) stays float.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

from penjing import tracing
from penjing.quant.linear.config import QuantConfig
from penjing.quant.linear.fakequant import ActQuant
from penjing.quant.linear.primitives import PerTensor

CLIPPING, OWN = "clipping", "own-quantizer"

# Activation families: {module class | function | tensor method name: (family, label)}.
# A module matches by isinstance (its nearest class here), so a subclass of nn.ReLU6 is
# ReLU6. F.sigmoid and F.tanh trace as the tensor methods.
ACTIVATIONS: dict[type[nn.Module] | Callable | str, tuple[str, str]] = {
    nn.ReLU: (CLIPPING, "relu"), nn.ReLU6: (CLIPPING, "relu6"),
    nn.Hardtanh: (CLIPPING, "hardtanh"),
    torch.relu: (CLIPPING, "relu"), torch.relu_: (CLIPPING, "relu"),
    F.relu: (CLIPPING, "relu"), F.relu_: (CLIPPING, "relu"), F.relu6: (CLIPPING, "relu6"),
    F.hardtanh: (CLIPPING, "hardtanh"), F.hardtanh_: (CLIPPING, "hardtanh"),
    torch.clamp: (CLIPPING, "clamp"), torch.clip: (CLIPPING, "clip"),
    torch.clamp_: (CLIPPING, "clamp"), torch.clip_: (CLIPPING, "clip"),
    "relu": (CLIPPING, "relu"), "relu_": (CLIPPING, "relu"), "clamp": (CLIPPING, "clamp"),
    "clamp_": (CLIPPING, "clamp"), "clip": (CLIPPING, "clip"), "clip_": (CLIPPING, "clip"),
    nn.SiLU: (OWN, "silu"), nn.Hardswish: (OWN, "hardswish"), nn.GELU: (OWN, "gelu"),
    nn.Sigmoid: (OWN, "sigmoid"), nn.Hardsigmoid: (OWN, "hardsigmoid"), nn.Tanh: (OWN, "tanh"),
    nn.Mish: (OWN, "mish"), nn.LeakyReLU: (OWN, "leaky_relu"), nn.ELU: (OWN, "elu"),
    nn.SELU: (OWN, "selu"), nn.CELU: (OWN, "celu"), nn.PReLU: (OWN, "prelu"),
    nn.Softplus: (OWN, "softplus"),
    F.silu: (OWN, "silu"), F.hardswish: (OWN, "hardswish"), F.gelu: (OWN, "gelu"),
    torch.sigmoid: (OWN, "sigmoid"), F.hardsigmoid: (OWN, "hardsigmoid"),
    torch.tanh: (OWN, "tanh"), F.mish: (OWN, "mish"), F.leaky_relu: (OWN, "leaky_relu"),
    F.elu: (OWN, "elu"), F.selu: (OWN, "selu"), F.celu: (OWN, "celu"), F.prelu: (OWN, "prelu"),
    F.softplus: (OWN, "softplus"),
    "sigmoid": (OWN, "sigmoid"), "tanh": (OWN, "tanh"),
}

# Ops whose output, fed a quantized value, is again on that value's grid (max, reshape,
# identity in eval), or is clipped to bounds that land on it up to one rounding, which
# ONNX Runtime does the same way (Clip between DequantizeLinear and QuantizeLinear).
_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_KEEP_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardtanh, torch.clamp, torch.clip,
                   torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout,
                   F.dropout1d, F.dropout2d, F.dropout3d, torch.reshape, operator.getitem}
_KEEP_METHODS = {"relu", "clamp", "clip", "flatten", "view", "reshape", "contiguous",
                 "squeeze", "unsqueeze"}
# The subset that only moves values: quantizing before them or after gives the same
# numbers and the same range, and before them ONNX Runtime can fuse the op that produced
# the value (GlobalAveragePool → QLinearGlobalAveragePool ahead of a Flatten).
_RESHAPE_MODULES = (nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout, F.dropout1d, F.dropout2d,
                      F.dropout3d}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}

# Element-wise joins of two or more tensors: {function | tensor method name: op}. In-place
# spellings (`out += identity`) are the same join.
JOINS: dict[Callable | str, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add", "add_": "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", "mul": "mul", "mul_": "mul",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
}
# Ops that give Python numbers, not tensors (shape arithmetic such as x.size(0) * 2).
_NUMBER_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist"}
_NUMBER_FUNCTIONS = {getattr, len}

# GraphModule.meta key: {layer name: how its output was quantized}, for the report
PLACEMENTS = "penjing_output_placement"
# GraphModule.meta key: {join node name: op} for the joins whose inputs and output are quantized
JOINED = "penjing_quantized_joins"


def trace(model: nn.Module, leaves: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """A GraphModule of `model` with quantizable layers kept as leaves."""
    return tracing.trace(
        model, tuple(leaves),
        advice="Placing activation quantizers needs a traceable forward: make data-dependent "
        "control flow a leaf module, or quantize weights only (activation=None)",
    )


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(gm, node: fx.Node, modules, functions, methods=frozenset()) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def activation(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    """(family, label) of `node` from `ACTIVATIONS`, or None when it is no activation."""
    if node.op == "call_module":
        for cls in type(_module(gm, node)).__mro__:  # nearest class first: ReLU6 before Hardtanh
            if cls in ACTIVATIONS:
                return ACTIVATIONS[cls]
        return None
    if node.op in ("call_function", "call_method"):
        try:
            return ACTIVATIONS.get(node.target)
        except TypeError:  # an unhashable target is no activation
            return None
    return None


def _only_activation_after(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str, str] | None:
    """The activation that is the only reader of `node` and reads it as its input."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    found = activation(gm, user)
    if found is None or not user.args or user.args[0] is not node:
        return None
    return user, *found


def _is_number(node: fx.Node) -> bool:
    """Whether `node` computes a Python number (a size, shape arithmetic), not a tensor."""
    if node.op == "call_method":
        return node.target in _NUMBER_METHODS
    if node.op != "call_function":
        return False
    if node.target in _NUMBER_FUNCTIONS:
        return True
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        nodes = node.all_input_nodes
        return bool(nodes) and all(_is_number(n) for n in nodes)
    return False


def join_operands(node: fx.Node) -> list[fx.Node] | None:
    """The tensors an element-wise join (`JOINS`) combines, or None when `node` joins fewer
    than two tensors (x + 1, x.size(0) * 2) or takes more than ONNX's op does (alpha=)."""
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        op = JOINS.get(node.target)
    except TypeError:  # an unhashable target is no join
        return None
    if op is None:
        return None
    if op == "cat":
        values = node.args[0] if node.args else node.kwargs.get("tensors")
        extra = set(node.kwargs) - {"tensors", "dim", "axis"}
    else:
        values = node.args if len(node.args) == 2 else None
        extra = set(node.kwargs)
    if extra or not isinstance(values, list | tuple) or len(values) < 2:
        return None
    if not all(isinstance(v, fx.Node) and not _is_number(v) for v in values):
        return None
    return list(dict.fromkeys(values))


def quantized_joins(gm: nn.Module) -> dict[str, str]:
    """{join node name: 'add' | 'mul' | 'cat'} for the joins `insert_quantizers` gave
    quantized inputs and output (ONNX Runtime runs them as QLinearAdd, QLinearMul,
    QLinearConcat). Empty for a model without them."""
    meta = getattr(gm, "meta", None)
    return dict(meta.get(JOINED, {})) if isinstance(meta, dict) else {}


def layer_order(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the quantizable layers in the order forward calls them."""
    gm = trace(model, config.types)
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def output_placements(gm: nn.Module) -> dict[str, str]:
    """{layer name: where its output quantizer sits} as `insert_quantizers` chose:
    'fused relu6' (after a clipping activation), 'own quantizer (silu)' (before the
    activation, which has one of its own), 'before silu' (the activation's output stays
    float: no quantized layer reads it), 'layer output'. Empty for a model without them."""
    meta = getattr(gm, "meta", None)
    return dict(meta.get(PLACEMENTS, {})) if isinstance(meta, dict) else {}


def insert_quantizers(
    gm: fx.GraphModule, layers: list[str], config: QuantConfig
) -> dict[str, ActQuant]:
    """Add ActQuant modules around `layers` in `gm` (in place); return them by name."""
    graph, spec = gm.graph, config.activation
    for node in list(graph.nodes):  # folded BatchNorms: drop them so ReLU follows its layer
        if node.op == "call_module" and isinstance(_module(gm, node), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    quantized: dict[fx.Node, fx.Node] = {}  # value -> the node that quantizes it
    outputs: set[fx.Node] = set()  # nodes that are quantizer outputs
    added: dict[str, ActQuant] = {}
    placements: dict[str, str] = {}
    joins: dict[str, str] = {}  # join node name -> op, for quantized_joins

    def new_quantizer(base: str, after: fx.Node, observe: bool = True, target: str | None = None):
        if target is None:
            target = base.replace(".", "_")
            taken = dict(gm.named_modules())
            for i in itertools.count(1):  # a layer called twice gets a quantizer per call
                if target not in taken:
                    break
                target = f"{base.replace('.', '_')}_{i}"
            module = ActQuant(spec, config.observer, name=target)
            gm.add_submodule(target, module)
            added[target] = module
        with graph.inserting_after(after):
            kwargs = {} if observe else {"observe": False}
            return graph.call_module(target, (after,), kwargs)

    def quantize_all_uses(base: str, value: fx.Node) -> fx.Node:
        users = list(value.users)
        q = new_quantizer(base, value)
        for user in users:
            user.replace_input_with(value, q)
        quantized[value] = q
        outputs.add(q)
        return q

    def origin(value: fx.Node) -> fx.Node | None:
        while value not in outputs:
            if not _is(gm, value, _KEEP_MODULES, _KEEP_FUNCTIONS, _KEEP_METHODS):
                return None
            if not value.args or not isinstance(value.args[0], fx.Node):
                return None
            value = value.args[0]
        return value

    def before_reshapes(value: fx.Node) -> fx.Node:
        """The value `value` is a reshape of, through reshapes no one else reads; per-tensor
        scales only (a reshape moves a per-channel axis)."""
        if not isinstance(spec.granularity, PerTensor):
            return value
        while (_is(gm, value, _RESHAPE_MODULES, _RESHAPE_FUNCTIONS, _RESHAPE_METHODS)
               and value.args and isinstance(value.args[0], fx.Node)
               and len(value.args[0].users) == 1 and value.args[0] not in quantized):
            value = value.args[0]
        return value

    def read_by_layer(value: fx.Node) -> bool:
        """Whether a chosen layer reads `value`, directly or through value-preserving ops
        and joins."""
        todo, seen = list(value.users), set()
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.target in layers:
                return True
            if (_is(gm, user, _KEEP_MODULES, _KEEP_FUNCTIONS, _KEEP_METHODS)
                    or join_operands(user) is not None):
                todo.extend(user.users)
        return False

    def quantize_input(base: str, value: fx.Node) -> fx.Node:
        """The quantized `value`, which every op that read `value` now reads (but shape
        reads): an existing
        quantizer, the scale of the one it came from through value-preserving ops, or a
        new one (ahead of reshapes no one else reads)."""
        if value in outputs:
            return value
        if value in quantized:
            return quantized[value]
        users = list(value.users)
        source = origin(value)
        start = before_reshapes(value) if source is None else value
        if start is not value:  # quantize ahead of the reshapes, pass it through them
            source = quantize_all_uses(base, start)
        if source is not None:
            q = new_quantizer("", value, observe=False, target=source.target)
        else:
            q = new_quantizer(base, value)
        for user in users:
            if not _is_number(user):  # a shape read keeps the float value: no DQ for it
                user.replace_input_with(value, q)
        quantized[value] = q
        outputs.add(q)
        return q

    def clipped(node: fx.Node) -> fx.Node:
        """`node`, or the clipping activation(s) that alone read it: where its range is."""
        while (found := _only_activation_after(gm, node)) is not None:
            act, family, _ = found
            if family != CLIPPING or (act.op == "call_module" and act.target in layers):
                break
            node = act
        return node

    for node in list(graph.nodes):
        operands = join_operands(node)
        if operands is not None:
            out = clipped(node)
            ready = [v in outputs or v in quantized or origin(v) is not None
                     or read_by_layer(v) for v in operands]
            if out not in quantized and (read_by_layer(out) or all(ready)):
                for v in operands:
                    quantize_input(f"{node.name}_input_quant", v)
                quantize_all_uses(f"{node.name}_output_quant", out)
                joins[node.name] = JOINS[node.target]
            continue
        if node.op != "call_module" or node.target not in layers:
            continue
        if isinstance(node.args[0], fx.Node):
            quantize_input(f"{node.target}_input_quant", node.args[0])
        out, placement, own = node, "layer output", None
        while (found := _only_activation_after(gm, out)) is not None:
            act, family, label = found
            if act.op == "call_module" and act.target in layers:
                break  # a chosen layer (e.g. PReLU among config.types) places its own
            if family == OWN:
                own, placement = (act, label), f"before {label}"
                break
            out, placement = act, f"fused {label}"  # clipping: the range after it
        quantize_all_uses(f"{node.target}_output_quant", out)
        if own is not None and read_by_layer(own[0]):
            quantize_all_uses(f"{node.target}_{own[1]}_quant", own[0])
            placement = f"own quantizer ({own[1]})"
        placements[node.target] = placement
    graph.lint()
    gm.recompile()
    gm.meta[PLACEMENTS] = placements
    gm.meta[JOINED] = joins
    return added
