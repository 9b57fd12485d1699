"""`penjing quantize` as one function: a float checkpoint in, INT8/INT4 files and a table out."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from penjing import data, models
from penjing.quant.checkpoint import save_quantized
from penjing.quant.config import QuantConfig
from penjing.quant.linear import PerChannel, PerGroup, PerTensor, QuantSpec
from penjing.quant.observers import OBSERVERS
from penjing.quant.ptq import ptq
from penjing.quant.report import LayerStats, describe, format_layers, layer_report
from penjing.train import evaluate, load_checkpoint, seed_everything

GRANULARITIES = ("channel", "tensor", "group")


@dataclass(frozen=True)
class QuantizeSummary:
    """Everything one `quantize_command` run measured and wrote."""

    model: str
    setting: str  # e.g. "weights int8/ch, activations uint8/t (minmax, 256 images)"
    fp32_accuracy: float
    accuracy: float  # penjing's fake-quantized model on the test split
    layers: list[LayerStats]
    onnx_path: str | None
    ort_accuracy: float | None  # ONNX Runtime on the written .onnx, same test split
    agreement: str | None  # Agreement.format() of ORT against penjing
    ops: dict[str, int] | None  # ops ORT runs after its graph optimizations
    checkpoint_path: str | None
    checkpoint_bytes: int | None
    fp32_bytes: int

    def format(self) -> str:
        lines = [f"{self.model}: {self.setting}", "", format_layers(self.layers), ""]
        lines.append(f"test accuracy: FP32 {self.fp32_accuracy:.2%}, quantized {self.accuracy:.2%}"
                     f" ({100 * (self.accuracy - self.fp32_accuracy):+.2f} points)")
        if self.onnx_path:
            ops = ", ".join(f"{k}×{v}" for k, v in sorted(self.ops.items()))
            lines += [
                f"ONNX written to {self.onnx_path}; ONNX Runtime accuracy {self.ort_accuracy:.2%}",
                self.agreement,
                f"ONNX Runtime runs: {ops}",
            ]
        if self.checkpoint_path:
            lines.append(
                f"quantized checkpoint written to {self.checkpoint_path}: "
                f"{self.checkpoint_bytes:,} bytes ({self.fp32_bytes / self.checkpoint_bytes:.1f}× "
                f"smaller than the {self.fp32_bytes:,} float32 bytes of the input)"
            )
        return "\n".join(lines)


def make_config(
    bits: int = 8,
    granularity: str = "channel",
    group_size: int | None = None,
    observer: str = "minmax",
    weight_range: str = "minmax",
    act_bits: int | None = 8,
    skip: Sequence[str] = (),
    skip_first: bool = False,
    skip_last: bool = False,
) -> QuantConfig:
    """The QuantConfig the command line describes: symmetric signed weights at `bits`,
    asymmetric unsigned activations at `act_bits` (None: weights only)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if (granularity == "group") != (group_size is not None):
        raise ValueError(
            "group_size goes with granularity 'group' and only with it (e.g. group 32, 64 "
            f"or 128); got granularity {granularity!r}, group_size {group_size!r}"
        )
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {sorted(OBSERVERS)}")
    g = {"channel": PerChannel(0), "tensor": PerTensor()}.get(granularity) or PerGroup(group_size)
    activation = None if act_bits is None else QuantSpec(act_bits, False, False, PerTensor())
    return QuantConfig(
        weight=QuantSpec(bits, True, True, g),
        activation=activation,
        observer=observer,
        weight_range=weight_range,
        layers={pattern: False for pattern in skip},
        first=not skip_first,
        last=not skip_last,
    )


def quantize_command(
    model: str,
    weights: str | os.PathLike,
    *,
    dataset: str = "mnist",
    config: QuantConfig | None = None,
    calib_images: int = 256,
    batch_size: int = 64,
    onnx_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
) -> QuantizeSummary:
    """Quantize `model` (a penjing model name or module:function) with float `weights`
    (safetensors) by `config`, calibrated on `calib_images` training images of a bundled
    data set; measure it on the test split; write `onnx_path` (QDQ) and/or `out` (penjing
    quantized checkpoint, integer weights) when given."""
    from penjing.export import compare_with_ort, optimized_ops, ort_accuracy
    from penjing.export import onnx as export_onnx

    if calib_images < 1:
        raise ValueError(f"calib_images must be >= 1, got {calib_images}")
    config = config or make_config()
    split = data.load(dataset)
    train, test = data.loaders(split, batch_size=batch_size, seed=seed)
    seed_everything(seed)
    float_model = models.build(model, split.num_classes)
    load_checkpoint(weights, float_model)
    float_model.eval()
    images = torch.cat([x for x, _ in itertools.islice(train, -(-calib_images // batch_size))])
    calib = list(images[:calib_images].split(batch_size))
    quantized = ptq(float_model, calib, config)
    summary = dict(
        model=model,
        setting=_setting(config, calib_images),
        fp32_accuracy=evaluate(float_model, test),
        accuracy=evaluate(quantized, test),
        layers=layer_report(float_model, quantized, calib[0]),
        onnx_path=None, ort_accuracy=None, agreement=None, ops=None,
        checkpoint_path=None, checkpoint_bytes=None,
        fp32_bytes=sum(t.numel() * t.element_size() for t in float_model.state_dict().values()),
    )
    if onnx_path is not None:
        path = export_onnx(quantized, onnx_path, calib[0][:1])
        x_test = next(iter(test))[0]
        summary.update(onnx_path=path, ort_accuracy=ort_accuracy(path, test),
                       agreement=compare_with_ort(quantized, path, x_test).format(),
                       ops=optimized_ops(path))
    if out is not None:
        size = save_quantized(quantized, config, out)
        summary.update(checkpoint_path=str(out), checkpoint_bytes=size)
    return QuantizeSummary(**summary)


def _setting(config: QuantConfig, calib_images: int) -> str:
    weights = f"weights {describe(config.weight)} ({config.weight_range} range)"
    if config.activation is None:
        return f"{weights}, activations float"
    return (
        f"{weights}, activations {describe(config.activation)} "
        f"({config.observer} observer, {calib_images} calibration images)"
    )

