"""Insert activation quantizers into a traced copy of a model (torch.fx).

For each chosen layer: a quantizer on its input and one on its output, placed after a
ReLU that directly follows (so the output range is one-sided and uint8 loses nothing).
A value that reaches a layer through value-preserving ops (max-pool, flatten, reshape)
from an already quantized value reuses that quantizer's scale, so ONNX Runtime keeps the
whole chain in integers.
"""

from __future__ import annotations

import itertools
import operator

import torch
from torch import fx, nn

from penjing import tracing
from penjing.quant.config import QuantConfig
from penjing.quant.fakequant import ActQuant

_RELU_MODULES = (nn.ReLU,)
_RELU_FUNCTIONS = {torch.relu, nn.functional.relu}
_KEEP_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout,
                 nn.Identity)
_KEEP_FUNCTIONS = {torch.relu, nn.functional.relu, torch.flatten, nn.functional.max_pool1d,
                   nn.functional.max_pool2d, nn.functional.max_pool3d, nn.functional.dropout,
                   torch.reshape, operator.getitem}
_KEEP_METHODS = {"relu", "flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}


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


def layer_order(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the quantizable layers in the order forward calls them."""
    gm = trace(model, config.types)
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


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

    def origin(value: fx.Node) -> fx.Node | None:
        while value not in outputs:
            if not _is(gm, value, _KEEP_MODULES, _KEEP_FUNCTIONS, _KEEP_METHODS):
                return None
            if not value.args or not isinstance(value.args[0], fx.Node):
                return None
            value = value.args[0]
        return value

    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in layers:
            continue
        value = node.args[0]
        if isinstance(value, fx.Node):
            if value in outputs:
                q = value
            elif value in quantized:
                q = quantized[value]
            else:
                source = origin(value)
                if source is not None:
                    q = new_quantizer("", value, observe=False, target=source.target)
                else:
                    q = new_quantizer(f"{node.target}_input_quant", value)
                quantized[value] = q
                outputs.add(q)
            node.replace_input_with(value, q)
        out = node
        if len(node.users) == 1:
            (user,) = node.users
            if _is(gm, user, _RELU_MODULES, _RELU_FUNCTIONS, {"relu"}):
                out = user
        users = list(out.users)
        q = new_quantizer(f"{node.target}_output_quant", out)
        for user in users:
            user.replace_input_with(out, q)
        quantized[out] = q
        outputs.add(q)
    graph.lint()
    gm.recompile()
    return added
