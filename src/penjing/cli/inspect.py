"""`penjing inspect`: what a .pjz or penjing model file holds."""

from __future__ import annotations

import argparse
import os

from penjing.cli import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", formatter_class=common.HelpFormatter,
        help="per-tensor storage table of a .pjz file, or the history of a model file",
        description="For a .pjz file: every tensor's encoding, bits and bytes, after checking "
        "every section's checksum. For a model file (--out of any verb): the architecture it "
        "names, what was done to it, and its tensors' bytes, after checking its SHA-256 and "
        "its history as penjing.load does. A damaged file exits 2.",
    )
    parser.add_argument("path")
    parser.set_defaults(run=run)


def _step(step: dict) -> str:
    """One line for a record that `history.read` has checked (its shape is known)."""
    op = step["op"]
    if op == "channels":
        return f"channels removed: {len(step['changes'])} tensors sliced"
    if op in ("heads", "hf_heads"):
        kept = step["layers"]
        return "attention heads kept: " + ", ".join(f"{k} {len(v)}" for k, v in kept.items())
    if op == "hf_ffn":
        return "FFN neurons kept: " + ", ".join(f"{k} {len(v)}" for k, v in
                                                step["layers"].items())
    if op == "compact":
        return "convs compacted: " + ", ".join(f"{k} ({v[0]})" for k, v in
                                               step["layers"].items())
    if op == "smooth":
        return f"activations smoothed into {len(step['layers'])} layers"
    if op == "parametrize":
        kinds = {kind for per in step["layers"].values() for ks in per.values() for kind in ks}
        return f"live {' and '.join(sorted(kinds))} on {len(step['layers'])} layers"
    if op == "quantize":
        weight, act = step["config"]["weight"], step["config"]["activation"]
        return (("quantized: weights " + (f"{weight['bits']} bits ("
                 f"{weight['granularity']['kind']})" if weight else "float"))
                + ", activations " + (f"{act['bits']} bits" if act else "float"))
    if op == "distill":
        return (f"distilled from {', '.join(step['teachers'])}: {step['epochs']} epochs, "
                f"T {step['temperature']:g}, alpha {step['alpha']:g}, {step['soft']} loss")
    return str(op)


def _magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def run(args: argparse.Namespace) -> None:
    if str(args.path).endswith(".pjz") or _magic(args.path) == b"PJZ\x00":
        from penjing.codec import inspect

        print(inspect(args.path).format())
        return
    from penjing.core import history
    from penjing.core.checkpoint import read_checkpoint
    from penjing.errors import FormatError

    tensors, metadata = read_checkpoint(args.path, "model file", "penjing.save")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.path}: {metadata.get('format', 'safetensors state dict')}, "
          f"model {metadata.get('penjing.model', '(not recorded)')}, {len(tensors)} tensors, "
          f"{os.path.getsize(args.path):,} bytes on disk ({size:,} of tensor data)")
    try:  # the check penjing.load makes, so both refuse the same files
        steps = history.read(metadata.get("penjing.history", "[]"))
    except ValueError as err:
        raise FormatError(f"{args.path!r}: its history cannot be read ({err}); write the "
                          "file with penjing.save") from err
    for i, step in enumerate(steps, 1):
        print(f"  {i}. {_step(step)}")
