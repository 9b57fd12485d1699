"""`penjing compress`: run a recipe of stages (train, prune, distill, quantize, encode,
export) from one YAML file, with a report and resume."""

from __future__ import annotations

import argparse

from penjing.cli import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress", formatter_class=common.HelpFormatter,
        help="run a YAML recipe of stages on one model: report, plots, resume",
        description="Validate RECIPE (every key, type and value, with its line) before "
        "anything runs, then run its stages in order, writing each stage's model file, "
        "report.md with plots and metrics.json to --out-dir. Run it again to resume after "
        "the last finished stage. Examples: examples/recipes/*.yaml.",
    )
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument("--out-dir", "--out", dest="out_dir", metavar="DIR",
                        help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--restart", action="store_true",
                        help="run every stage again instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from penjing.recipes import run as run_recipe

    out_dir = args.out_dir or str(Path("runs") / Path(args.recipe).stem)
    result = run_recipe(args.recipe, out_dir, resume=not args.restart,
                        progress=common.progress(args))
    print(result.format())
