"""`penjing demo`: Deep Compression of a LeNet on the bundled MNIST subset, end to end."""

from __future__ import annotations

import argparse
from dataclasses import replace

from penjing.cli import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo", formatter_class=common.HelpFormatter,
        help="Deep Compression of a LeNet on the bundled MNIST subset, end to end",
        description="Train a dense LeNet (cached in --out-dir), prune, fine-tune, share "
        "weights, train the centroids, write model.pjz, load it back and measure its "
        "accuracy; report.md, plots and metrics.json go to --out-dir.",
    )
    parser.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300",
                        help="the network trained and compressed")
    parser.add_argument("--out-dir", "--out", dest="out_dir", default="runs/demo",
                        metavar="DIR", help="output folder")
    parser.add_argument("--recipe", choices=["penjing", "paper"], default="penjing",
                        help="per-layer sparsity and bits: penjing's defaults or the paper's "
                        "tables")
    parser.add_argument("--dense-epochs", type=int, default=10,
                        help="epochs of training the dense model before it is compressed")
    parser.add_argument("--rounds", type=int, help="prune → fine-tune rounds (recipe's: 3)")
    parser.add_argument("--finetune-epochs", type=int, help="epochs per round (recipe's: 4)")
    parser.add_argument("--quant-epochs", type=int, help="centroid training epochs (recipe's: 3)")
    parser.add_argument("--init", choices=["linear", "density", "forgy"],
                        help="k-means initialisation (recipe's: linear)")
    common.add_run(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
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
    recipe = replace(recipe, **changes)
    recipe = replace(recipe,
                     finetune_epochs=common.epochs(recipe.finetune_epochs, "--finetune-epochs"),
                     quant_epochs=common.epochs(recipe.quant_epochs, "--quant-epochs"))
    run_demo(args.model, args.out_dir, recipe=recipe,
             dense_epochs=common.epochs(args.dense_epochs, "--dense-epochs"), seed=args.seed,
             progress=common.progress(args))
