"""`penjing inspect`: what a .pjz or penjing model file holds."""

from __future__ import annotations

import argparse
import json
import os

from penjing.cli import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", formatter_class=common.HelpFormatter,
        help="per-tensor storage table of a .pjz file, or the history of a model file",
        description="For a .pjz file: every tensor's encoding, bits and bytes. For a model "
        "file (--out of any verb): the architecture it names, what was done to it, and its "
        "tensors' bytes.",
    )
    parser.add_argument("path")
    parser.set_defaults(run=run)


def _step(step: dict) -> str:
    op = step.get("op")
    if op == "channels":
        return f"channels removed: {len(step.get('changes', []))} tensors sliced"
    if op == "heads":
        kept = step.get("layers", {})
        return "attention heads kept: " + ", ".join(f"{k} {len(v)}" for k, v in kept.items())
    if op == "compact":
        return "convs compacted: " + ", ".join(f"{k} ({v[0]})" for k, v in
                                               step.get("layers", {}).items())
    if op == "parametrize":
        kinds = {kind for per in step.get("layers", {}).values() for ks in per.values()
                 for kind in ks}
        return f"live {' and '.join(sorted(kinds))} on {len(step.get('layers', {}))} layers"
    if op == "quantize":
        config = step.get("config", {})
        weight, act = config.get("weight") or {}, config.get("activation")
        return (f"quantized: weights {weight.get('bits')} bits "
                f"({(weight.get('granularity') or {}).get('kind')}), activations "
                + (f"{act.get('bits')} bits" if act else "float"))
    return str(op)


def _magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def run(args: argparse.Namespace) -> None:
    if str(args.path).endswith(".pjz") or _magic(args.path) == b"PJZ\x00":
        from penjing.codec import inspect

        print(inspect(args.path).format())
        return
    from penjing.core.checkpoint import read_checkpoint

    tensors, metadata = read_checkpoint(args.path, "model file", "penjing.save")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.path}: {metadata.get('format', 'safetensors state dict')}, "
          f"model {metadata.get('penjing.model', '(not recorded)')}, {len(tensors)} tensors, "
          f"{os.path.getsize(args.path):,} bytes on disk ({size:,} of tensor data)")
    try:
        steps = json.loads(metadata.get("penjing.history", "[]"))
    except ValueError:
        steps = []
    for i, step in enumerate(steps if isinstance(steps, list) else [], 1):
        print(f"  {i}. {_step(step) if isinstance(step, dict) else step}")
