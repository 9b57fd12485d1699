"""`penjing sensitivity`: prune or quantize one layer at a time, tabulate the metric, and
propose per-layer ratios for a budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from penjing.cli import common

BUDGETS = ("sparsity", "params", "macs", "max_drop")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as "
                                         f"0.5,0.7,0.9, got {text!r}") from err


def _budget(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    if key not in BUDGETS or not value:
        raise argparse.ArgumentTypeError(f"expected KIND=VALUE with KIND one of {BUDGETS}, "
                                         f"e.g. sparsity=0.9, got {text!r}")
    try:
        return key, float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"budget value {value!r} is not a number") from err


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sensitivity", formatter_class=common.HelpFormatter,
        help="prune (or quantize) one layer at a time and tabulate the test accuracy; CSV, "
        "chart, and a per-layer plan for a budget",
        description="For every prunable layer and every ratio (or --bits), change that "
        "layer alone, measure accuracy on --eval-images test images, and put the layer "
        "back exactly. Writes sensitivity.csv and sensitivity.png to --out-dir; with "
        "--budget, prints the per-layer ratios that meet it (sensitive layers pruned less). "
        "Under torchrun the (layer, point) pairs are shared among the processes.",
    )
    common.add_model(parser)
    common.add_weights(parser, required=True)
    common.add_data(parser)
    parser.add_argument("--structure", choices=["weight", "nm", "channel"], default="weight",
                        help="what a sparsity sweep removes: single weights, N:4 patterns, "
                        "or channel groups")
    parser.add_argument("--ratios", type=_floats, default=[0.5, 0.7, 0.8, 0.9, 0.95],
                        help="fractions to prune, comma-separated")
    parser.add_argument("--bits", type=lambda t: [int(v) for v in _floats(t)],
                        help="sweep bits instead of ratios, e.g. 2,3,4,5")
    parser.add_argument("--quantizer", choices=["kmeans", "linear"], default="kmeans",
                        help="with --bits")
    common.add_skip(parser, "left out of the sweep")
    parser.add_argument("--eval-images", type=int, default=500,
                        help="test images each point is measured on (a fixed subset)")
    parser.add_argument("--budget", type=_budget, metavar="KIND=VALUE",
                        help=f"propose per-layer ratios: KIND one of {BUDGETS}")
    parser.add_argument("--out-dir", default="runs/sensitivity", metavar="DIR",
                        help="folder for the CSV table and the plot")
    common.add_run(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from penjing import distributed
    from penjing.analysis import Budget, plan_budget, sensitivity
    from penjing.core.parametrize import PRUNABLE
    from penjing.train import evaluate

    distributed.init()
    split, _, test = common.load_data(args.data, seed=args.seed)
    model = common.load_model(args.model, args.weights, split.num_classes)
    if args.eval_images < 1:
        raise ValueError(f"--eval-images must be >= 1, got {args.eval_images}")
    x, y = next(iter(test))
    subset = [(x[: args.eval_images], y[: args.eval_images])]
    skipped = set(common.skipped(model, args.skip))
    layers = [n for n, m in model.named_modules()
              if n and isinstance(m, PRUNABLE) and n not in skipped]
    table = sensitivity(
        model, lambda m: evaluate(m, subset, shard=False),
        None if args.bits else args.ratios, args.structure, bits=args.bits,
        quantizer=args.quantizer, layers=layers,
        example_inputs=torch.zeros(1, *split.image_shape) if args.structure == "channel"
        else None,
    )
    if not distributed.is_main():
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(table.format())
    print(f"table written to {table.save_csv(out / 'sensitivity.csv')}, chart to "
          f"{table.plot(out / 'sensitivity.png')}")
    if args.budget:
        key, value = args.budget
        value = int(value) if key in ("params", "macs") else value
        print(plan_budget(table, Budget(**{key: value})).format())
