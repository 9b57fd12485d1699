"""`penjing train`: train a model on a data set and write its model file."""

from __future__ import annotations

import argparse

from penjing.cli import common
from penjing.train import SCHEDULES, evaluate, fit, seed_everything


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train", formatter_class=common.HelpFormatter,
        help="train a model (from scratch or --weights) and write its model file",
        description="Train MODEL on --data with Adam and write it with --out, the file the "
        "other verbs read with --weights. Prints the test accuracy before and after.",
    )
    common.add_model(parser)
    common.add_weights(parser, what="the model to start from")
    common.add_data(parser)
    common.add_training(parser, 10, "training epochs")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="learning rate: constant, or cosine to 0")
    common.add_out(parser, "the trained model file", required=True)
    common.add_run(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    split, train, test = common.load_data(args.data, args.batch_size, args.seed)
    seed_everything(args.seed)
    model = common.load_model(args.model, args.weights, split.num_classes)
    before = evaluate(model, test)
    epochs = common.epochs(args.epochs)
    fit(model, train, epochs=epochs, lr=args.lr, schedule=args.schedule, seed=args.seed,
        progress=common.progress(args), desc=f"train {args.model}")
    size = common.save_model(model, args.out, args.model)
    print(f"{args.model} on {split.name}: {epochs} epoch{'s' * (epochs != 1)}, test accuracy "
          f"{before:.2%} before, {common.accuracy(before, evaluate(model, test))} after")
    print(f"model written to {args.out} ({size:,} bytes)")
