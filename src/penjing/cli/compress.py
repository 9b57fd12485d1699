"""`penjing compress`: run a recipe of stages (train, prune, distill, quantize, encode,
export) from one YAML file, with a report and resume; or, with --target, compress one
model to a goal under an accuracy guard."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from penjing.cli import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress", formatter_class=common.HelpFormatter,
        help="run a YAML recipe of stages on one model, or reach a --target size under "
        "--max-drop",
        description="Validate RECIPE (every key, type and value, with its line) before "
        "anything runs, then run its stages in order, writing each stage's model file, "
        "report.md with plots and metrics.json to --out-dir. Run it again to resume after "
        "the last finished stage. Examples: examples/recipes/*.yaml. "
        "Without a recipe, --target GOAL --model M --weights FILE compresses one model to "
        "GOAL: 'size=50x' is a .pjz file 50 times smaller than the float32 tensors, planned "
        "from per-layer sensitivity to pruning and k-means bits (Deep Compression), with "
        "the accuracy guard --max-drop measured on held-out training images; the report "
        "gives the achieved ratio and the test accuracy change with its 95 %% interval.",
    )
    parser.add_argument("recipe", nargs="?", help="the YAML recipe (not with --target)")
    parser.add_argument("--out-dir", "--out", dest="out_dir", metavar="DIR",
                        help="output folder (default: runs/<recipe name>, runs/target)")
    parser.add_argument("--restart", action="store_true",
                        help="run every stage again instead of resuming")
    target = parser.add_argument_group("to a goal (instead of a recipe)")
    target.add_argument("--target", metavar="GOAL",
                        help="size=RATIOx (e.g. size=50x); latency=FRACTION is not taken yet")
    target.add_argument("--model", help="penjing model name or package.module:function")
    common.add_weights(target)
    common.add_data(target)
    target.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                        help="largest accuracy drop allowed, in percentage points")
    target.add_argument("--guard-images", type=int, default=1000,
                        help="last training images the guard and the sensitivity sweep "
                        "measure on")
    target.add_argument("--rounds", type=int, default=3, help="prune → fine-tune rounds")
    target.add_argument("--finetune-epochs", type=int, default=4, help="epochs per round")
    target.add_argument("--quant-epochs", type=int, default=3,
                        help="epochs of centroid training")
    target.add_argument("--batch-size", type=int, default=64,
                        help="images per training and measuring batch")
    common.add_run(parser)
    parser.set_defaults(run=run)


def target_command(
    goal: str,
    model: str,
    weights: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    dataset: str = "mnist",
    max_drop: float = 0.01,
    guard_images: int = 1000,
    stages: dict | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
):
    """Compress `model` (from `weights`) to `goal` within `max_drop` (a fraction) and
    write model.pjz, plan.txt, report.md and metrics.json to `out_dir`."""
    from torch.utils.data import DataLoader, Subset

    from penjing.analysis.target import GoalError, parse_goal
    from penjing.io import atomic_write_bytes
    from penjing.pipeline import compress_to_size
    from penjing.train import seed_everything

    parsed = parse_goal(goal)
    if parsed.kind != "size":
        raise GoalError(f"--target {goal}: latency goals are not implemented yet; give "
                        "size=RATIOx, or use penjing prune --structure channel and penjing "
                        "quantize --onnx and compare the latency they print")
    if guard_images < 1:
        raise ValueError(f"--guard-images must be >= 1, got {guard_images}")
    split, train, test = common.load_data(dataset, batch_size, seed)
    if split is None:
        raise ValueError("--target needs --data to fine-tune and measure on")
    seed_everything(seed)
    network = common.load_model(model, weights, split.num_classes)
    n = len(split.train)
    guard = DataLoader(Subset(split.train, range(max(0, n - guard_images), n)),
                       batch_size=max(batch_size, 256))
    out = Path(out_dir)
    result = compress_to_size(network, train, test, parsed.value, out / "model.pjz",
                              max_drop=max_drop, guard_loader=guard,
                              stages={"seed": seed, **(stages or {})}, progress=progress,
                              log=None if not progress else print)
    text = result.format()
    metrics = {
        "goal": str(parsed), "max_drop": max_drop, "ratio": result.ratio,
        "original_bytes": result.original_bytes, "compressed_bytes": result.compressed_bytes,
        "size_met": result.ratio >= result.goal,
        "accuracy": [result.accuracy.value, result.accuracy.low, result.accuracy.high],
        "baseline": [result.baseline.value, result.baseline.low, result.baseline.high],
        "change": [result.change.value, result.change.low, result.change.high],
        "drop_verdict": result.drop_verdict, "guard_drop": result.guard_drop,
        "test_images": result.accuracy.n, "tries": result.tries,
        "layers": {name: {"sparsity": p.sparsity, "bits": p.bits}
                   for name, p in result.recipe.layers.items()},
    }
    atomic_write_bytes(out / "plan.txt", (result.plan_text + "\n").encode())
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write_bytes(out / "report.md", (
        f"# {model} to {parsed}\n\nMeasured in this run; the compressed accuracy comes from "
        f"a fresh model loaded from `model.pjz`.\n\n```\n{text}\n```\n").encode())
    return result


def run(args: argparse.Namespace) -> None:
    if args.target is None:
        if args.recipe is None:
            raise ValueError("give a RECIPE, or --target GOAL with --model and --weights")
        from penjing.recipes import run as run_recipe

        out_dir = args.out_dir or str(Path("runs") / Path(args.recipe).stem)
        result = run_recipe(args.recipe, out_dir, resume=not args.restart,
                            progress=common.progress(args))
        print(result.format())
        return
    if args.recipe is not None:
        raise ValueError("give a RECIPE or --target, not both")
    if args.model is None:
        raise ValueError("--target needs --model (and --weights for a trained model)")
    if not 0 <= args.max_drop <= 100:
        raise ValueError(f"--max-drop is in accuracy points, between 0 and 100, got "
                         f"{args.max_drop}")
    stages = {"prune_rounds": args.rounds,
              "finetune_epochs": common.epochs(args.finetune_epochs),
              "quant_epochs": common.epochs(args.quant_epochs)}
    result = target_command(
        args.target, args.model, args.weights, args.out_dir or "runs/target",
        dataset=args.data, max_drop=args.max_drop / 100, guard_images=args.guard_images,
        stages=stages, batch_size=args.batch_size, seed=args.seed, progress=common.progress(args),
    )
    print(result.format())
