"""The `penjing` command. Each subcommand parses its options and calls one library function."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
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


def _prune(args: argparse.Namespace) -> None:
    from penjing.prune.command import prune_command

    shape = args.input_shape
    summary = prune_command(
        args.model, granularity=args.granularity, ratio=args.ratio, criterion=args.criterion,
        weights=args.weights, input_shape=shape,
        dataset=None if args.data == "none" else args.data, train_epochs=args.train_epochs,
        finetune_epochs=args.finetune_epochs, bn_batches=args.bn_batches,
        global_ranking=args.global_ranking,
        round_to=args.round_to, ignored_layers=tuple(args.ignore), nm=args.nm, out=args.out,
        seed=args.seed, progress=not args.quiet,
    )
    print(summary.format())


def _quantize(args: argparse.Namespace) -> None:
    from penjing.quant.command import make_config, quantize_command

    config = make_config(
        bits=args.bits, granularity=args.granularity, group_size=args.group_size,
        observer=args.observer, weight_range=args.weight_range,
        act_bits=None if args.weight_only else args.act_bits, skip=tuple(args.skip),
        skip_first=args.skip_first, skip_last=args.skip_last,
    )
    summary = quantize_command(
        args.model, args.weights, dataset=args.data, config=config,
        calib_images=args.calib_images, onnx_path=args.onnx, out=args.out, seed=args.seed,
    )
    print(summary.format())


def _distill(args: argparse.Namespace) -> None:
    from penjing.distill.command import distill_named

    summary = distill_named(
        args.teacher, args.student, dataset=args.data, teacher_weights=args.teacher_weights,
        student_weights=args.student_weights, teacher_epochs=args.teacher_epochs,
        epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, soft=args.soft,
        hints=tuple(args.hint) if args.hint else None, hint_epochs=args.hint_epochs, lr=args.lr,
        batch_size=args.batch_size, out=args.out, seed=args.seed, progress=not args.quiet,
    )
    print(summary.format())


def _shape(text: str) -> tuple[int, ...]:
    """--input-shape: comma-separated positive ints."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 32,3,224,224, got {text!r}"
        )
    return shape


