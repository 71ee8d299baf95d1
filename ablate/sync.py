"""Bring a box's run results home, never storing a file half-written.

    ablate remote sync --host ssh4.vast.ai --port 31234

Small files of every run directory (metrics, summaries, configs, env, samples,
logs, status) are pulled into local ``runs/``; checkpoints only with
``--with-checkpoints``. Each file is downloaded to a temporary file, checked
(unchanged on the box while it was read; JSON and JSONL parse), fsynced and
renamed into place. A file whose remote hash equals the local one is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ablate.remote import Connection
from ablate.rundir import write_bytes

SMALL = ("metrics.json", "summary.json", "config.json", "env.json", "status.txt", "train_log.jsonl", "*.log",
         "samples_*.jsonl", "checkpoint_meta.json")
HEAVY_DIRS = ("checkpoints", "final")


@dataclass
class SyncResult:
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why (e.g. still being written)


def _listing_command(runs: str, with_checkpoints: bool) -> str:
    names = " -o ".join(f"-name {shlex.quote(p)}" for p in SMALL)
    prune = "" if with_checkpoints else " ".join(f"-not -path {shlex.quote(f'*/{d}/*')}" for d in HEAVY_DIRS)
    select = "" if with_checkpoints else f"\\( {names} \\)"
    # size, mtime and sha256 of every file, relative to runs/; temporary files are never listed
    return (f"cd {shlex.quote(runs)} 2>/dev/null && find . -type f {select} {prune} -not -name '.*' "
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


def sync(conn: Connection, local_runs: Path, remote_runs: str = "runs", with_checkpoints: bool = False) -> SyncResult:
    box = conn.box
    remote_root = box.path(remote_runs)
    result = SyncResult()
    _, out, _ = conn.run(_listing_command(remote_root, with_checkpoints), timeout=max(box.timeout, 120))
    sftp = conn.sftp()
    try:
        for line in out.splitlines():
            parts = line.split(" ", 3)
            if len(parts) != 4:
                continue
            size, mtime, digest, rel = parts
            local = Path(local_runs) / rel
            if local.is_file() and hashlib.sha256(local.read_bytes()).hexdigest() == digest:
                result.unchanged.append(rel)
                continue
            remote = f"{remote_root}/{rel}"
            with sftp.open(remote, "rb") as fh:
                data = fh.read()
            after = sftp.stat(remote)
            if after.st_size != int(size) or int(after.st_mtime) != int(float(mtime)) or \
                    hashlib.sha256(data).hexdigest() != digest:
                result.skipped[rel] = "changed since it was listed (still being written)"
                continue
            if not _valid(rel, data):
                result.skipped[rel] = "not valid JSON yet (still being written)"
                continue
            write_bytes(local, data)
            result.copied.append(rel)
    finally:
        sftp.close()
    return result
