"""Export a model to an ONNX file: FP32 as is, fake-quantized models as QDQ INT8.

We use PyTorch's TorchScript-based exporter (`dynamo=False`): it needs no package beyond
torch and onnx, and it writes `torch.fake_quantize_per_{tensor,channel}_affine` as the
QuantizeLinear / DequantizeLinear pairs ONNX Runtime fuses into integer kernels.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.export.blocked import BLOCKED_OPSET, finish_blocked, group_quantizers
from penjing.export.qdq import finish_qdq, float_joins, float_layers
from penjing.hf import is_hf
from penjing.inputs import flat_outputs, split
from penjing.inputs import output_names as default_output_names
from penjing.io import atomic_write_bytes
from penjing.quant.linear.eager import quantized_inputs
from penjing.quant.linear.fakequant import ActQuant, get_weight_quant
from penjing.quant.linear.graph import quantized_joins


class _Keywords(nn.Module):
    """`model` called with keyword tensors given positionally, in `names` order: the
    TorchScript exporter traces positional inputs only. `fixed` are keywords always
    passed (use_cache=False: a key/value cache object cannot be a graph output)."""

    def __init__(self, model: nn.Module, names: list[str], fixed: dict) -> None:
        super().__init__()
        self.model, self.names, self.fixed = model, names, fixed

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args, strict=True)), **self.fixed)


def _as_args(model: nn.Module, example_inputs) -> tuple[nn.Module, tuple, list[str]]:
    """The module to trace, its positional `args` for a tensor, a tuple of tensors or a
    dict of keyword tensors, and the default input names (the dict's keys)."""
    args, kwargs = split(example_inputs, "example_inputs")
    if kwargs:
        import inspect

        takes = inspect.signature(model.forward).parameters
        fixed = {"use_cache": False} if "use_cache" in takes and "use_cache" not in kwargs else {}
        return _Keywords(model, list(kwargs), fixed), tuple(kwargs.values()), list(kwargs)
    return model, args, ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]


def _module_using(model: nn.Module, args: tuple, op: str) -> str | None:
    """The dotted name of the module whose forward calls `op`, found by tracing."""
    base = op.split("::")[-1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, args, check_trace=False)
    except (RuntimeError, TypeError, ValueError):
        return None
    for node in traced.inlined_graph.nodes():
        kind = node.kind().split("::")[-1]
        if kind == base or kind.endswith("_" + base):
            scope = node.scopeName().split("/")[-1]
            return scope.removeprefix("__module").lstrip(".") or "<the model itself>"
    return None


def _unsupported(err: Exception, model: nn.Module, args: tuple) -> UnsupportedLayerError:
    """Name the op and the module that uses it."""
    text = str(err).strip()
    op = re.search(r"operator '([^']+)'", text)
    op_name = op.group(1) if op else "an operator"
    module = _module_using(model, args, op_name) if op else None
    where = f" used in module {module!r}" if module else ""
    first = text.splitlines()[-1] if text else type(err).__name__
    return UnsupportedLayerError(
        f"cannot export {op_name}{where} to ONNX: {first}. Replace that op with one ONNX "
        "supports, or keep the module out of the exported model"
    )


def _check_quantizers(model: nn.Module) -> None:
    """QDQ in ONNX opset 17 holds at most 8 bits: name the first activation quantizer
    that needs more, or that was never calibrated."""
    for name, module in model.named_modules():
        if not isinstance(module, ActQuant):
            continue
        if module.spec.bits > 8:
            raise ValueError(
                f"activation quantizer {name!r} uses {module.spec.bits} bits; ONNX QDQ export "
                "holds at most 8; quantize activations to 8 bits or fewer, or export FP32"
            )
        if not module.frozen:
            raise ValueError(
                f"activation quantizer {name!r} is not calibrated yet; run "
                "penjing.quant.calibrate_ and freeze_ (or ptq) before exporting"
            )


