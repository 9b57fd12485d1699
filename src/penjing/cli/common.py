"""What every `penjing` verb shares: option names and defaults, models, data, model files.

Each option means the same thing in every verb that has it:
    MODEL            a penjing model name or package.module:function (no arguments)
    --weights FILE   any model file penjing.load reads (what another verb wrote with --out)
    --data SPEC      mnist, digits or package.module:function returning a DataSplit
    --out FILE       the model file (or .pjz / .onnx) this verb writes
    --out-dir DIR    the folder a multi-file verb (demo, compress) writes into
    --epochs N       the epochs of this verb's own training; --lr, --batch-size with it
    --skip REGEX     layers left alone (full match of module names, repeatable)
    --seed, --quiet  the random seed; no progress bars (none either when stderr is
                     not a terminal)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from penjing import data, layers, models


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once and keeps the description's line breaks: no
    "(default: None)" for an option that is off unless given, and none added to a help
    text that states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == []
        if off or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


EPOCHS_ENV = "PENJING_EPOCHS"  # caps every --epochs (CI runs the README with 1)


def epochs(n: int, flag: str = "--epochs") -> int:
    """`n`, capped by the PENJING_EPOCHS environment variable when it is set; a cap that
    lowers `n` says so on stderr, naming `flag`."""
    cap = os.environ.get(EPOCHS_ENV)
    if not cap:
        return n
    try:
        limit = int(cap)
    except ValueError as err:
        raise ValueError(f"{EPOCHS_ENV} must be an int, got {cap!r}") from err
    if n > limit:
        print(f"note: {EPOCHS_ENV}={limit} lowers {flag} {n} to {limit}", file=sys.stderr)
    return min(n, limit)


def shape(text: str) -> tuple[int, ...]:
    """--input-shape: comma-separated positive ints."""
    try:
        parsed = tuple(int(v) for v in text.split(","))
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 32,3,224,224, got {text!r}"
        )
    return parsed


def add_model(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(name, help="penjing model name (" + ", ".join(sorted(models.MODELS))
                        + ") or package.module:function returning an nn.Module")


def add_weights(parser: argparse.ArgumentParser, required: bool = False,
                flag: str = "--weights", what: str = "the model") -> None:
    parser.add_argument(flag, required=required, metavar="FILE",
                        help=f"weights of {what}: a file any penjing verb wrote with --out "
                        "(pruned, quantized, .pjz ...), or a safetensors / .pt state dict")


def add_data(parser: argparse.ArgumentParser, allow_none: bool = False) -> None:
    choices = "mnist, digits, fashion-mnist" + (", none" if allow_none else "")
    parser.add_argument("--data", default="mnist",
                        help=f"{choices} or package.module:function returning a "
                        "penjing.data.DataSplit")


def add_out(parser: argparse.ArgumentParser, what: str = "the model file (safetensors)",
            required: bool = False) -> None:
    parser.add_argument("--out", metavar="FILE", required=required, help=f"write {what} here")


def add_training(parser: argparse.ArgumentParser, epochs: int, what: str,
                 lr: float = 1e-3) -> None:
    parser.add_argument("--epochs", type=int, default=epochs, help=what)
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="training images per optimizer step")


def add_skip(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--skip", action="append", default=[], metavar="REGEX",
                        help=f"layers {what} (full match of the module name, repeatable)")


def add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data order, initial weights and random choices; the "
                        "same seed repeats a run")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are none when stderr is not a terminal)")


def progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: not with --quiet, and not into a log or a pipe, where
    a bar's carriage-return redraws would each become a line."""
    return not args.quiet and sys.stderr.isatty()


def load_data(spec: str | None, batch_size: int = 64, seed: int = 0):
    """(split, train loader, test loader), or three Nones for 'none'."""
    if spec is None or spec == "none":
        return None, None, None
    split = data.load(spec)
    train, test = data.loaders(split, batch_size=batch_size, seed=seed)
    return split, train, test


def factory(spec: str, num_classes: int | None, role: str = "model") -> Callable[[], nn.Module]:
    """A function building a fresh `spec` model; the spec is checked at once."""
    models.build(spec, num_classes, role=role)
    return lambda: models.build(spec, num_classes, role=role)


def load_model(spec: str, weights: str | os.PathLike | None, num_classes: int | None,
               role: str = "model") -> nn.Module:
    """A fresh `spec` model, rebuilt from the model file `weights` when given."""
    from penjing.core.model_file import load

    build = factory(spec, num_classes, role)
    return load(weights, build) if weights is not None else build().eval()


def save_model(model: nn.Module, path: str | os.PathLike, spec: str) -> int:
    """Write `model` as a penjing model file naming its architecture; the bytes written."""
    from penjing.core.model_file import save

    return save(model, path, metadata={"model": spec})


def skipped(model: nn.Module, patterns: list[str]) -> list[str]:
    """The module names that the --skip regexes match; a pattern that matches none is an
    error listing some names it could have matched."""
    return layers.check_skip(model, patterns, "--skip")


def example_input(split, input_shape: tuple[int, ...] | None, batch: int) -> torch.Tensor:
    """Random inputs of `input_shape`, or a batch of the data set's image shape."""
    if input_shape is None and split is None:
        raise ValueError("without --data give --input-shape, e.g. 32,3,224,224")
    return torch.randn(*(input_shape or (batch, *split.image_shape)))


WIDE_SPREAD = 0.25  # interquartile range over median beyond which a latency says little


def spread(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range over the median) of repeated timings."""
    from penjing.core.counting import spread as timing_spread

    return timing_spread(times)


def spread_warning(spread: float) -> str | None:
    """The line that says a latency is too noisy to compare, or None."""
    if spread <= WIDE_SPREAD:
        return None
    return (f"warning: the latency timings spread by {spread:.0%} of their median "
            "(interquartile range), too wide to compare: the machine is busy or a pass is too "
            "short to time; rerun, or time a larger batch")


def accuracy(before: float | None, after: float | None) -> str:
    """'98.10% (-0.40 points)'; '' when either is missing."""
    if before is None or after is None:
        return ""
    return f"{after:.2%} ({100 * (after - before):+.2f} points)"
