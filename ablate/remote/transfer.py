"""Moving files between this machine and a box at any size: memory bounded, resumable, verified.

    python -c "from ablate.remote.ssh import Box, ssh_command; print(ssh_command(Box('ssh4.vast.ai', 31234)))"

Where both ends have rsync, rsync runs over ``ssh`` with the connection settings
paramiko uses (port, user, key, the project's known_hosts pinned with
``StrictHostKeyChecking=yes``): ``-t`` only (no symlinks, devices or
permissions from the other end), a partial folder so a rerun resumes, rsync's
own whole-file checksum. Otherwise SFTP streams each file in windows of a few
MiB (prefetched, bounded) into a partial file that a later run resumes from;
its sha256 is computed while streaming and compared with ``sha256sum`` of that
file run on the other end, together with its size and mtime.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ablate.errors import BadInput
from ablate.remote import confine
from ablate.remote.ssh import Box, Connection, Unreachable, ssh_command  # noqa: F401 (re-exported)

WINDOW = 4 << 20  # bytes of one SFTP read window: the most a download holds in memory at once
REQUESTS = 64  # concurrent SFTP read requests within a window (32 KiB each)
PARTIAL_DIR = ".rsync-partial"
_UNREACHABLE_RSYNC = (5, 10, 12, 30, 35, 255)  # rsync exit codes for a lost or refused connection


class Changed(Exception):
    """The file on the other end is not the one that was listed (gone, shorter, rewritten): skip it this time."""


@dataclass
class Tally:
    bytes_transferred: int = 0
    bytes_read_locally: int = 0


@dataclass(frozen=True)
class Fact:
    size: int
    mtime: float
    sha256: str | None


def have_rsync(conn: Connection) -> bool:
    return bool(shutil.which("rsync")) and conn.run("command -v rsync >/dev/null 2>&1")[0] == 0


def _remote_spec(box: Box, path: str) -> str:
    host = f"[{box.host}]" if ":" in box.host else box.host
    return f"{host}:{path}"


def _shown(chunk: bytes) -> str:
    """Text from the other end for the terminal: no escape sequences or other controls besides CR and LF."""
    return re.sub(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f]", "?", chunk.decode(errors="replace"))


def rsync(box: Box, source: str, dest: str, rels: list[str], pull: bool) -> tuple[int, int, str]:
    """Copy ``rels`` (relative to ``source``) into ``dest``: (bytes over the wire, exit code, last line). Progress on stderr."""
    with tempfile.NamedTemporaryFile("wb", prefix="ablate-files-", suffix=".lst") as listing:
        listing.write(b"".join(r.encode() + b"\0" for r in rels))
        listing.flush()
        remote, local = (source, dest) if pull else (dest, source)
        spec = _remote_spec(box, remote.rstrip("/") + "/")
        ends = [spec, local.rstrip("/") + "/"] if pull else [local.rstrip("/") + "/", spec]
        command = ["rsync", "-t", "-s", "--from0", f"--files-from={listing.name}", f"--partial-dir={PARTIAL_DIR}",
                   "--chmod=D755,F644", f"--timeout={max(60, int(4 * box.timeout))}", "--info=progress2",
                   "--stats", "-e", shlex.join(ssh_command(box)), *ends]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tail = b""
        while chunk := proc.stdout.read1(65536):
            sys.stderr.write(_shown(chunk))
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
        code = proc.wait()
    text = _shown(tail)
    last = (text.strip().splitlines() or [""])[-1]
    if code in _UNREACHABLE_RSYNC:
        raise Unreachable(f"rsync lost {box.host}:{box.port} (exit {code}): {last}")
    found = re.search(rf"Total bytes {'received' if pull else 'sent'}: ([\d,.]+)", text)
    return int(re.sub(r"\D", "", found.group(1))) if found else 0, code, last


def remote_facts(conn: Connection, root: str, rels: list[str], digest: bool = True) -> list[Fact | None]:
    """Size, mtime and (with ``digest``) sha256 of each file, as the box sees them now; None for one that is gone."""
    facts: list[Fact | None] = []
    batch: list[str] = []
    for i, rel in enumerate(rels):
        batch.append(rel)
        if i == len(rels) - 1 or sum(len(r) + 8 for r in batch) > 60_000:
            facts += _facts_batch(conn, root, batch, digest)
            batch = []
    return facts


def _facts_batch(conn: Connection, root: str, rels: list[str], digest: bool) -> list[Fact | None]:
    files = " ".join(shlex.quote("./" + r) for r in rels)
    # One line per file, in order; only a regular file is hashed (a fifo would block sha256sum).
    hash_it = 'h=""; [ -n "$m" ] && h=$(sha256sum < "$f" 2>/dev/null); ' if digest else 'h=""; '
    command = (f"cd {shlex.quote(root)} || exit 66; for f in {files} ; do "
               "m=$(find \"$f\" -maxdepth 0 -type f -printf '%s %T@' 2>/dev/null); " + hash_it +
               "printf '%s %s\\n' \"${m:-- -}\" \"${h%% *}\"; done")
    code, out, err = conn.run(command, timeout=max(conn.box.timeout, 60.0))
    lines = out.split("\n")[:len(rels)]
    if code != 0 or len(lines) != len(rels):
        raise BadInput(f"{conn.box.host}:{conn.box.port} did not describe the files it sent ({code}): "
                       f"{_shown(err.encode())[-200:]!r}")
    facts = []
    for line in lines:
        m = re.fullmatch(r"(\d{1,19}) (\d{1,12}(?:\.\d{1,12})?) ([0-9a-f]{64})?", line)
        facts.append(Fact(int(m.group(1)), float(m.group(2)), m.group(3)) if m else None)
    return facts


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, (EOFError, paramiko.SSHException, ConnectionError, TimeoutError, socket.timeout))


def _hash_prefix(path: Path, digest, tally: Tally) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            tally.bytes_read_locally += len(block)


def _bar(total: int, done: int, label: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=label[-40:],
                file=sys.stderr, mininterval=1.0, leave=False, disable=not show)


def sftp_pull(sftp, remote: str, partial: Path, size: int, tally: Tally, show: str = "") -> str:
    """Stream ``remote`` into ``partial``, resuming the bytes it already holds; the sha256 of the whole file.

    Raises Changed for a file that is gone or shorter than listed, Unreachable when the connection drops
    (``partial`` keeps what arrived, for the next try). ``show``: the name a progress bar on stderr shows.
    """
    have = partial.stat().st_size if partial.exists() else 0
    digest = hashlib.sha256()
    if have > size:
        have = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if have else os.O_TRUNC)
    if have:
        _hash_prefix(partial, digest, tally)
    with os.fdopen(os.open(partial, flags, 0o644), "wb") as out, _bar(size, have, show, bool(show)) as bar:
        try:
            with sftp.open(remote, "rb") as src:
                offset = have
                while offset < size:
                    want = min(WINDOW, size - offset)
                    data = b"".join(src.readv([(offset, want)], REQUESTS))
                    if not data:
                        raise Changed("shorter than listed (changed since it was listed)")
                    out.write(data)
                    digest.update(data)
                    offset += len(data)
                    tally.bytes_transferred += len(data)
                    bar.update(len(data))
        except FileNotFoundError:
            raise Changed("removed since it was listed") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            out.flush()
            if _lost(exc):
                raise Unreachable(f"transfer of {remote} broke off: {exc or type(exc).__name__}") from None
            raise Changed(f"could not be read on the box: {exc}") from None
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def partial_name(dest: Path, size: int, mtime: float) -> Path:
    """Where the bytes of one version of a file gather until it is whole (a rerun resumes only the same version)."""
    return dest.with_name(f".{dest.name}.{size}-{mtime:.6f}.partial")


def push_files(conn: Connection, local_root: Path, rels: list[str], remote_root: str) -> str:
    """Copy ``rels`` (relative to ``local_root``) to the same relative paths under ``remote_root`` on the box."""
    local_root = Path(local_root)
    for rel in rels:
        why = confine.problem(rel)
        if why:
            raise BadInput(f"cannot push {rel!r}: {why}")
    conn.check(f"mkdir -p {shlex.quote(remote_root)}")
    total = sum((local_root / r).stat().st_size for r in rels)
    if have_rsync(conn):
        sent, code, last = rsync(conn.box, str(local_root), remote_root, sorted(rels), pull=False)
        if code != 0:
            raise BadInput(f"rsync to {conn.box.host}:{conn.box.port} failed (exit {code}): {last}")
        return f"rsync ({len(rels)} files, {total} bytes, {sent} sent)"
    folders = sorted({str(Path(r).parent) for r in rels} - {"."})
    if folders:
        conn.check("mkdir -p " + " ".join(shlex.quote(f"{remote_root}/{f}") for f in folders))
    sftp = conn.sftp()
    tally = Tally()
    try:
        for rel in sorted(rels):
            _put(conn, sftp, local_root / rel, remote_root, rel, tally)
    finally:
        sftp.close()
    return f"sftp ({len(rels)} files, {total} bytes, {tally.bytes_transferred} sent)"


def _put(conn: Connection, sftp, local: Path, remote_root: str, rel: str, tally: Tally) -> None:
    """One file up: streamed into a partial beside the target (resumed when it is there), verified, renamed."""
    st = local.stat()
    head, _, name = rel.rpartition("/")
    partial_rel = f"{head + '/' if head else ''}.{name}.{st.st_size}-{st.st_mtime_ns}.partial"
    partial = f"{remote_root}/{partial_rel}"
    try:
        have = sftp.stat(partial).st_size or 0
    except OSError:
        have = 0
    have = have if have <= st.st_size else 0
    digest = hashlib.sha256()
    with open(local, "rb") as src, sftp.open(partial, "ab" if have else "wb") as out, \
            _bar(st.st_size, have, rel, st.st_size > WINDOW) as bar:
        out.set_pipelined(True)
        while have and (block := src.read(min(1 << 20, have - src.tell()))):
            digest.update(block)
        while block := src.read(1 << 20):
            out.write(block)
            digest.update(block)
            tally.bytes_transferred += len(block)
            bar.update(len(block))
    fact = remote_facts(conn, remote_root, [partial_rel])[0]
    if fact is None or fact.size != st.st_size or fact.sha256 != digest.hexdigest():
        sftp.remove(partial)
        raise BadInput(f"{rel} arrived damaged on {conn.box.host} (size or sha256 differs); push again")
    sftp.posix_rename(partial, f"{remote_root}/{rel}")
    sftp.utime(f"{remote_root}/{rel}", (st.st_atime, st.st_mtime))


class Puller:
    """The downloads of one sync from one box: one SFTP session, rsync for heavy files when both ends have it.

    ``result`` collects ``skipped`` (box path -> why) and the byte counters.
    """

    def __init__(self, conn: Connection, remote_root: str, local_root: Path, result):
        self.conn, self.remote_root, self.root, self.result = conn, remote_root, local_root, result
        self._sftp = self._rsync = None

    def sftp(self):
        if self._sftp is None:
            self._sftp = self.conn.sftp()
        return self._sftp

    def rsync_ok(self) -> bool:
        if self._rsync is None:
            self._rsync = have_rsync(self.conn)
        return self._rsync

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()

    def fetch(self, items: list) -> set[str]:
        """Download each (box path, listed entry, local file) whole and verified; the box paths that arrived."""
        pulled, skipped = [], self.result.skipped
        for box_rel, e, dest in items:
            confine.make_parents(self.root, dest)
            partial = dest.with_name(f".{dest.name}.partial")
            try:
                sha = sftp_pull(self.sftp(), f"{self.remote_root}/{box_rel}", partial, e.size, self.result)
                pulled.append((box_rel, e, dest, partial, sha))
            except Changed as exc:
                skipped[box_rel] = str(exc)
                partial.unlink(missing_ok=True)
        facts = remote_facts(self.conn, self.remote_root, [p[0] for p in pulled]) if pulled else []
        arrived = set()
        for (box_rel, e, dest, partial, sha), fact in zip(pulled, facts):
            if fact is None:
                skipped[box_rel] = "removed since it was listed"
            elif (fact.size, fact.mtime, fact.sha256) != (e.size, e.mtime, sha):
                skipped[box_rel] = "changed since it was listed (still being written)"
            elif not confine.valid(box_rel, partial):
                skipped[box_rel] = "not valid JSON yet (still being written)"
            else:
                os.replace(partial, dest)
                arrived.add(box_rel)
                continue
            partial.unlink(missing_ok=True)
        return arrived

    def heavy(self, source_rel: str, target: Path, todo: dict) -> set[str]:
        """Bring ``todo`` (path in the run -> (entry, local file)) into ``target``; the paths that arrived whole."""
        source = f"{self.remote_root}/{source_rel}"
        rsync_ok = self.rsync_ok()
        self.result.transport = "rsync" if rsync_ok else "sftp"
        code, last = 0, ""
        if rsync_ok:
            got, code, last = rsync(self.conn.box, source, str(target), list(todo), pull=True)
            self.result.bytes_transferred += got
        arrived = set()
        for (rel, (e, dest)), fact in zip(todo.items(), remote_facts(self.conn, source, list(todo), False)):
            if not rsync_ok and fact is not None:
                fact = self._pull_one(f"{source_rel}/{rel}", e, dest)
            here = dest.stat().st_size if dest.is_file() else None
            if fact is None or (fact.size, fact.mtime) != (e.size, e.mtime):
                self.result.skipped.setdefault(f"{source_rel}/{rel}", "changed on the box while it was copied")
                if rsync_ok and here is not None:
                    dest.unlink()  # not a file the box ever held whole
            elif here != e.size:
                self.result.skipped[f"{source_rel}/{rel}"] = f"rsync did not bring it (exit {code}): {last}"
            else:
                arrived.add(rel)
        return arrived

    def _pull_one(self, box_rel: str, e, dest: Path) -> Fact | None:
        """One heavy file over SFTP into its partial (resumed), checked against the box's sha256, renamed in place."""
        partial = partial_name(dest, e.size, e.mtime)
        escaped = re.sub(r"([*?[])", r"[\1]", dest.name)
        for old in dest.parent.glob(f".{escaped}.*.partial"):
            if old != partial:
                old.unlink()  # the bytes of another version of the file
        try:
            sha = sftp_pull(self.sftp(), f"{self.remote_root}/{box_rel}", partial, e.size, self.result, show=box_rel)
        except Changed as exc:
            partial.unlink(missing_ok=True)
            self.result.skipped[box_rel] = str(exc)
            return None
        fact = remote_facts(self.conn, self.remote_root, [box_rel])[0]
        if fact is None or fact.sha256 != sha:
            partial.unlink(missing_ok=True)
            return None
        os.utime(partial, (e.mtime, e.mtime))
        os.replace(partial, dest)
        return fact

    def alive(self, procs: list[dict], host: str | None) -> list[bool | None]:
        """For each process.json of a run running there: is that pid alive and the same process (None: unknown)."""
        mine = [p for p in procs if p.get("host") == host and is_pid(p.get("pid"))]  # a pid names a process there only
        starts = self.process_starts(sorted({p["pid"] for p in mine}))
        verdicts = []
        for proc in procs:
            start, started = starts.get(proc.get("pid")) if proc in mine else None, proc.get("started")
            if start is False:
                verdicts.append(False)
            elif start is None or isinstance(started, bool) or not isinstance(started, (int, float)):
                verdicts.append(None)
            else:
                verdicts.append(abs(start - started) < 1.0)  # psutil's create_time is the same sum, to the tick
        return verdicts

    def process_starts(self, pids: list[int]) -> dict:
        """pid -> its start on the box's clock (as psutil's create_time), False when gone, None when unknown."""
        if not pids:
            return {}
        # /proc/PID/stat field 22 is the start in clock ticks after boot (btime): no python needed on the box
        command = ("getconf CLK_TCK 2>/dev/null; printf '\\0'; { while read -r k v rest; do "
                   "[ \"$k\" = btime ] && printf '%s' \"$v\"; done < /proc/stat; } 2>/dev/null; printf '\\0'; "
                   + "".join(f"printf '%s\\0' \"$(cat /proc/{p}/stat 2>/dev/null)\"; " for p in pids))
        parts = self.conn.run(command)[1].split("\0")
        try:
            tick, btime = int(parts[0].strip()), int(parts[1].strip())
        except (ValueError, IndexError):
            return {p: None for p in pids}
        starts = {}
        for pid, stat in zip(pids, parts[2:2 + len(pids)] + [None] * len(pids)):
            try:
                fields = stat.rsplit(")", 1)[1].split() if stat else None
                starts[pid] = False if stat == "" else btime + int(fields[19]) / max(tick, 1)
            except (IndexError, ValueError, AttributeError, TypeError):
                starts[pid] = None
        return starts


def is_pid(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31
