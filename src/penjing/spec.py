"""User code named on the command line: `package.module:attribute`, imported from the
current directory or the Python path."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def import_object(spec: str, what: str) -> Any:
    """The object `spec` = 'package.module:attribute' names; `what` is used in errors.

    The current directory is searched first, as `python -m` would, because the installed
    `penjing` script does not put it on the path itself.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must be 'package.module:function'")
    module = import_module(module_name, f"{what} {spec!r}")
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {spec!r})")
    return getattr(module, attr)


def import_module(name: str, what: str) -> Any:
    """The module `name`, searched in the current directory first (see import_object)."""
    try:
        with on_path(Path.cwd()):
            return importlib.import_module(name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {name!r} for {what} ({err}); it must be importable from "
            "the current directory or the Python path"
        ) from err


PLUGINS_ENV = "PENJING_PLUGINS"  # comma-separated modules the `penjing` command imports first


def import_plugins(names: list[str] | str | None = None) -> list[str]:
    """Import modules that register steps of their own (`penjing.core.steps.register`):
    `names`, or those in the PENJING_PLUGINS environment variable; returns their names."""
    if names is None:
        names = os.environ.get(PLUGINS_ENV, "")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        import_module(name, "plugin")
    return list(names)


@contextmanager
def on_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path for the block: a recipe's 'module:function' may live
    beside the recipe file."""
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)
