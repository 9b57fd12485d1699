"""Errors penjing raises on bad input; each message says the rule, what we got, how to fix it."""

from __future__ import annotations


class PenjingError(Exception):
    """Base class of every error penjing raises on purpose."""


class FormatError(PenjingError, ValueError):
    """A .pjz file is truncated, corrupt, of an unknown version, or not a .pjz at all."""


class UnsupportedLayerError(PenjingError, TypeError):
    """A layer type the requested method cannot handle."""


class MissingDependencyError(PenjingError, ImportError):
    """An optional package that a feature needs is not installed."""


class AccuracyGuardError(PenjingError, ValueError):
    """A compression cannot keep the metric within the drop it was given; the message
    says the best it found."""


class PenjingWarning(UserWarning):
    """A call that did less than asked (a BatchNorm left unfolded, a group left whole),
    with the reason."""


def renamed(module: str, names: dict[str, str]):
    """A module `__getattr__` that still answers to old names: each gives the object under
    its new name, with a DeprecationWarning saying what to write instead."""
    import sys
    import warnings

    def __getattr__(name: str):  # noqa: N807 - the module hook's own name
        if name in names:
            warnings.warn(f"{module}.{name} is now {module}.{names[name]}; the old name will "
                          "go in a later release", DeprecationWarning, stacklevel=2)
            return getattr(sys.modules[module], names[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
