"""`penjing encode`: Deep Compression storage of a model file as a checksummed .pjz."""

from __future__ import annotations

import argparse

from penjing.cli import common
from penjing.train import evaluate


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "encode", formatter_class=common.HelpFormatter,
        help="store a pruned / weight-shared model as a .pjz file: codebooks, and per "
        "tensor dense codes or relative-index sparse entries, each stream entropy-coded; "
        "checks it loads back",
        description="Read MODEL from --weights, bake masks and shared weights in, write the "
        ".pjz file --out and print what every tensor costs. A tensor with few distinct values "
        "is stored as a codebook plus codes, either one code per element (dense) or as the "
        "relative-index sparse format of Deep Compression (gaps between non-zeros and their "
        "codes), whichever is smaller; each stream is Huffman, rANS, enumerative or "
        "fixed-width coded, whichever is smallest (docs/format.md). Other tensors are stored "
        "raw. The file is loaded back into a fresh model (penjing.load) and its test "
        "accuracy measured against the input's.",
    )
    common.add_model(parser)
    common.add_weights(parser, required=True)
    parser.add_argument("--index-bits", type=int,
                        help="gap bits of the relative-index format for every tensor stored "
                        "sparse (default 8 for convs, 5 for the rest); a tensor stored dense "
                        "has no gaps")
    common.add_data(parser, allow_none=True)
    common.add_out(parser, "the .pjz file", required=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from penjing.codec import save
    from penjing.core.model_file import load

    if not str(args.out).endswith(".pjz"):
        raise ValueError(f"--out {args.out!r} must end in .pjz")
    split, _, test = common.load_data(args.data)
    model = common.load_model(args.model, args.weights, split.num_classes if split else None)
    report = save(model, args.out, index_bits=args.index_bits)
    print(report.format())
    loaded = load(args.out, common.factory(args.model, split.num_classes if split else None))
    if test is not None:
        print(f"test accuracy from {args.out}: "
              f"{common.accuracy(evaluate(model, test), evaluate(loaded, test))} against "
              f"{args.weights}")