EXIT_CODES = """exit codes:
  0    success
  1    internal error: a bug in penjing (set PENJING_TRACEBACK=1 to see where)
  2    bad input: an option, a missing or unreadable file, a file that is not what it
       should be (penjing.errors.FormatError), a model and weights or data that differ
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM). No half-written file is left.
Every error is one line on stderr naming the file or option and what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penjing",
        description="Make trained PyTorch networks smaller and faster without losing accuracy.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    prune = commands.add_parser(
        "prune",
        help="structured pruning: remove channels for real, or N:M / shape / stripe / "
        "block masks; params, MACs and latency before and after",
        description="Prune a penjing model (vgg, resnet20, mobilenetv2, ...) or your own, "
        "given as package.module:function returning the nn.Module, with --weights from a "
        "safetensors file. group/filter/channel/neuron remove channels physically and head "
        "removes attention heads; nm, "
        "shape, kernel, stripe, vector, block zero groups of weights (shape and stripe are "
        "then re-expressed so the saving is real).",
    )
    prune.add_argument("model", help="penjing model name or package.module:function")
    prune.add_argument("--weights", help="safetensors state_dict to start from")
    prune.add_argument(
        "--granularity", default="group",
        choices=["group", "filter", "channel", "neuron", "head", "nm", "shape", "kernel",
                 "stripe", "vector", "block"],
    )
    prune.add_argument("--ratio", type=float,
                       help="fraction of channels (or weight groups) to remove (default 0.5)")
    prune.add_argument("--criterion", choices=["l1", "l2", "bn", "taylor", "random"],
                       help="channel importance (default l1)")
    prune.add_argument("--global-ranking", action="store_true",
                       help="rank channels across the network instead of per layer")
    prune.add_argument("--round-to", type=int, default=1,
                       help="keep channel counts multiples of this (8, 16, 64)")
    prune.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                       help="layer whose output channels stay (repeatable)")
    prune.add_argument("--nm", default="2:4", help="N:M for --granularity nm")
    prune.add_argument("--data", default="mnist",
                       help="mnist, digits, package.module:function returning a DataSplit, "
                       "or none; for training, Taylor, fine-tuning and accuracy")
    prune.add_argument("--input-shape", type=_shape,
                       help="e.g. 32,3,224,224 (default: batch 32 of --data)")
    prune.add_argument("--train-epochs", type=int, default=0,
                       help="train first when no --weights are given")
    prune.add_argument("--finetune-epochs", type=int, default=0,
                       help="fine-tune after pruning, Adam 1e-3 with a cosine schedule to 0")
    prune.add_argument("--bn-batches", type=int, default=20,
                       help="training batches to re-measure BatchNorm statistics on after "
                       "pruning (default 20; 0 keeps the old statistics)")
    prune.add_argument("--out", help="write the pruned model here (safetensors)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(run=_prune)

    quantize = commands.add_parser(
        "quantize",
        help="linear quantization (PTQ) of a checkpoint to INT8 / INT4: per-layer scales "
        "and SQNR, accuracy, QDQ ONNX and an integer checkpoint",
        description="Fold BatchNorm, quantize weights (symmetric int, per channel, per "
        "tensor or in groups) and activations (asymmetric uint8 per tensor, calibrated on "
        "--calib-images training images by --observer), print per-layer scale ranges and "
        "SQNR, and the test accuracy before and after. --onnx writes QDQ ONNX that ONNX "
        "Runtime runs on integer kernels; --out writes a safetensors checkpoint with "
        "integer weights (penjing.quant.load_quantized reads it).",
    )
    quantize.add_argument("model", help="penjing model name or package.module:function")
    quantize.add_argument("--weights", required=True, help="float safetensors state_dict")
    quantize.add_argument("--bits", type=int, default=8, help="weight bits, 2-8 or 16 (8)")
    quantize.add_argument("--granularity", default="channel",
                          choices=["channel", "tensor", "group"], help="of weight scales")
    quantize.add_argument("--group-size", type=int, help="with --granularity group: 32/64/128")
    quantize.add_argument("--weight-range", default="minmax", choices=["minmax", "mse"])
    quantize.add_argument("--observer", default="minmax",
                          choices=["minmax", "moving_average", "percentile", "entropy", "mse"],
                          help="activation calibration (default minmax)")
    quantize.add_argument("--act-bits", type=int, default=8, help="activation bits (8)")
    quantize.add_argument("--weight-only", action="store_true", help="leave activations float")
    quantize.add_argument("--calib-images", type=int, default=256)
    quantize.add_argument("--skip", action="append", default=[], metavar="REGEX",
                          help="layers (full-match regex) left in float (repeatable)")
    quantize.add_argument("--skip-first", action="store_true", help="first layer in float")
    quantize.add_argument("--skip-last", action="store_true", help="last layer in float")
    quantize.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    quantize.add_argument("--onnx", help="write QDQ ONNX here")
    quantize.add_argument("--out", help="write the quantized checkpoint here (safetensors)")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.set_defaults(run=_quantize)

    distill = commands.add_parser(
        "distill",
        help="knowledge distillation: train a small student on a teacher's soft targets",
        description="Train --student on alpha x the teacher's soft targets at temperature T "
        "(KL scaled by T^2, or MSE on logits) plus (1 - alpha) x the labels. Models are penjing "
        "names or package.module:function (a function of no arguments returning the "
        "nn.Module, importable from the current directory) with safetensors weights. A "
        "teacher without --teacher-weights is trained first; several --teacher options "
        "distil from their ensemble. Weights that are zero in --student-weights stay zero.",
    )
    distill.add_argument("--teacher", action="append", required=True, metavar="MODEL",
                         help="penjing model name or package.module:function (repeatable)")
    distill.add_argument("--teacher-weights", action="append", default=[], metavar="FILE",
                         help="safetensors state_dict, one per --teacher in order")
    distill.add_argument("--student", required=True, metavar="MODEL",
                         help="penjing model name (e.g. mlp30, lenet5_thin) or "
                         "package.module:function")
    distill.add_argument("--student-weights", metavar="FILE",
                         help="start from these weights (e.g. a pruned model: it stays pruned)")
    distill.add_argument("--data", default="mnist",
                         help="mnist, digits or package.module:function returning a "
                         "penjing.data.DataSplit (default mnist)")
    distill.add_argument("--epochs", type=int, default=10, help="distillation epochs (10)")
    distill.add_argument("--teacher-epochs", type=int, default=10,
                         help="training epochs of a teacher given without weights (10)")
    distill.add_argument("-T", "--temperature", type=float, default=4.0,
                         help="softmax temperature T > 0 (4)")
    distill.add_argument("--alpha", type=float, default=0.9,
                         help="weight of the soft targets in [0, 1]; labels get 1 - alpha (0.9)")
    distill.add_argument("--soft", choices=["kl", "mse"], default="kl",
                         help="soft loss: T^2-scaled KL (Hinton) or MSE on logits (kl)")
    distill.add_argument("--hint", nargs=2, metavar=("TEACHER_LAYER", "STUDENT_LAYER"),
                         help="FitNets: train the student up to STUDENT_LAYER to predict "
                         "TEACHER_LAYER first (dotted module names)")
    distill.add_argument("--hint-epochs", type=int, default=2, help="epochs of hint training (2)")
    distill.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    distill.add_argument("--batch-size", type=int, default=64)
    distill.add_argument("--out", help="write the student here (safetensors)")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--quiet", action="store_true", help="no progress bars")
    distill.set_defaults(run=_distill)
    return parser


def _one_line(text: str, limit: int = 500) -> str:
    line = "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _os_message(err: OSError) -> str:
    """An OSError as 'what went wrong: which file', without '[Errno N]'."""
    if err.filename is not None:
        return f"{err.strerror or err}: {os.fsdecode(err.filename)!r}"
    return err.strerror if err.errno is not None and err.strerror else str(err)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path that cannot be written before the work, not after it."""
    from penjing.io import check_writable

    if args.command in ("prune", "quantize", "distill"):
        for option in ("out", "onnx"):
            value = getattr(args, option, None)
            if value:
                check_writable(value, f"--{option}")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds like Ctrl-C, so atomic writes remove their temp file


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"penjing {args.command}: error:"
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        _check_outputs(args)
        args.run(args)
    except KeyboardInterrupt:
        print(f"penjing {args.command}: interrupted; no partial output was written",
              file=sys.stderr)
        return 130
    except OSError as err:  # files: not found, a folder, not writable, disk full
        print(f"{prefix} {_one_line(_os_message(err))}", file=sys.stderr)
        return 2
    except (PenjingError, ValueError, TypeError) as err:
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # PyTorch's own errors: most often a model and input that differ
        print(
            f"{prefix} PyTorch refused the model: {_one_line(err, 300)}; "
            "check that the weights, --input-shape and --data match the model",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print(f"{prefix} out of memory; use a smaller model, batch or --calib-images",
              file=sys.stderr)
        return 2
    except Exception as err:  # anything else is a bug: still one line, traceback on request
        if os.environ.get("PENJING_TRACEBACK"):
            raise
        print(
            f"penjing {args.command}: internal error: {type(err).__name__}: {_one_line(err, 300)}"
            " (a bug in penjing; rerun with PENJING_TRACEBACK=1 and report the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
