"""`penjing quantize`: a model file in, a quantized model file, QDQ ONNX and a table out."""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from penjing.cli import common
from penjing.core.parametrize import finalize_
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.quant.linear.config import QuantConfig, make_config, select
from penjing.quant.linear.primitives import PerChannel, PerGroup
from penjing.quant.linear.ptq import ptq, ptq_guarded, qat
from penjing.quant.linear.report import LayerStats, describe, format_layers, layer_report
from penjing.train import evaluate, seed_everything


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
    guard: str | None = None  # Guarded.format() when --max-drop ran the accuracy guard

    def format(self) -> str:
        lines = [f"{self.model}: {self.setting}", "", format_layers(self.layers), ""]
        if self.guard:
            lines += [self.guard, ""]
        lines.append(f"test accuracy: FP32 {self.fp32_accuracy:.2%}, quantized "
                     f"{common.accuracy(self.fp32_accuracy, self.accuracy)}")
        if self.onnx_path:
            ops = ", ".join(f"{k}×{v}" for k, v in sorted(self.ops.items()))
            lines += [
                f"ONNX written to {self.onnx_path}; ONNX Runtime accuracy "
                f"{common.accuracy(self.fp32_accuracy, self.ort_accuracy)} against FP32",
                self.agreement,
                f"ONNX Runtime runs: {ops}",
            ]
        if self.checkpoint_path:
            lines.append(
                f"quantized model written to {self.checkpoint_path}: "
                f"{self.checkpoint_bytes:,} bytes ({self.fp32_bytes / self.checkpoint_bytes:.1f}× "
                f"smaller than the {self.fp32_bytes:,} float32 bytes of the input)"
            )
        return "\n".join(lines)


