"""How closely ONNX Runtime's run of an exported file follows penjing's own model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from penjing.export.ort import ort_run
from penjing.inputs import Inputs, call, first_tensor
from penjing.quant.linear.fakequant import ActQuant


@dataclass(frozen=True)
class Agreement:
    """ONNX Runtime's outputs against the PyTorch model's, on the same inputs."""

    max_abs: float  # largest |ORT − PyTorch| over all outputs
    step: float | None  # scale of the model's output quantizer (None: output not quantized)
    max_steps: float | None  # max_abs in output quantization steps
    exact: float  # fraction of outputs that land on the same integer (or within 1e-5)
    top1: float  # fraction of rows whose argmax (predicted class) is the same

    def format(self) -> str:
        steps = "" if self.max_steps is None else f" = {self.max_steps:.0f} output step(s)"
        return (
            f"ONNX Runtime vs penjing: max |Δ| {self.max_abs:.3g}{steps}, "
            f"{self.exact:.2%} of outputs identical, top-1 agreement {self.top1:.2%}"
        )


def output_step(model: nn.Module) -> float | None:
    """The scale of the activation quantizer whose value the model returns, if one does."""
    if not isinstance(model, fx.GraphModule):
        return None
    (out,) = (n for n in model.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, fx.Node) and value.op == "call_module":
        module = model.get_submodule(value.target)
        if isinstance(module, ActQuant) and module.frozen:
            return float(module.scale.detach().max())
    return None


@torch.no_grad()
def compare_with_ort(
    model: nn.Module, path: str | os.PathLike, inputs: Inputs, threads: int = 2
) -> Agreement:
    """Run `inputs` (a tensor, a tuple of tensors or a dict of keyword tensors such as
    `{"input_ids": ..., "attention_mask": ...}`) through `model` (eval mode) and through
    ONNX Runtime on `path`, and measure how far apart the first outputs are."""
    was_training = model.training
    model.eval()
    try:
        want = first_tensor(call(model, inputs)).numpy()
    finally:
        model.train(was_training)
    got = ort_run(path, inputs, threads)[0]
    if got.shape != want.shape:
        raise ValueError(
            f"ONNX Runtime returned shape {got.shape}, the model {want.shape}: {str(path)!r} "
            "was not exported from this model"
        )
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    step = output_step(model)
    tolerance = step / 2 if step else 1e-5
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1))) if want.ndim > 1 else 1.0
    return Agreement(
        max_abs=float(diff.max(initial=0.0)),
        step=step,
        max_steps=float(np.rint(diff.max(initial=0.0) / step)) if step else None,
        exact=float(np.mean(diff < tolerance)),
        top1=top1,
    )
