"""Bring a box's run results home, never storing a file half-written and never over another run's files.

    ablate remote sync --host ssh4.vast.ai --port 31234

Small files of every run directory (identity, process record, metrics,
summaries, configs, env, samples, logs, status) are pulled into local
``runs/``; checkpoints only with ``--with-checkpoints``. Each file is downloaded
to a temporary file, checked (unchanged on the box while it was read; JSON and
JSONL parse), fsynced and renamed into place. A file whose remote hash equals
the local one is skipped.

A run is known by the ``uid`` in its ``run.json``, not by its folder name: two
boxes (or a box and this machine) can start a run in the same second. A box's
run goes into the local folder holding its uid, else into the folder of the
same name when that is free, else under a new name (``<name>-<host>``,
``<name>-<host>-2``, ...) reported in ``SyncResult.relocated``. ``run.json`` is
stored first, so a half-synced run is still recognised on the next sync.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ablate.errors import BadInput
from ablate.remote.ssh import Connection
from ablate.results.files import read_json, write_bytes
from ablate.results.rundir import LOCK_FILE, RUN_FILE, RUN_NAME, RUNNING, read_status

SMALL = (RUN_FILE, "process.json", "metrics.json", "summary.json", "config.json", "env.json", "status.txt",
         "train_log.jsonl", "*.log", "samples_*.jsonl", "checkpoint_meta.json")
HEAVY_DIRS = ("checkpoints", "final")
NO_RUNS = 66  # the listing's exit code when the runs folder is missing


@dataclass
class SyncResult:
    copied: list[str] = field(default_factory=list)  # local paths, relative to the local runs folder
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why (e.g. still being written)
    relocated: dict[str, str] = field(default_factory=dict)  # box's run folder -> the local one it went to


@dataclass(frozen=True)
class Entry:
    size: int
    mtime: float
    digest: str
    rel: str  # relative to the box's runs folder


def _listing_command(runs: str, with_checkpoints: bool) -> str:
    names = " -o ".join(f"-name {shlex.quote(p)}" for p in SMALL)
    prune = "" if with_checkpoints else " ".join(f"-not -path {shlex.quote(f'*/{d}/*')}" for d in HEAVY_DIRS)
    select = "" if with_checkpoints else f"\\( {names} \\)"
    # size, mtime and sha256 of every file, relative to runs/; temporary files are never listed
    return (f"cd {shlex.quote(runs)} 2>/dev/null || exit {NO_RUNS}; find . -type f {select} {prune} -not -name '.*' "
            "-printf '%s %T@ %P\\n' | while read -r size mtime path; do "
            "printf '%s %s %s %s\\n' \"$size\" \"$mtime\" \"$(sha256sum \"$path\" | cut -d' ' -f1)\" \"$path\"; done")


def _valid(path: str, data: bytes) -> bool:
    try:
        if path.endswith(".json"):
            json.loads(data)
        elif path.endswith(".jsonl"):
            if data and not data.endswith(b"\n"):
                return False  # a line still being appended
            for line in data.splitlines():
                if line.strip():
                    json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _held(run_dir: Path) -> bool:
    """Whether a local process holds the run's write lock now (a live local run)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False  # closing the descriptor below releases it at once
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def _names(name: str, host: str):
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", host).strip("._-") or "box"
    yield name
    yield f"{name}-{tag}"
    for n in itertools.count(2):
        yield f"{name}-{tag}-{n}"


def _rewritten_while_running(rel: str) -> bool:
    return rel in ("status.txt", "process.json", "train_log.jsonl") or rel.endswith(".log")


def _fits(path: Path, files: dict[str, Entry]) -> bool:
    """Whether a box run's files may go into the existing local folder ``path`` (checked when uids cannot tell)."""
    if not path.is_dir() or _held(path) or (path / RUN_FILE).exists():
        return False  # a run with a uid is found by its uid, so one here is another run
    # A copy synced while the run lived (by an older ablate) lags behind in what a live run rewrites.
    lagging = read_status(path)[0] == RUNNING
    return all((lagging and _rewritten_while_running(rel)) or _sha(path / rel) in (None, e.digest)
               for rel, e in files.items())