def quantize_command(
    model: str,
    weights: str | os.PathLike,
    *,
    dataset: str = "mnist",
    config: QuantConfig | None = None,
    calib_images: int = 256,
    epochs: int = 0,
    lr: float = 1e-4,
    batch_size: int = 64,
    onnx_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    method: str = "nearest",
    max_drop: float | None = None,
    guard_images: int = 1000,
) -> QuantizeSummary:
    """Quantize `model` (a penjing model name or module:function) from the model file
    `weights` by `config`, calibrated on `calib_images` training images of `dataset`
    (then trained with fake quantization for `epochs` at `lr` when epochs > 0: QAT);
    measure it on the test split; write `onnx_path` (QDQ) and/or `out` (a penjing model
    file with integer weights) when given. Masks and shared weights are baked in first.

    `method` 'gptq' or 'awq' quantizes the weights of the Linear layers `config` picks
    layer by layer on the calibration images instead (weights only, asymmetric, `config`'s
    bits and groups); 'nearest' rounds every weight to its grid.

    `max_drop` (a fraction: 0.01 is one accuracy point) runs PTQ's accuracy guard
    (`penjing.quant.ptq_guarded`), measured on the last `guard_images` training images so
    that the test figures stay out of the choice."""
    from penjing.export import compare_with_ort, optimized_ops, ort_accuracy
    from penjing.export import onnx as export_onnx

    if calib_images < 1:
        raise ValueError(f"calib_images must be >= 1, got {calib_images}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if max_drop is not None and epochs:
        raise ValueError("max_drop guards PTQ; with QAT (epochs > 0) leave it out")
    if max_drop is not None and method != "nearest":
        raise ValueError(f"max_drop guards PTQ's rounding to nearest; with {method.upper()} "
                         "leave it out")
    config = config or make_config()
    if method != "nearest" and (config.activation is not None or epochs):
        raise ValueError(f"{method.upper()} quantizes weights only, once: give it with "
                         "--weight-only and without --epochs (QAT)")
    split, train, test = common.load_data(dataset, batch_size, seed)
    seed_everything(seed)
    float_model = common.load_model(model, weights, split.num_classes)
    finalize_(float_model)
    float_model.eval()
    images = torch.cat([x for x, _ in itertools.islice(train, -(-calib_images // batch_size))])
    calib = list(images[:calib_images].split(batch_size))
    epochs = common.epochs(epochs)
    setting = _setting(config, calib_images) + (f", QAT {epochs} epochs" if epochs else "")
    guard = None
    if method != "nearest":
        quantized, setting = _layerwise(float_model, calib, config, method, calib_images)
    elif epochs:
        quantized = qat(float_model, train, config, epochs=epochs, lr=lr,
                        calib_batches=len(calib), progress=progress, desc="QAT")
    elif max_drop is not None:
        held_out = _guard_loader(split, guard_images, batch_size)
        guarded = ptq_guarded(float_model, calib, config, max_drop=max_drop,
                              evaluate=lambda m: evaluate(m, held_out))
        quantized, guard = guarded.model, guarded.format()
    else:
        quantized = ptq(float_model, calib, config)
    summary = dict(
        model=model,
        setting=setting,
        fp32_accuracy=evaluate(float_model, test),
        accuracy=evaluate(quantized, test),
        layers=layer_report(float_model, quantized, calib[0]),
        onnx_path=None, ort_accuracy=None, agreement=None, ops=None,
        checkpoint_path=None, checkpoint_bytes=None, guard=guard,
        fp32_bytes=sum(t.numel() * t.element_size() for t in float_model.state_dict().values()),
    )
    if onnx_path is not None:
        path = export_onnx(quantized, onnx_path, calib[0][:1])
        x_test = next(iter(test))[0]
        summary.update(onnx_path=path, ort_accuracy=ort_accuracy(path, test),
                       agreement=compare_with_ort(quantized, path, x_test).format(),
                       ops=optimized_ops(path))
    if out is not None:
        size = common.save_model(quantized, out, model)
        summary.update(checkpoint_path=str(out), checkpoint_bytes=size)
    return QuantizeSummary(**summary)


METHODS = ("nearest", "gptq", "awq")


def _layerwise(float_model: nn.Module, calib: list[torch.Tensor], config: QuantConfig,
               method: str, calib_images: int) -> tuple[nn.Module, str]:
    """GPTQ or AWQ on the Linear layers `config` picks, on a copy: (the copy, its setting)."""
    from penjing.quant import AWQConfig, GPTQConfig, quantize_

    spec = config.weight
    if not isinstance(spec.granularity, PerGroup | PerChannel):
        raise ValueError(f"{method.upper()} keeps a scale per row or per group of columns: "
                         "give --granularity channel or group, not tensor")
    group = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
    picked = select(float_model, config)
    linears = [n for n, s in picked.items()
               if s is not None and isinstance(float_model.get_submodule(n), nn.Linear)]
    others = [n for n, s in picked.items() if s is not None and n not in linears]
    if not linears:
        raise UnsupportedLayerError(
            f"{method.upper()} quantizes Linear layers and {type(float_model).__name__} has "
            f"none among the layers chosen ({others[:5]}); use --method nearest")
    if others:
        warnings.warn(f"{method.upper()} quantizes Linear layers only: {len(others)} other "
                      f"layers stay float ({', '.join(others[:4])}); --method nearest "
                      "quantizes them too", PenjingWarning, stacklevel=2)
    kind = GPTQConfig if method == "gptq" else AWQConfig
    quantized = copy.deepcopy(float_model)
    quantize_(quantized, kind(spec.bits, group, layers=linears), calib=calib)
    grid = f"int{spec.bits}" + (f" in groups of {group}" if group else " per row")
    return quantized, (f"weights {grid}, asymmetric, by {method.upper()} on {calib_images} "
                       f"calibration images ({len(linears)} Linear layers), activations float")


def _guard_loader(split, images: int, batch_size: int):
    """The last `images` training images (calibration reads the first ones)."""
    from torch.utils.data import DataLoader, Subset

    if images < 1:
        raise ValueError(f"guard_images must be >= 1, got {images}")
    n = len(split.train)
    picked = Subset(split.train, range(max(0, n - images), n))
    return DataLoader(picked, batch_size=max(batch_size, 256))


def _setting(config: QuantConfig, calib_images: int) -> str:
    weights = f"weights {describe(config.weight)} ({config.weight_range} range)"
    if config.activation is None:
        return f"{weights}, activations float"
    return (
        f"{weights}, activations {describe(config.activation)} "
        f"({config.observer} observer, {calib_images} calibration images)"
    )


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "quantize", formatter_class=common.HelpFormatter,
        help="linear quantization (PTQ, or QAT with --epochs) to INT8 / INT4: per-layer "
        "scales and SQNR, accuracy, QDQ ONNX and an integer model file",
        description="Fold BatchNorm, quantize weights (symmetric int, per channel, per "
        "tensor or in groups) and activations (asymmetric uint8 per tensor, calibrated on "
        "--calib-images training images by --observer), print per-layer scale ranges and "
        "SQNR, and the test accuracy before and after. --epochs N trains with fake "
        "quantization (QAT) after calibrating. --onnx writes QDQ ONNX that ONNX Runtime runs "
        "on integer kernels; --out writes a model file with integer weights.",
    )
    common.add_model(parser)
    common.add_weights(parser, required=True)
    parser.add_argument("--bits", type=int, default=8, help="weight bits, 2-8 or 16")
    parser.add_argument("--granularity", default="channel",
                        choices=["channel", "tensor", "group"], help="of weight scales")
    parser.add_argument("--group-size", type=int, help="with --granularity group: 32/64/128")
    parser.add_argument("--weight-range", default="minmax", choices=["minmax", "mse"],
                        help="each weight scale from the min / max of its channel (group), "
                        "or from the narrower range with the least squared error")
    parser.add_argument("--observer", default="minmax",
                        choices=["minmax", "moving_average", "percentile", "entropy", "mse"],
                        help="activation calibration")
    parser.add_argument("--act-bits", type=int, default=8, help="activation bits")
    parser.add_argument("--weight-only", action="store_true", help="leave activations float")
    parser.add_argument("--method", default="nearest", choices=METHODS,
                        help="how weights meet their grid: round to nearest, or, with "
                        "--weight-only, GPTQ's error correction or AWQ's activation-aware "
                        "scales, layer by layer on the --calib-images (Linear layers, "
                        "asymmetric grid)")
    parser.add_argument("--calib-images", type=int, default=256,
                        help="training images the activation ranges (or, with --method gptq "
                        "or awq, the weights' errors) are measured on")
    common.add_skip(parser, "left in float")
    parser.add_argument("--skip-first", action="store_true", help="first layer in float")
    parser.add_argument("--skip-last", action="store_true", help="last layer in float")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights, exact on x86 CPUs without VNNI")
    parser.add_argument("--learnable", action="store_true",
                        help="QAT (--epochs > 0): learn the scales (LSQ)")
    common.add_data(parser)
    common.add_training(parser, 0, "QAT epochs after calibration (0: PTQ only)", lr=1e-4)
    parser.add_argument("--max-drop", type=float, metavar="POINTS",
                        help="accuracy guard: leave the most sensitive layers in float, one "
                        "at a time, until the accuracy is within POINTS percentage points of "
                        "FP32 (measured on --guard-images training images)")
    parser.add_argument("--guard-images", type=int, default=1000,
                        help="last training images the --max-drop guard measures on")
    parser.add_argument("--onnx", metavar="FILE", help="write QDQ ONNX here")
    common.add_out(parser, "the quantized model file (integer weights)")
    common.add_run(parser)
    parser.set_defaults(run=run)


def _points(value: float) -> float:
    """--max-drop in percentage points as the fraction the library takes."""
    if not 0 <= value <= 100:
        raise ValueError(f"--max-drop is in accuracy points, between 0 and 100 (1 = one "
                         f"percentage point), got {value}")
    return value / 100


def run(args: argparse.Namespace) -> None:
    config = make_config(
        bits=args.bits, granularity=args.granularity, group_size=args.group_size,
        observer=args.observer, weight_range=args.weight_range,
        act_bits=None if args.weight_only else args.act_bits, skip=tuple(args.skip),
        skip_first=args.skip_first, skip_last=args.skip_last, reduce_range=args.reduce_range,
        learnable=args.learnable,
    )
    summary = quantize_command(
        args.model, args.weights, dataset=args.data, config=config,
        calib_images=args.calib_images, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, onnx_path=args.onnx, out=args.out, seed=args.seed,
        progress=common.progress(args), method=args.method, guard_images=args.guard_images,
        max_drop=None if args.max_drop is None else _points(args.max_drop),
    )
    print(summary.format())
