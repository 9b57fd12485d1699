"""The `penjing` command: one module per verb (penjing.cli.<verb>), each a thin layer that
parses its options (shared ones from penjing.cli.common) and calls the library; this module
turns every error into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from penjing.errors import PenjingError

EXIT_CODES = """exit codes:
  0    success
  1    internal error: a bug in penjing (set PENJING_TRACEBACK=1 to see where)
  2    bad input: an option, a missing or unreadable file, a file that is not what it
       should be (penjing.errors.FormatError), a model and weights or data that differ
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM). No half-written file is left.
Every error is one line on stderr naming the file or option and what to do."""


VERBS = ("train", "prune", "distill", "quantize", "encode", "export", "compress", "apply",
         "sensitivity", "demo", "inspect")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="penjing",
        description="Make trained PyTorch networks smaller and faster without losing "
        "accuracy. Every verb reads a model file (--weights) and writes one (--out), so "
        "train → prune → distill → quantize → encode → export chain; `penjing compress "
        "recipe.yaml` runs such a chain from one file.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"penjing.cli.{verb}").add_parser(commands)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "fields"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # `apply`: flags that name no field of the step's config, reported by it
        args.fields = extra
    code: int | str | None = 1
    try:
        code = _run(args)
    except SystemExit as exit_:  # SIGTERM (torchrun stopping the ranks after a failure)
        code = exit_.code
        raise
    finally:
        _leave_group(0 if code is None else code)
    return code


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


def _run(args: argparse.Namespace) -> int:
    prefix = f"penjing {args.command}: error:"
    in_main = threading.current_thread() is threading.main_thread()
    interrupted: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = {}
    if in_main:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                    signal.SIGINT: signal.signal(signal.SIGINT, interrupt)}
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
        print(f"penjing {args.command}: {_one_line(err) or 'interrupted'}; no partial output "
              "was written", file=sys.stderr)
        return 130
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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
