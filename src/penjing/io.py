"""File helpers shared by every writer and reader: penjing never leaves a half-written
file behind, and never parses more of a file's JSON than it can bound."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from pathlib import Path

import numpy as np

# A manifest or config is a few levels deep; Python's parser recurses per level and a
# file nested thousands deep would end in RecursionError instead of an error we name.
MAX_JSON_DEPTH = 16
# Every integer a file holds (shapes, counts, bits) fits in a signed 64-bit int; longer
# digit strings are refused before int() so no arithmetic ever runs on huge numbers.
MAX_JSON_INT = 2**63 - 1
_MAX_INT_DIGITS = len(str(MAX_JSON_INT))
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_TEMP = ".{name}.penjing-{pid}-{token}.tmp"
# mkstemp names of penjing versions before the pid was part of the name
_LEGACY_AGE_S = 3600


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is beyond ±{MAX_JSON_INT}")
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        raise ValueError(f"integer {value} is beyond ±{MAX_JSON_INT}")
    return value


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON `text`, without parsing it (linear)."""
    bare = _STRING.sub("", text)
    codes = np.frombuffer(bare.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    step = np.zeros(codes.size, dtype=np.int64)
    step[(codes == ord("[")) | (codes == ord("{"))] = 1
    step[(codes == ord("]")) | (codes == ord("}"))] = -1
    return int(np.cumsum(step).max()) if step.size else 0


def parse_json(text: str | bytes, what: str) -> object:
    """`json.loads` with the nesting depth and integer size bounded; anything else about
    the text (bad syntax, NaN, huge numbers) is a ValueError naming `what`."""
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{what} is not UTF-8 ({err})") from err
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a JSON string, got {type(text).__name__}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON ({err})") from err


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _process_started_after(pid: int, when: float) -> bool:
    """Whether process `pid` started after time `when` (a reused PID); False if unknown."""
    try:
        return os.stat(f"/proc/{pid}").st_ctime > when + 1
    except OSError:
        return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that interrupted writes left in the folder of `path` (their
    process is gone); returns what was removed. Another live writer's temp file is left
    alone. Every save and every load of a penjing file calls this, so a write killed
    halfway costs its disk space only until the folder is next used."""
    path = Path(path)
    ours = re.compile(r"^\..+\.penjing-(\d+)-[0-9a-f]+\.tmp$")
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp$")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        match = ours.match(p.name)
        try:
            mtime = p.lstat().st_mtime
            if match:
                pid = int(match.group(1))
                stale = pid != os.getpid() and (
                    not _pid_alive(pid) or _process_started_after(pid, mtime)
                )
            else:
                stale = bool(legacy.match(p.name)) and time.time() - mtime > _LEGACY_AGE_S
            if stale:
                p.unlink()
                removed.append(p)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, naming `path`, if a file cannot be written there later: the target is a
    folder, or its folder cannot be created or written. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{what} {str(path)!r} is a folder; give a file name inside it"
        )
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"{what} {str(path)!r}: {str(existing)!r} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"{what} {str(path)!r}: folder {str(existing)!r} is not writable; "
            "choose another place or fix its permissions"
        )
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename.

    The temp file is `.NAME.penjing-PID-RANDOM.tmp`; temp files of earlier writes to the
    same `path` whose process died are removed first. Errors name `path`, not the temp.
    """
    path = Path(path)
    check_writable(path, "cannot write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / _TEMP.format(name=path.name, pid=os.getpid(), token=secrets.token_hex(4))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason = f"no space left on the device ({len(data):,} bytes to write)"
        raise type(err)(err.errno, f"cannot write {str(path)!r}: {reason}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
