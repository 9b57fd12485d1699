"""The `penjing` command. Each subcommand parses its options and calls one library function."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from penjing.errors import PenjingError


def _demo(args: argparse.Namespace) -> None:
    from penjing.demo import run_demo
    from penjing.pipeline import PAPER_RECIPES, RECIPES

    recipe = (PAPER_RECIPES if args.recipe == "paper" else RECIPES)[args.model]
    changes = {
        field: value
        for field, value in (
            ("prune_rounds", args.rounds),
            ("finetune_epochs", args.finetune_epochs),
            ("quant_epochs", args.quant_epochs),
            ("init", args.init),
            ("seed", args.seed),
        )
        if value is not None
    }
    run_demo(
        args.model,
        args.out,
        recipe=replace(recipe, **changes),
        dense_epochs=args.dense_epochs,
        seed=args.seed,
        progress=not args.quiet,
    )


def _inspect(args: argparse.Namespace) -> None:
    from penjing.codec import inspect

    print(inspect(args.path).format())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penjing",
        description="Make trained PyTorch networks smaller and faster without losing accuracy.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="Deep Compression of a LeNet on the bundled MNIST subset, end to end",
        description="Train a dense LeNet (cached in --out), prune, fine-tune, share weights, "
        "train the centroids, write model.pjz, load it back and measure its accuracy.",
    )
    demo.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument(
        "--recipe",
        choices=["penjing", "paper"],
        default="penjing",
        help="per-layer sparsity and bits: penjing's defaults or the paper's tables",
    )
    demo.add_argument("--dense-epochs", type=int, default=10)
    demo.add_argument("--rounds", type=int, help="prune → fine-tune rounds (default 3)")
    demo.add_argument("--finetune-epochs", type=int, help="epochs per round (default 4)")
    demo.add_argument("--quant-epochs", type=int, help="centroid training epochs (default 3)")
    demo.add_argument("--init", choices=["linear", "density", "forgy"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser("inspect", help="per-tensor storage table of a .pjz file")
    inspect.add_argument("path")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (PenjingError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"penjing {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
