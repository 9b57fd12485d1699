"""`penjing apply STEP`: run one registered step with its config given as flags.

Every step in `penjing.core.steps` that has a config and an apply function is a sub-verb
here, with one flag per field of its config (`scale_by` is `--scale-by`), checked by the
same `make_config` that checks a recipe stage, so an error reads the same from both. Steps
of one's own come from the modules named in the PENJING_PLUGINS environment variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from penjing.cli import common
from penjing.core import steps
from penjing.spec import PLUGINS_ENV, import_plugins


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(parser: argparse.ArgumentParser, config: type) -> None:
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        text = f.metadata.get("help", "")
        kind = hints.get(f.name)
        help_ = f"{text}{'; ' if text else ''}{getattr(kind, '__name__', kind)}, {default}"
        # values stay strings here: make_config converts and checks them, as for a recipe
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f"field_{f.name}", default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(_flag(f.name), dest=f"field_{f.name}", default=argparse.SUPPRESS,
                                metavar="VALUE", help=help_)


def _unknown(tokens: list[str]) -> dict[str, str]:
    """`--name value` pairs the verb has no flag for, as fields, so that the step's config
    names what is wrong in the words a recipe gets."""
    found, key = {}, None
    for token in tokens:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            found[key] = ""
        elif key is not None:
            found[key] = token
            key = None
        else:
            raise ValueError(f"unexpected argument {token!r}; give fields as --name value")
    return found


def add_parser(commands) -> None:
    import_plugins()
    parser = commands.add_parser(
        "apply", formatter_class=common.HelpFormatter,
        help="run one step of the step registry (a method of one's own included) on a model "
        "file, its config given as flags",
        description="Read MODEL from --weights, run STEP with the config its flags give, and "
        "write the model file --out, which records the step so that penjing.load rebuilds "
        "it. Steps of one's own come from the modules in PENJING_PLUGINS (comma-separated).",
    )
    runnable = steps.runnable()
    if not runnable:  # argparse would say "invalid choice (choose from )"
        parser.add_argument("step", metavar="STEP", help="a registered step with a config")
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(run=_none_registered)
        return
    verbs = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for op, step in runnable.items():
        sub = verbs.add_parser(op, help=step.help, formatter_class=common.HelpFormatter,
                               description=step.help)
        common.add_model(sub)
        common.add_weights(sub)
        common.add_data(sub, allow_none=True)
        common.add_out(sub, required=True)
        _add_fields(sub, step.config)
        sub.set_defaults(run=run, data="none", fields=[])


def _none_registered(args: argparse.Namespace) -> None:
    raise ValueError(f"no step named {args.step!r}: no registered step has a config; register "
                     "one with penjing.core.steps.register in a module named in "
                     f"{PLUGINS_ENV} (comma-separated)")


def run(args: argparse.Namespace) -> None:
    from penjing.train import evaluate

    values = {k.removeprefix("field_"): v for k, v in vars(args).items()
              if k.startswith("field_")}
    values |= _unknown(args.fields)
    config = steps.make_config(steps.get(args.step).config, values, args.step)
    split, _, test = common.load_data(args.data)
    model = common.load_model(args.model, args.weights, split.num_classes if split else None)
    before = evaluate(model, test) if test is not None else None
    model = steps.run(args.step, model, config)
    size = common.save_model(model, args.out, args.model)
    after = evaluate(model, test) if test is not None else None
    accuracy = f"; test accuracy {common.accuracy(before, after)}" if test is not None else ""
    print(f"{args.step}: {config}{accuracy}")
    print(f"model written to {args.out} ({size:,} bytes)")
