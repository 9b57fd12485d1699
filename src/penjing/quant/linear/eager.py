"""Static INT8 for models torch.fx cannot trace (Hugging Face transformers): an input
quantizer on every chosen Linear, installed as a forward pre-hook, no graph capture.

Why no capture here. transformers 5 no longer ships its fx tracer (`transformers.utils.fx`
and HFTracer were removed), and plain torch.fx stops at their shape arithmetic
(`*input_shape, _ = x.shape`, slicing a position table by a traced length). torch.export
(non-strict) does capture BERT, GPT-2 and ViT, but as an aten graph: module boundaries
survive only as metadata, weight parametrizations are inlined away, and the TorchScript
ONNX exporter that writes our QDQ pairs would have to run on that graph instead of the
model, which is a rewrite of quantizer placement for one model family. For a transformer
the placement is simple anyway: what runs on integer kernels is every Linear (QKV,
attention output, FFN), whose input is quantized and whose output goes on in float to
reshapes, softmax, residual adds and LayerNorm, as ONNX Runtime's own quantizer does it.
A pre-hook on each Linear gives exactly that, keeps module names (the state dict still
loads into the architecture) and survives deepcopy and ONNX export.

GPT-2's `Conv1D` (a Linear with its weight stored transposed) becomes an nn.Linear in the
quantized copy, so the same quantizers and integer kernels apply.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from penjing.core import history
from penjing.quant.linear.checkpoint import config_to_dict
from penjing.quant.linear.config import resolve_filter, select
from penjing.quant.linear.fakequant import ActQuant
from penjing.quant.linear.weights import quantize_weights_

INPUT_QUANT = "input_quant"  # name of the ActQuant child a Linear's pre-hook applies


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANT)(args[0]), *args[1:])


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2): y = x @ W + b, W of (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith(
        "transformers.")


def conv1d_to_linear_(model: nn.Module) -> list[str]:
    """Replace every transformers `Conv1D` in `model` by the nn.Linear it computes, in
    place; return their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_conv1d(module):
            continue
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
        replaced.append(name)
    return replaced


def prepare(model: nn.Module, config, *, qat: bool = False) -> nn.Module:
    """A copy of `model` with fake-quantized weights and an observing input quantizer on
    every chosen Linear (pj.quant.prepare for models that are not traced)."""
    quantized = copy.deepcopy(model).eval()
    history.carry(model, quantized)
    conv1d_to_linear_(quantized)
    config = resolve_filter(config, quantized)  # stored in the history, so no function in it
    chosen = select(quantized, config, None)
    quantize_weights_(quantized, chosen, config, qat)
    if config.activation is not None:
        modules = dict(quantized.named_modules())
        for name in chosen:
            layer = modules[name]
            if not isinstance(layer, nn.Linear):
                continue  # convs of a ViT patch embedding: weights only (read as an image)
            layer.add_module(INPUT_QUANT, ActQuant(config.activation, config.observer,
                                                   name=f"{name}.{INPUT_QUANT}"))
            layer.register_forward_pre_hook(_quantize_input)
    history.record(quantized, {"op": "quantize", "config": config_to_dict(config)})
    return quantized


def quantized_inputs(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose input a pre-hook quantizes."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, INPUT_QUANT, None), ActQuant)]
