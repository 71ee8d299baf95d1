"""Files written whole or not at all: every JSON, JSONL and text file a run or a sync stores.

    python -c "from ablate.results.files import write_json; write_json('/tmp/x.json', {'a': 1})"
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ablate.errors import BadInput


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def check_target(path: Path) -> None:
    """A file is written where it says: never onto a symlink (which the rename would replace, or a reader follow
    out of its folder) or a folder, device or pipe."""
    path = Path(path)
    if path.is_symlink():
        raise BadInput(f"{path} is a symlink; not writing through it (remove it, or name the file it points to)")
    if path.exists() and not path.is_file():
        raise BadInput(f"{path} exists and is not a regular file; not replacing it")


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: temporary file in the same folder, fsync, rename. Readers never see half a file."""
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a run records")


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """``(object, None)``, ``(None, None)`` when absent, ``(None, why)`` when unreadable."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_bytes(), parse_constant=_no_constant)  # NaN and Infinity are damage, not numbers
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(data, dict):
        return None, f"{path}: not a JSON object"
    return data, None