def _local_uids(stage_dir: Path) -> list[tuple[Path, str, str]]:
    """(folder, uid, sha256 of run.json) of every local run of a stage that has a uid."""
    found = []
    for path in sorted(stage_dir.iterdir()) if stage_dir.is_dir() else ():
        info, _ = read_json(path / RUN_FILE) if RUN_NAME.match(path.name) else (None, None)
        if info and info.get("uid"):
            found.append((path, info["uid"], _sha(path / RUN_FILE)))
    return found


def _place(stage_dir: Path, name: str, uid: str | None, files: dict[str, Entry], host: str,
           known: list[tuple[Path, str, str]]) -> Path:
    """The local folder for a box's run: its uid's, else the first free or matching name."""
    for path, local_uid, _ in known:
        if uid and local_uid == uid and not _held(path):
            return path
    for candidate in _names(name, host):
        path = stage_dir / candidate
        if not path.exists() or _fits(path, files):
            return path


def _pull(sftp, remote_root: str, e: Entry, result: SyncResult) -> bytes | None:
    """The file's bytes if they are whole and still what was listed; else None with the reason in ``skipped``."""
    remote = f"{remote_root}/{e.rel}"
    try:
        with sftp.open(remote, "rb") as fh:
            data = fh.read()
        after = sftp.stat(remote)
    except FileNotFoundError:
        result.skipped[e.rel] = "removed since it was listed"
        return None
    if after.st_size != e.size or int(after.st_mtime) != int(e.mtime) or hashlib.sha256(data).hexdigest() != e.digest:
        result.skipped[e.rel] = "changed since it was listed (still being written)"
        return None
    if not _valid(e.rel, data):
        result.skipped[e.rel] = "not valid JSON yet (still being written)"
        return None
    return data


def _store(sftp, remote_root: str, e: Entry, local_runs: Path, rel: str, result: SyncResult,
           data: bytes | None = None) -> None:
    local = local_runs / rel
    if _sha(local) == e.digest:
        result.unchanged.append(rel)
        return
    data = data if data is not None else _pull(sftp, remote_root, e, result)
    if data is not None:
        write_bytes(local, data)
        result.copied.append(rel)


def sync(conn: Connection, local_runs: Path, remote_runs: str = "runs", with_checkpoints: bool = False) -> SyncResult:
    box = conn.box
    local_runs = Path(local_runs)
    remote_root = box.path(remote_runs)
    result = SyncResult()
    code, out, _ = conn.run(_listing_command(remote_root, with_checkpoints), timeout=max(box.timeout, 120))
    if code == NO_RUNS:
        raise BadInput(f"{box.host}:{box.port} has no runs folder {remote_root} (check --workdir and --remote-runs)")
    loose: list[Entry] = []
    runs: dict[tuple[str, str], dict[str, Entry]] = {}
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) != 4:
            continue
        e = Entry(int(parts[0]), float(parts[1]), parts[2], parts[3])
        where = e.rel.split("/", 2)  # stage, run folder, path inside the run
        if len(where) == 3 and RUN_NAME.match(where[1]):
            runs.setdefault((where[0], where[1]), {})[where[2]] = e
        else:
            loose.append(e)  # not inside a run folder: no identity to check, kept by path
    sftp = conn.sftp()
    known: dict[str, list] = {}
    try:
        for e in loose:
            _store(sftp, remote_root, e, local_runs, e.rel, result)
        for (stage, name), files in sorted(runs.items()):
            if stage not in known:
                known[stage] = _local_uids(local_runs / stage)
            uid, data, ident = None, None, files.get(RUN_FILE)
            if ident:
                # run.json never changes: a local one with the same hash names the uid without a download
                uid = next((u for _, u, digest in known[stage] if digest == ident.digest), None)
                if uid is None:
                    data = _pull(sftp, remote_root, ident, result)
                    if data is None:
                        continue  # without its identity the run could land on another one; next sync
                    info = json.loads(data)
                    uid = info.get("uid") if isinstance(info, dict) else None
            target = _place(local_runs / stage, name, uid, files, box.host, known[stage])
            if target.name != name:
                result.relocated[f"{stage}/{name}"] = f"{stage}/{target.name}"
            for rel in sorted(files, key=lambda r: r != RUN_FILE):  # run.json first
                _store(sftp, remote_root, files[rel], local_runs, f"{stage}/{target.name}/{rel}", result,
                       data if rel == RUN_FILE else None)
    finally:
        sftp.close()
    return result
