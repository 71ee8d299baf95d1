"""Every path a box names is checked before anything is written for it: one mechanism, not a list of cases.

    python -c "from ablate.remote.confine import problem; print(problem('stage1_baseline_eval/../../etc/passwd'))"

A box names files as relative, ``/``-separated paths. Each component must be a
plain name: not empty (``a//b``, a leading or trailing ``/``), not ``.`` or
``..``, not hidden (dot names are this tool's own temporary and state files),
valid UTF-8, free of control, format and separator characters, of a sane
length. The local target is then built one component at a time under the
resolved local runs folder: an existing component that is a symlink is refused,
never followed, and the final path must still resolve inside that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ablate.errors import BadInput

MAX_COMPONENT_BYTES = 255  # what ext4, xfs and APFS allow for one name
MAX_PATH_BYTES = 1024
MAX_DEPTH = 16
MAX_JSON = 64 << 20  # a .json file larger than this is no record ablate writes
# Unicode categories a name never needs: controls (C0, DEL, C1), format (bidi overrides, zero width),
# surrogates (a non-UTF-8 byte decoded with surrogateescape), private use, unassigned, line/paragraph separators.
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
UID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Entry:
    """One file as the box listed it."""
    size: int
    mtime: float
    rel: str  # relative to the box's runs folder, checked by ``problem``

    @property
    def mark(self) -> list:
        return [self.size, self.mtime]


class Refused(Exception):
    """A path from a box that is not written: the message says why."""


def component_problem(name: str) -> str | None:
    """Why one path component cannot name a local file, or None."""
    if name == "":
        return "empty path component (// or a leading or trailing /)"
    if name in (".", ".."):
        return f"{name!r} path component"
    if "\ufffd" in name:
        return "name is not valid UTF-8"  # how the SSH channel decodes bytes that are not UTF-8
    for ch in name:
        category = unicodedata.category(ch)
        if category in _BAD_CATEGORIES:
            what = "non-UTF-8 byte" if category == "Cs" else f"character U+{ord(ch):04X} ({category})"
            return f"name holds a {what}"
    if name.startswith("."):
        return "hidden name (dot names are ablate's own temporary and state files)"
    if len(name.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"name longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def problem(rel: str) -> str | None:
    """Why a path a box named cannot be written under the local runs folder, or None when it may."""
    if not isinstance(rel, str) or rel == "":
        return "empty path"
    if rel.startswith("/"):
        return "absolute path"
    parts = rel.split("/")
    if len(parts) > MAX_DEPTH:
        return f"deeper than {MAX_DEPTH} folders"
    for part in parts:
        why = component_problem(part)
        if why:
            return why
    if len(rel.encode("utf-8")) > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes"
    return None


def uid_problem(uid) -> str | None:
    if not isinstance(uid, str) or not UID.match(uid):
        return f"run.json uid {uid!r:.80} is not a short word (letters, digits, '-', '_')"
    return None


def _is_symlink(path: Path) -> bool | None:
    """True for a symlink, False for anything else that exists, None when nothing is there."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def local_path(root: Path, rel: str) -> Path:
    """``root/rel`` after every check; raises Refused. ``root`` is the resolved local runs folder (or a folder in it)."""
    why = problem(rel)
    if why:
        raise Refused(why)
    path = Path(root)
    for part in rel.split("/"):
        path = path / part
        if _is_symlink(path):
            raise Refused(f"local {path} is a symlink (never followed)")
    if not _inside(root, path):
        raise Refused(f"resolves outside {root}")
    return path


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep)


def make_parents(root: Path, path: Path) -> None:
    """Create the folders between ``root`` and ``path`` one at a time, never through a symlink."""
    current = Path(root)
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            pass
        if _is_symlink(current) or not current.is_dir():
            raise Refused(f"local {current} is a symlink or not a folder")
    if not _inside(root, path):
        raise Refused(f"resolves outside {root}")


def same_content(a: Path, b: Path, tally) -> bool:
    """Whether two local files hold the same bytes (read only when their sizes agree; counted in ``tally``)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    if sa.st_size != sb.st_size or stat.S_ISLNK(sb.st_mode):
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    digests = []
    for path in (a, b):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
                tally.bytes_read_locally += len(block)
        digests.append(digest.digest())
    return digests[0] == digests[1]


def install(root: Path, src: Path, dest: Path, tally) -> bool:
    """Move a staged file to ``dest`` (checked by ``local_path``) atomically; False when it already holds those bytes."""
    if same_content(src, dest, tally):
        return False
    make_parents(root, dest)
    if os.stat(src).st_nlink > 1:  # staged as a link to another local run's file: the target gets its own copy
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(src, tmp)
        src = tmp
    os.replace(src, dest)  # replaces a symlink at dest itself, never what it points to
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def parse_listing(out: str, refused: dict) -> tuple[str | None, float | None, list[Entry]]:
    """(hostname, clock, entries) from the box's NUL-separated listing; every bad entry goes to ``refused``."""
    records = out.split("\0")
    if len(records) < 3:
        raise BadInput("the box's listing of its runs folder is malformed (no hostname and clock)")
    host, now, tail = records[0].strip(), records[1].strip(), records.pop()
    if tail:
        refused[repr(tail)] = "listing entry cut short"
    entries, seen = [], set()
    for record in records[2:]:
        m = re.fullmatch(r"(\d{1,19}) (\d{1,12}(?:\.\d{1,12})?) (.*)", record, re.S)
        rel = m.group(3) if m else record
        why = ("malformed listing entry" if not m else problem(rel)) or ("listed twice" if rel in seen else None)
        if why:
            refused[repr(rel)] = why
            continue
        seen.add(rel)
        entries.append(Entry(int(m.group(1)), float(m.group(2)), rel))
    return (host if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", host) else None,
            float(now) if re.fullmatch(r"\d{1,12}", now) else None, entries)


def valid(rel: str, path: Path) -> bool:
    """JSON and JSONL files parse whole (a JSONL one ends with a newline); read as a stream."""
    try:
        if rel.endswith(".json"):
            return path.stat().st_size <= MAX_JSON and json.loads(path.read_bytes()) is not Ellipsis
        if rel.endswith(".jsonl"):
            last = b"\n"
            with open(path, "rb") as fh:
                for last in fh:
                    if last.strip():
                        json.loads(last)
            return last.endswith(b"\n")  # else a line is still being appended
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return True
