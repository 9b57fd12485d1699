"""The `penjing` command: one module per verb (penjing.cli.<verb>), each a thin layer that
parses its options (shared ones from penjing.cli.common) and calls the library; this module
turns every error into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Collection

from penjing.errors import PenjingError

EXIT_CODES = """exit codes:
  0    success
  1    internal error: a bug in penjing (set PENJING_TRACEBACK=1 to see where)
  2    bad input: an option, a missing or unreadable file, a file that is not what it
       should be (penjing.errors.FormatError), a model and weights or data that differ
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM). No half-written file is left.
Every error is one line on stderr naming the file or option and what to do."""


# each verb's one-line summary, listed by `penjing -h` without importing the verb's module
# (and with it PyTorch); tests/test_cli_help.py checks that each module says the same
SUMMARIES = {
    "train": "train a model (from scratch or --weights) and write its model file",
    "prune": "structured pruning: remove channels for real, or N:M / shape / stripe / block "
             "masks; params, MACs, latency and accuracy before and after",
    "distill": "knowledge distillation: train a small student on a teacher's soft targets",
    "quantize": "linear quantization (PTQ, or QAT with --epochs) to INT8 / INT4: per-layer "
                "scales and SQNR, accuracy, QDQ ONNX and an integer model file",
    "encode": "store a pruned / weight-shared model as a .pjz file: codebooks, and per tensor "
              "dense codes or relative-index sparse entries, each stream entropy-coded; checks "
              "it loads back",
    "export": "export a model file to ONNX for ONNX Runtime (QDQ when it is quantized) and "
              "check ONNX Runtime against PyTorch",
    "compress": "run a YAML recipe of stages on one model, or reach a --target size under "
                "--max-drop",
    "apply": "run one step of the step registry (a method of one's own included) on a model "
             "file, its config given as flags",
    "sensitivity": "prune (or quantize) one layer at a time and tabulate the test accuracy; "
                   "CSV, chart, and a per-layer plan for a budget",
    "demo": "Deep Compression of a LeNet on the bundled MNIST subset, end to end",
    "inspect": "per-tensor storage table of a .pjz file, or the history of a model file",
}
VERBS = tuple(SUMMARIES)


def build_parser(verbs: Collection[str] = VERBS) -> argparse.ArgumentParser:
    """The `penjing` parser with the options of `verbs` (importing their modules, and
    PyTorch with them); the other verbs are listed by their summaries only, so that
    `penjing -h` and `penjing --version` answer at once."""
    import importlib

    from penjing import __version__

    parser = argparse.ArgumentParser(
        prog="penjing",
        description="Make trained PyTorch networks smaller and faster without losing "
        "accuracy. Every verb reads a model file (--weights) and writes one (--out), so "
        "train → prune → distill → quantize → encode → export chain; `penjing compress "
        "recipe.yaml` runs such a chain from one file.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in VERBS:
        if name in verbs:
            importlib.import_module(f"penjing.cli.{name}").add_parser(commands)
        else:
            commands.add_parser(name, help=SUMMARIES[name])
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

    if args.command != "compress":
        for option in ("out", "onnx"):
            value = getattr(args, option, None)
            if value:
                check_writable(value, f"--{option}")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds like Ctrl-C, so atomic writes remove their temp file


def _interrupt_once(interrupted: list[int]):
    """A SIGINT handler that raises KeyboardInterrupt the first time and only notes the
    signals after it, so that a second Ctrl-C cannot break the cleanup the first started
    (removing a temp file, leaving a process group) into a traceback."""

    def interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        if len(interrupted) == 1:
            raise KeyboardInterrupt

    return interrupt


def main(argv: list[str] | None = None) -> int:
    """Run `penjing ARGV` (sys.argv when None) and return its exit code. Ctrl-C is one line
    and 130 at any moment after this starts: while PyTorch imports, during the work and
    during the cleanup after it."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((arg for arg in argv if not arg.startswith("-")), None)
    verb = verb if verb in VERBS else None
    interrupted: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                    signal.SIGINT: signal.signal(signal.SIGINT, _interrupt_once(interrupted))}
    code: int | str | None = 1
    try:
        parser = build_parser((verb,) if verb else ())
        args, extra = parser.parse_known_args(argv)
        if extra and not hasattr(args, "fields"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:  # `apply`: flags that name no field of the step's config, reported by it
            args.fields = extra
        code = _run(args, interrupted)
    except KeyboardInterrupt as err:
        code = _interrupted(verb, err)
    except SystemExit as exit_:  # SIGTERM (torchrun stopping the ranks after a failure), -h
        code = exit_.code
        raise
    finally:
        try:
            _leave_group(0 if code is None else code)
        except KeyboardInterrupt as err:  # the first Ctrl-C came while leaving the group
            code = _interrupted(verb, err)
        if not (as_program and interrupted):  # a program that was interrupted stays deaf
            for signum, handler in previous.items():  # to Ctrl-C until it has exited
                signal.signal(signum, handler)
    return code


def _interrupted(verb: str | None, err: KeyboardInterrupt) -> int:
    name = f"penjing {verb}" if verb else "penjing"
    print(f"{name}: {_one_line(err) or 'interrupted'}; no partial output was written",
          file=sys.stderr)
    return 130


def _leave_group(code: int | str) -> None:
    """Under torchrun, leave the process group now, once: after a verb that succeeded every
    rank waits for the others first; after an error or Ctrl-C none waits for peers that
    may never come."""
    if "penjing.distributed" in sys.modules:  # else no verb could have joined a group
        from penjing import distributed

        try:
            distributed.shutdown(wait=code == 0)
        except KeyboardInterrupt:
            distributed.shutdown(wait=False)


def _run(args: argparse.Namespace, interrupted: list[int]) -> int:
    prefix = f"penjing {args.command}: error:"
    try:
        try:
            _check_outputs(args)
            args.run(args)
        except Exception:
            # Ctrl-C under torchrun reaches every rank at once: a rank whose peer left
            # first sees that peer's connection close (a RuntimeError), not the signal
            if interrupted:
                raise KeyboardInterrupt from None
            raise
    except KeyboardInterrupt as err:
        return _interrupted(args.command, err)
    except OSError as err:  # files: not found, a folder, not writable, disk full
        print(f"{prefix} {_one_line(_os_message(err))}", file=sys.stderr)
        return 2
    except (PenjingError, ValueError, TypeError) as err:
        if getattr(err, "lines", False):  # a list of problems (a recipe): one per line
            for line in str(err).strip().splitlines():
                print(f"{prefix} {line.strip()}", file=sys.stderr)
        else:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
