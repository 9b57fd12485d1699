"""Choosing layers, the same way everywhere: a filter `fn(module, name) -> bool`.

Every function that acts on some layers takes such a filter where it takes layer names
(`layers=` of magnitude_, kmeans_, nm_, pattern_; `ignored_layers=` of channels; the
`filter_fn` of a QuantConfig). These helpers build the common ones and combine them:

    pj.prune.magnitude_(model, 0.9, layers=pj.layers.types(nn.Linear))
    pj.prune.channels(model, x, ratio=0.5, ignored_layers=pj.layers.regex("head|fc3"))
    pj.quant.int8(filter_fn=pj.layers.regex("features\\..*") & ~pj.layers.names("features.0"))
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn


class Filter:
    """A layer filter `fn(module, name) -> bool` that combines with &, | and ~."""

    def __init__(self, fn: Callable[[nn.Module, str], bool], text: str) -> None:
        self.fn, self.text = fn, text

    def __call__(self, module: nn.Module, name: str) -> bool:
        return bool(self.fn(module, name))

    def __and__(self, other: Callable) -> Filter:
        return Filter(lambda m, n: self(m, n) and other(m, n), f"({self.text} & {other!r})")

    def __or__(self, other: Callable) -> Filter:
        return Filter(lambda m, n: self(m, n) or other(m, n), f"({self.text} | {other!r})")

    def __invert__(self) -> Filter:
        return Filter(lambda m, n: not self(m, n), f"~{self.text}")

    def __repr__(self) -> str:
        return self.text


def names(*wanted: str) -> Filter:
    """Layers with exactly these module names."""
    chosen = frozenset(wanted)
    return Filter(lambda _m, n: n in chosen, f"names{tuple(wanted)!r}")


def regex(*patterns: str) -> Filter:
    """Layers whose module name fully matches one of `patterns`."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"layer pattern {pattern!r} is not a regular expression ({err}); "
                             "give a Python regex matched in full against module names") from err
    return Filter(lambda _m, n: any(r.fullmatch(n) for r in compiled), f"regex{patterns!r}")


def types(*classes: type[nn.Module]) -> Filter:
    """Layers that are instances of `classes` (subclasses included)."""
    return Filter(lambda m, _n: isinstance(m, classes),
                  f"types({', '.join(c.__name__ for c in classes)})")


def matching(model: nn.Module, fn: Callable[[nn.Module, str], bool]) -> list[str]:
    """The names of `model`'s submodules (the model itself excluded) that `fn` accepts."""
    return [n for n, m in model.named_modules() if n and fn(m, n)]


def chosen_layers(layers: list[str] | None = None,
                  skip: list[str] | tuple[str, ...] = ()) -> list[str] | Filter | None:
    """One choice of layers from the two ways recipes and the command line say it: module
    names to act on (`layers`, default all) and regexes of names to leave alone (`skip`,
    the CLI's --skip). None when neither narrows anything."""
    if not skip:
        return None if layers is None else list(layers)
    keep = ~regex(*skip)
    return keep if layers is None else names(*layers) & keep


def check_skip(model: nn.Module, skip: list[str] | tuple[str, ...],
               what: str = "skip") -> list[str]:
    """The module names the `skip` regexes match; a pattern that matches no module is an
    error listing some names it could have matched (a typo would otherwise skip nothing)."""
    names_ = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in skip:
        try:
            hits = matching(model, regex(pattern))
        except ValueError as err:
            raise ValueError(f"{what} {pattern!r} is not a regular expression "
                             f"({err.__cause__})") from None
        if not hits:
            raise ValueError(f"{what} {pattern!r} matches no layer; layers include {names_[:8]}")
        found += [n for n in hits if n not in found]
    return found


def as_filter(model: nn.Module, layers: list[str] | Callable[[nn.Module, str], bool] | None
              ) -> Callable[[nn.Module, str], bool] | None:
    """`layers` (module names, a filter, or None for all) as a filter; a name that is not a
    module of `model` is an error naming some that are."""
    if layers is None or callable(layers):
        return layers
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of module names or a penjing.layers filter, "
                        f"got the string {layers!r}; write [{layers!r}]")
    known = [n for n, _ in model.named_modules() if n]
    missing = [n for n in layers if n not in set(known)]
    if missing:
        raise ValueError(f"no layer named {missing[0]!r} in {type(model).__name__}; layers "
                         f"include {known[:8]}")
    return names(*layers)