def _quantized_layers(model: nn.Module) -> list[str]:
    """Conv / Linear layers of a PTQ / QAT model whose input and weight are both quantized:
    each should become one integer kernel in the exported file."""
    from torch import fx


    if not isinstance(model, fx.GraphModule):

        return quantized_inputs(model)
    found = []
    for node in model.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        layer, source = model.get_submodule(node.target), node.args[0]
        if (isinstance(layer, nn.Linear | nn.modules.conv._ConvNd)
                and not isinstance(layer, nn.modules.conv._ConvTransposeNd)
                and get_weight_quant(layer, "weight") is not None
                and source.op == "call_module"
                and isinstance(model.get_submodule(source.target), ActQuant)):
            found.append(node.target)
    return found


def _check_integer_layers(model: nn.Module, proto) -> None:
    """Warn when the file has fewer integer-ready layers or joins than the model quantized:
    an op between a quantizer and its layer (inside a layer subclass's forward, say), or
    between a join and its quantizers, leaves it to a float kernel in ONNX Runtime."""
    expected = _quantized_layers(model)
    fused, left = float_layers(proto)
    if fused < len(expected):
        warnings.warn(
            f"the exported file has {fused} integer-ready Conv/Gemm/MatMul nodes for "
            f"{len(expected)} quantized layers, so ONNX Runtime runs "
            f"{len(expected) - fused} of them in float: {left[:6]} read a value that is not "
            "dequantized (an op sits between the quantizer and the layer); move that op out "
            "of the layer's forward, or export FP32", PenjingWarning, stacklevel=3)
    joins = quantized_joins(model)
    if not joins:
        return
    fused_joins, left_joins = float_joins(proto)
    missing = {op: n - fused_joins.get(op, 0) for op in set(joins.values())
               if (n := sum(v == op for v in joins.values())) > fused_joins.get(op, 0)}
    if missing:
        counts = ", ".join(f"{n} {op}" for op, n in sorted(missing.items()))
        warnings.warn(
            f"the exported file runs {counts} of the model's {len(joins)} quantized joins "
            f"(add / mul / cat) in float in ONNX Runtime: {left_joins[:6]} do not read only "
            "dequantized values or do not feed only QuantizeLinear (an op the exporter added "
            "sits between the join and its quantizers)", PenjingWarning, stacklevel=3)


def _axes(model, example_inputs, outputs, input_names, output_names, dynamic_batch,
          dynamic_axes):
    """{name: {axis: label}}: the batch axis of every input and output, the sequence axis
    of a Hugging Face model's 2-D inputs, and what `dynamic_axes` adds."""
    names = [*input_names, *output_names]
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names} if dynamic_batch else {}
    if is_hf(model) and isinstance(example_inputs, Mapping):
        length = None
        for name, value in zip(input_names, example_inputs.values(), strict=True):
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                axes.setdefault(name, {})[1] = "sequence"
                length = value.shape[1]
        for name, value in zip(output_names, flat_outputs(outputs), strict=False):
            if value.dim() >= 3 and value.shape[1] == length:  # (batch, sequence, ...)
                axes.setdefault(name, {})[1] = "sequence"
    for name, extra in (dynamic_axes or {}).items():
        if name not in names:
            raise ValueError(
                f"dynamic_axes names {name!r}, which is neither an input nor an output; the "
                f"graph's names are {names}"
            )
        axes.setdefault(name, {}).update({int(a): str(label) for a, label in extra.items()})
    return axes


def onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    contrib_ops: bool = True,
) -> str:
    """Write `model` to `path` as ONNX and return the path.

    A plain model exports as FP32. A model quantized by `penjing.quant.ptq` / `qat`
    exports as QDQ: int8 weights (per channel) behind DequantizeLinear, int32 biases,
    activations as QuantizeLinear/DequantizeLinear pairs (uint8 by default), which ONNX
    Runtime turns into integer kernels (QLinearConv, QGemm, ...). Weights without
    quantized inputs (weight-only INT8, nn.MultiheadAttention's projections) stay int8
    behind DequantizeLinear. Weights quantized in groups (`weight_only(4, 32)`) are
    stored as their integers (int4 up to 4 bits, int8 up to 8) behind a blocked
    DequantizeLinear, which needs opset 21: ONNX Runtime runs them as MatMulNBits. With
    `contrib_ops` (the default) a group-quantized embedding table becomes ORT's
    GatherBlockQuantized (com.microsoft), which reads only the gathered rows; without,
    the file holds standard ONNX only and ORT dequantizes the whole table on every run.
    Other weights wider than 8 bits are written as their dequantized floats.

    `opset` defaults to 17, or to 21 when the model has group-quantized weights; the
    TorchScript exporter writes at most opset 20, so a file at 21 is traced at 20 (no op
    it writes changed between the two).

    `example_inputs` is a tensor, a tuple of tensors or a dict of keyword tensors (its
    keys name the graph's inputs). The batch axis is dynamic unless `dynamic_batch=False`;
    `dynamic_axes` ({input or output name: {axis: label}}) adds more, e.g. the sequence
    axis of a transformer's inputs, and is added to the batch axis. For a Hugging Face
    model given a dict, every 2-D input gets a dynamic sequence axis too, so the file runs
    sentences of any length.

    >>> pj.export.onnx(model, "model.onnx", torch.randn(1, 1, 28, 28))
    >>> pj.export.onnx(bert, "bert.onnx", {"input_ids": ids, "attention_mask": mask})
    """
    import onnx as onnx_lib


    groups = group_quantizers(model)
    blocked = any(b.spec.bits <= 8 for b in groups.values())
    if opset is None:
        opset = BLOCKED_OPSET if blocked else 17
    if not 13 <= opset <= BLOCKED_OPSET:
        raise ValueError(
            f"opset must be >= 13 (per-channel QuantizeLinear) and <= {BLOCKED_OPSET} (the "
            f"TorchScript exporter writes up to 20, raised to 21 afterwards), got {opset}"
        )
    if blocked and opset < BLOCKED_OPSET:
        raise ValueError(
            f"group-quantized weights are stored as blocked DequantizeLinear, which needs "
            f"opset >= {BLOCKED_OPSET}, got opset={opset}; leave opset unset (or pass "
            f"{BLOCKED_OPSET}), or quantize per channel to export at an older opset"
        )
    traced, args, default_names = _as_args(model, example_inputs)
    _check_quantizers(model)
    n_in = len(default_names)
    input_names = list(input_names or default_names)
    if len(input_names) != n_in:
        raise ValueError(
            f"input_names must name each example input: got {len(input_names)} name(s) for "
            f"{n_in} input(s); give one name per input"
        )
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            outputs = traced(*args)
        output_names = list(output_names or default_output_names(outputs))
        axes = _axes(model, example_inputs, outputs, input_names, output_names, dynamic_batch,
                     dynamic_axes)
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of one that needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX.*")
            # strided slices stay in the graph unfolded, which ONNX Runtime runs as well
            warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
            if any(type(m).__name__ == "StripeConv2d" for m in model.modules()):
                # its index_add indices are distinct filters, for which the export is exact
                warnings.filterwarnings("ignore", message=".*duplicated values in 'index'.*")
            torch.onnx.export(
                traced, args, buffer, dynamo=False, opset_version=min(opset, 20),
                input_names=input_names, output_names=output_names,
                dynamic_axes=axes or None, do_constant_folding=True,
                custom_opsets={"penjing": 1} if groups else None,
            )
    except (torch.onnx.errors.UnsupportedOperatorError,
            torch.onnx.errors.SymbolicValueError) as err:
        error = _unsupported(err, traced, args)
        if is_hf(model) and "aten::diff" in str(error) and not (
                isinstance(example_inputs, Mapping) and "attention_mask" in example_inputs):
            # transformers looks for packed sequences in position ids (torch.diff) when no
            # attention mask is given
            error = UnsupportedLayerError(
                f"{error}. For a transformers decoder give the attention mask too: "
                "example_inputs={'input_ids': ids, 'attention_mask': torch.ones_like(ids)}")
        raise error from err
    finally:
        model.train(was_training)
    proto = onnx_lib.load_from_string(buffer.getvalue())
    if any(node.op_type == "QuantizeLinear" for node in proto.graph.node):
        finish_qdq(proto)
        _check_integer_layers(model, proto)
    if groups or opset > 20:
        finish_blocked(proto, groups, opset, contrib_ops)
    onnx_lib.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return str(path)
