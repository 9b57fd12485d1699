"""`penjing export`: a model file to ONNX (FP32, or QDQ INT8 for a quantized model)."""

from __future__ import annotations

import argparse

from penjing.cli import common
from penjing.train import evaluate


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export", formatter_class=common.HelpFormatter,
        help="export a model file to ONNX for ONNX Runtime (QDQ when it is quantized) and "
        "check ONNX Runtime against PyTorch",
        description="Read MODEL from --weights and write ONNX to --out with a dynamic batch "
        "axis: FP32, or QDQ that ONNX Runtime runs on integer kernels when the file is a "
        "quantized model. With --data, ONNX Runtime's test accuracy and its agreement with "
        "penjing's outputs are printed, with the ops ONNX Runtime runs.",
    )
    common.add_model(parser)
    common.add_weights(parser, required=True)
    common.add_data(parser, allow_none=True)
    parser.add_argument("--input-shape", type=common.shape,
                        help="example input, e.g. 1,3,224,224 (default: one image of --data)")
    common.add_out(parser, "the .onnx file", required=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from penjing.export import compare_with_ort, onnx, optimized_ops, ort_accuracy

    split, _, test = common.load_data(args.data)
    model = common.load_model(args.model, args.weights, split.num_classes if split else None)
    x = common.example_input(split, args.input_shape, 1)
    path = onnx(model, args.out, x)
    print(f"ONNX written to {path}")
    if test is not None:
        batch = next(iter(test))[0]
        print(f"test accuracy: PyTorch {evaluate(model, test):.2%}, ONNX Runtime "
              f"{ort_accuracy(path, test):.2%}")
        print(compare_with_ort(model, path, batch).format())
    ops = optimized_ops(path)
    print("ONNX Runtime runs: " + ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())))
    inputs = batch[:32] if test is not None else x  # 30 runs of a few images: a second
    seconds, spread = _ort_latency(path, inputs)
    print(f"ONNX Runtime latency, batch {inputs.shape[0]}: {1e3 * seconds:.3f} ms "
          f"±{spread / 2:.0%} (median of 30 runs, ± half the interquartile range)")
    if warning := common.spread_warning(spread):
        print(warning)


def _ort_latency(path: str, inputs, repeats: int = 30) -> tuple[float, float]:
    """Median seconds of one ONNX Runtime run of `path` on `inputs` (the kernels the file
    runs on, integer ones for a quantized model) and the spread of the timings."""
    from penjing.export.ort import ort_latency_spread

    return ort_latency_spread(path, inputs, repeats=repeats, warmup=3)
