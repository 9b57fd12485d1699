"""Linear quantization on LeNet-5 and the small BN VGG: PTQ per observer, ONNX Runtime
latency of the INT8 export against FP32 and against ORT's own quantize_static, INT4
weight-only, and QAT.

Writes the `quantization` section of BENCHMARKS.md. Every figure is measured in the run
that writes it; latencies are medians of interleaved runs in one process. Run:
`.venv/bin/python bench/quantization.py [--quick]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import PEER_METHODS, latencies, peer_quantize, write_section

from penjing import data
from penjing.demo import dense_baseline
from penjing.export import compare_with_ort, cpu_saturates_int8, ort_accuracy
from penjing.export import onnx as export_onnx
from penjing.quant import (
    OBSERVERS,
    PerChannel,
    QuantConfig,
    QuantSpec,
    int8,
    ptq,
    qat,
    save_quantized,
)
from penjing.quant import weight_only as weight_only_config
from penjing.train import evaluate, fit, save_checkpoint

CALIB_IMAGES = 256
THREADS = 2
ACCURACY_BUDGET = 0.3  # points of top-1 an INT8 model may lose
SPEED_TARGET = 0.6  # INT8 / FP32 latency at batch 32 on the CNN
QAT_BUDGET = 0.5  # points INT4 QAT may stay below FP32
PEER_SLACK = 1.05  # "no worse" latency: within 5 % timing noise of the peer
MODELS = {"lenet5": "LeNet-5", "vgg": "small BN VGG"}


def ptq_section(name, model, fp32_acc, calib, test, workdir, example) -> tuple[list, dict, dict]:
    """PTQ INT8 per observer: simulated and ORT accuracy, agreement; the peer's accuracy."""
    lines = [
        f"### {MODELS[name]}: INT8 PTQ per observer (FP32 {fp32_acc:.2%})",
        "",
        "| observer | penjing (simulated) | ONNX Runtime, our file | Δ points | within "
        f"{ACCURACY_BUDGET} pt | ORT vs simulation | ORT quantize_static | ours ≥ peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    paths = {"fp32": export_onnx(model, workdir / f"{name}-fp32.onnx", example)}
    results = {}
    for observer in sorted(OBSERVERS):
        q = ptq(model, calib, int8(observer=observer, reduce_range=cpu_saturates_int8()))
        path = export_onnx(q, workdir / f"{name}-{observer}.onnx", example)
        if observer == "minmax":
            paths["penjing int8"] = path
        sim = evaluate(q, test)
        ours = ort_accuracy(path, test, THREADS)
        agree = compare_with_ort(q, path, next(iter(test))[0])
        delta = 100 * (ours - fp32_acc)
        peer = peer_cell = verdict = "-"
        if observer in PEER_METHODS:
            peer_path = peer_quantize(
                paths["fp32"], workdir / f"{name}-peer-{observer}.onnx", calib, observer
            )
            if observer == "minmax":
                paths["ORT quantize_static"] = peer_path
            peer = ort_accuracy(peer_path, test, THREADS)
            peer_cell = f"{peer:.2%} ({PEER_METHODS[observer]})"
            verdict = "yes" if ours >= peer else "**no**"
        results[observer] = {"ours": ours, "delta": delta, "peer": peer}
        lines.append(
            f"| {observer} | {sim:.2%} | {ours:.2%} | {delta:+.1f} | "
            f"{'yes' if delta >= -ACCURACY_BUDGET else '**no**'} | ≤ {agree.max_steps:.0f} "
            f"step, {agree.exact:.1%} identical, top-1 {agree.top1:.1%} | {peer_cell} | "
            f"{verdict} |"
        )
    return lines, paths, results


def latency_section(name, paths, test, rounds, per_round) -> tuple[list, dict]:
    x_all = next(iter(test))[0]
    lines = [
        "",
        f"ONNX Runtime latency, {MODELS[name]}: median ms per run, {THREADS} threads, "
        "same process, interleaved rounds.",
        "",
        "| batch | FP32 | penjing INT8 | ORT quantize_static INT8 | ours / FP32 | "
        "ours / peer |",
        "|---|---|---|---|---|---|",
    ]
    ratios = {}
    for batch in (1, 32):
        t = latencies(paths, x_all[:batch], rounds, per_round)
        ours, fp32, peer = t["penjing int8"], t["fp32"], t["ORT quantize_static"]
        ratios[batch] = (ours / fp32, ours / peer)
        lines.append(
            f"| {batch} | {1e3 * fp32:.3f} | {1e3 * ours:.3f} | {1e3 * peer:.3f} | "
            f"**{ours / fp32:.2f}×** | {ours / peer:.2f}× |"
        )
    return lines, ratios


def int4_section(name, model, fp32_acc, calib, test, workdir: Path) -> list[str]:
    fp32_bytes = save_checkpoint(model, workdir / f"{name}-fp32.safetensors")
    lines = [
        "",
        f"INT4 on {MODELS[name]} (PTQ, no training): weights symmetric int4. Checkpoint = "
        "`pj.quant.save_quantized` (int4 weights two to a byte, scales and every other "
        f"tensor float32) against the FP32 safetensors checkpoint, {fp32_bytes:,} bytes.",
        "",
        "| setting | accuracy | Δ points | checkpoint bytes | vs FP32 |",
        "|---|---|---|---|---|",
    ]
    settings = {
        "weight-only, per channel": weight_only_config(bits=4),
        "weight-only, groups of 128": weight_only_config(bits=4, group_size=128),
        "weight-only, groups of 64": weight_only_config(bits=4, group_size=64),
        "weight-only, groups of 32": weight_only_config(bits=4, group_size=32),
        "int4 weights per channel + uint8 activations": QuantConfig(
            weight=QuantSpec(4, True, True, PerChannel(0))
        ),
    }
    for label, cfg in settings.items():
        q = ptq(model, calib if cfg.activation else None, cfg)
        acc = evaluate(q, test)
        size = save_quantized(q, cfg, workdir / f"{name}-int4.safetensors")
        lines.append(f"| {label} | {acc:.2%} | {100 * (acc - fp32_acc):+.1f} | {size:,} | "
                     f"{size / fp32_bytes:.3f}× |")
    return lines


def qat_section(model, fp32_acc, train, calib, test, epochs: int) -> tuple[list, bool]:
    """INT4 QAT on LeNet-5 (int4 weights per channel, uint8 activations), with fixed
    and LSQ-learned scales, and the FP32 model trained as long, as a control."""
    w4a8 = QuantSpec(4, True, True, PerChannel(0))
    ptq_acc = evaluate(ptq(model, calib, QuantConfig(weight=w4a8)), test)
    lines = [
        "",
        f"### LeNet-5: INT4 QAT ({epochs} epoch(s), Adam 1e-4, from the FP32 model)",
        "",
        "| model | accuracy | Δ vs FP32 points | within "
        f"{QAT_BUDGET} pt |",
        "|---|---|---|---|",
        f"| FP32 | {fp32_acc:.2%} | - | - |",
        f"| W4A8 PTQ | {ptq_acc:.2%} | {100 * (ptq_acc - fp32_acc):+.1f} | "
        f"{'yes' if ptq_acc >= fp32_acc - QAT_BUDGET / 100 else 'no'} |",
    ]
    met = False
    for label, learnable in (("W4A8 QAT, min/max scales", False),
                             ("W4A8 QAT, LSQ scales", True)):
        q = qat(model, train, QuantConfig(weight=w4a8, learnable=learnable), epochs=epochs,
                lr=1e-4, progress=False)
        acc = evaluate(q, test)
        ok = acc >= fp32_acc - QAT_BUDGET / 100
        met = met or ok
        lines.append(f"| {label} | {acc:.2%} | {100 * (acc - fp32_acc):+.1f} | "
                     f"{'yes' if ok else '**no**'} |")
    control = type(model)()
    control.load_state_dict(model.state_dict())
    fit(control, train, epochs=epochs, lr=1e-4, progress=False)
    acc = evaluate(control, test)
    lines.append(f"| control: FP32 trained {epochs} more epoch(s) alike | {acc:.2%} | "
                 f"{100 * (acc - fp32_acc):+.1f} | - |")
    return lines, met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="short training and timing: a smoke run, not the reference")
    args = parser.parse_args()
    epochs = {"lenet5": 2, "vgg": 1} if args.quick else {"lenet5": 10, "vgg": 10}
    rounds, per_round = (3, 10) if args.quick else (10, 30)
    torch.manual_seed(0)
    split = data.mnist()
    train, test = data.loaders(split, batch_size=64, seed=0)
    calib = [x for (x, _), _ in zip(train, range(CALIB_IMAGES // 64), strict=False)]
    example = calib[0][:1]
    lines = [
        "## Linear quantization: INT8 / INT4 PTQ, QAT, ONNX Runtime",
        "",
        f"Dense models trained on the MNIST subset (LeNet-5 {epochs['lenet5']} epochs, small "
        f"BN VGG {epochs['vgg']} epochs, Adam 1e-3); accuracy on the 1,000 test images. "
        f"INT8 = int8 weights per channel (symmetric), uint8 activations per tensor, BN "
        f"folded, calibrated on {CALIB_IMAGES} training images; the ONNX Runtime column runs "
        "our QDQ file on its integer kernels. The peer is ONNX Runtime's `quantize_static` "
        "on our FP32 export with the same images and the same format (QDQ, u8 activations, "
        "s8 per-channel weights) and the matching calibration method. "
        f"int8 weights reduced to 7 bits for non-VNNI CPUs: {cpu_saturates_int8()}.",
        "",
    ]
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in MODELS:
            t = time.perf_counter()
            model = dense_baseline(name, workdir, train, epochs=epochs[name], progress=False,
                                   log=lambda _m: None).eval()
            fp32_acc = evaluate(model, test)
            print(f"{name}: trained to {fp32_acc:.2%} in {time.perf_counter() - t:.0f} s",
                  flush=True)
            body, paths, results = ptq_section(name, model, fp32_acc, calib, test, workdir,
                                               example)
            lines += body
            lat, ratios = latency_section(name, paths, test, rounds, per_round)
            lines += lat
            lines += int4_section(name, model, fp32_acc, calib, test, workdir)
            lines.append("")
            verdicts.append((name, results, ratios))
            if name == "lenet5":
                qat_lines, qat_met = qat_section(model, fp32_acc, train, calib, test, epochs=1)
            print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    lines += qat_lines
    lines += ["", "### Targets", ""]
    for name, results, _ in verdicts:
        acc_ok = all(r["delta"] >= -ACCURACY_BUDGET for r in results.values())
        peer_ok = all(r["ours"] >= r["peer"] for r in results.values() if r["peer"] != "-")
        lines.append(f"- INT8 PTQ on {MODELS[name]} within {ACCURACY_BUDGET} points for every "
                     f"observer (ORT's run of our file): **{'met' if acc_ok else 'missed'}**; "
                     f"accuracy at least the peer's for each matching calibration method: "
                     f"**{'met' if peer_ok else 'missed'}**.")
    vgg_ratio = verdicts[-1][2][32][0]
    lines.append(f"- INT8 ≤ {SPEED_TARGET}× FP32 latency at batch 32 on the CNN (small VGG): "
                 f"{vgg_ratio:.2f}× — **{'met' if vgg_ratio <= SPEED_TARGET else 'missed'}**.")
    worst_peer = max(r[2][b][1] for r in verdicts for b in (1, 32))
    lines.append(f"- Latency no worse than ORT's quantize_static (within "
                 f"{PEER_SLACK - 1:.0%} timing noise): worst ours/peer {worst_peer:.2f}× — "
                 f"**{'met' if worst_peer <= PEER_SLACK else 'missed'}**.")
    lines.append(f"- INT4 QAT on LeNet-5 within {QAT_BUDGET} points of FP32: "
                 f"**{'met' if qat_met else 'missed'}**.")
    write_section("quantization", "\n".join(lines), quick=args.quick)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
