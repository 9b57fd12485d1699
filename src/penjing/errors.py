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


class PenjingWarning(UserWarning):
    """A call that did less than asked (a BatchNorm left unfolded, a group left whole),
    with the reason."""
