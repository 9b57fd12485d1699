"""User code named on the command line: `package.module:attribute`, imported from the
current directory or the Python path."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def import_object(spec: str, what: str) -> Any:
    """The object `spec` = 'package.module:attribute' names; `what` is used in errors.

    The current directory is searched first, as `python -m` would, because the installed
    `penjing` script does not put it on the path itself.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must be 'package.module:function'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for {what} {spec!r} ({err}); it must be "
            "importable from the current directory or the Python path"
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {spec!r})")
    return getattr(module, attr)
