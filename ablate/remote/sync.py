"""Bring a box's runs home: confined to the local runs folder, streamed, verified, one history per run.

    ablate remote sync --host ssh4.vast.ai --port 31234 --with-checkpoints

One remote command lists the box's runs folder (NUL-separated: a newline in a
name cannot forge an entry) with the box's hostname and clock. Every path it
names is checked by ``confine`` before anything is written; refused entries are
listed in ``SyncResult.refused``. A file unchanged on the box and here since the
last sync (the manifest in ``<runs parent>/.ablate/synced/``) is not read at all.
The small files of a run (identity, lineage, status, metrics, logs, samples) are
downloaded into a staging folder inside the local runs folder and compared with
the local run of the same uid (``ablate.results.lineage``): a box copy that is
ahead is installed file by file (atomically, ``run.json`` first); one that is
behind leaves the local run alone; one that diverged goes into a side folder
``<name>-<host>``. A box run without a readable ``run.json`` uid is refused
(every run writes one before anything else): nothing of it is written here.
Checkpoints and ``final/`` (``--with-checkpoints``) follow only then, by rsync
where both ends have it, else by resumable streamed SFTP. For
every run still ``running`` there, ``.remote.json`` records what the box said
about its writer (alive, heartbeat age on the box's own clock).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import itertools
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ablate.errors import BadInput
from ablate.remote import confine, transfer
from ablate.remote.confine import Entry, Refused
from ablate.remote.ssh import Connection
from ablate.results.files import read_json, write_json
from ablate.results.lineage import AHEAD, BEHIND, DIVERGED, LINEAGE_FILES, SAME, compare, progress
from ablate.results.rundir import (HISTORY_FILE, LOCK_FILE, PROCESS_FILE, REMOTE_FILE, RUN_FILE, RUN_NAME, RUNNING,
                                   STATUS_FILE, read_status)

SMALL = (RUN_FILE, HISTORY_FILE, PROCESS_FILE, STATUS_FILE, "metrics.json", "summary.json", "config.json", "env.json",
         "train_log.jsonl", "*.log", "samples_*.jsonl", "checkpoint_meta.json")
HEAVY_DIRS = ("checkpoints", "final")
NO_RUNS = 66  # the listing's exit code when the runs folder is missing


@dataclass
class SyncResult:
    copied: list[str] = field(default_factory=list)  # local paths, relative to the local runs folder
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # box path -> why (e.g. still being written)
    relocated: dict[str, str] = field(default_factory=dict)  # box's run folder -> the local one it went to
    refused: dict[str, str] = field(default_factory=dict)  # repr(path as the box named it) -> why; nothing written
    behind: dict[str, str] = field(default_factory=dict)  # local run -> why the box's older copy was not installed
    diverged: dict[str, str] = field(default_factory=dict)  # box's run folder -> where its other history is kept
    remote_state: dict[str, dict] = field(default_factory=dict)  # local run -> the .remote.json written for it
    host: str | None = None  # the box's hostname, as it says
    transport: str = ""  # how heavy files moved: "rsync" or "sftp"
    bytes_transferred: int = 0  # bytes that came over the wire
    bytes_read_locally: int = 0  # bytes of local files read to compare or resume (0 for a sync with nothing to do)


def _listing_command(root: str, with_checkpoints: bool) -> str:
    heavy = " -o ".join(f"-name {d}" for d in HEAVY_DIRS)
    prune = "" if with_checkpoints else f" -o -type d \\( {heavy} \\) -prune"
    names = " -o ".join(f"-name {shlex.quote(p)}" for p in SMALL)
    select = "" if with_checkpoints else f" \\( {names} \\)"
    # hostname and clock first; then size, mtime and path of each file, NUL-terminated; dot names never listed
    return (f"cd {shlex.quote(root)} 2>/dev/null || exit {NO_RUNS}; "
            "printf '%s\\0%s\\0' \"$(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)\" \"$(date +%s)\"; "
            f"find . -mindepth 1 \\( -name '.*' -prune{prune} \\) -o -type f{select} -printf '%s %T@ %P\\0'")


def _small(inner: str) -> bool:
    parts = inner.split("/")
    return not any(p in HEAVY_DIRS for p in parts[:-1]) and any(fnmatch.fnmatchcase(parts[-1], p) for p in SMALL)


def _stat(path: Path) -> list | None:
    """What a later sync compares to tell a local file unchanged without reading it."""
    st = os.lstat(path) if os.path.lexists(path) else None
    return [st.st_size, st.st_mtime_ns] if st else None


def _held(run_dir: Path) -> bool:
    """Whether a local process holds the run's write lock now (a live local run)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
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


class _Sync:
    def __init__(self, conn: Connection, root: Path, remote_root: str, result: SyncResult):
        self.conn, self.box, self.root, self.remote_root, self.result = conn, conn.box, root, remote_root, result
        key = f"{self.box.user}@{self.box.host}:{self.box.port}:{remote_root}"
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.box.host)[:40]
        self.manifest_path = (root.parent / ".ablate" / "synced" /
                              f"{root.name}-{tag}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")
        data, _ = read_json(self.manifest_path)
        self.manifest = data if data and data.get("box") == key else {"box": key, "runs": {}, "loose": {}}
        self.staging = Path(tempfile.mkdtemp(prefix=".sync-", dir=root))
        self.views = itertools.count()
        self.uids: dict[Path, list[tuple[Path, str]]] = {}
        self.running: list[tuple[Path, dict]] = []
        self.pull = transfer.Puller(conn, remote_root, root, result)

    @property
    def label(self) -> str:  # the box as the user knows it
        return f"{self.result.host or self.box.host} ({self.box.user}@{self.box.host}:{self.box.port})"

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.pull.close()
        except Exception:  # noqa: BLE001 - a connection already lost must not hide why
            pass
        try:
            self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.manifest_path, self.manifest)
        except OSError:
            pass  # without the manifest the next sync reads more, nothing worse

    def rel(self, path: Path) -> str:  # a local path as results name it: relative to the local runs folder
        return str(path.relative_to(self.root))


    def loose(self, entries: list[Entry]) -> None:
        """Files outside run folders: no identity to check, kept by their (confined) path."""
        records, todo = self.manifest["loose"], []
        for e in entries:
            try:
                dest = confine.local_path(self.root, e.rel)
            except Refused as exc:
                self.result.refused[repr(e.rel)] = str(exc)
                continue
            seen = records.get(e.rel)
            if seen and seen["box"] == e.mark and seen["here"] == _stat(dest):
                self.result.unchanged.append(e.rel)
            else:
                todo.append((e.rel, e, self.staging / "loose" / str(len(todo)), dest))
        arrived = self.pull.fetch([t[:3] for t in todo])
        for box_rel, e, staged, dest in todo:
            if box_rel not in arrived:
                continue
            try:
                stored = confine.install(self.root, staged, dest, self.result)
            except (Refused, OSError) as exc:
                self.result.skipped[box_rel] = f"could not be stored here: {exc}"
                continue
            (self.result.copied if stored else self.result.unchanged).append(box_rel)
            records[box_rel] = {"box": e.mark, "here": _stat(dest)}


    def note(self, key: str, record: dict) -> None:
        for kind, where, message in record.get("notes", []):
            getattr(self.result, kind)[where] = message

    def shortcut(self, key: str, small: dict[str, Entry], record: dict | None):
        """(local folder, verdict) when nothing changed on the box or here since the last sync; else None."""
        if not record or record["box"] != {r: e.mark for r, e in small.items()}:
            return None
        try:
            local = confine.local_path(self.root, record["local"])
        except Refused:
            return None
        if any(_stat(local / r) != mark for r, mark in record["here"].items()):
            return None
        self.note(key, record)
        if record["verdict"] == SAME:
            self.result.unchanged.extend(f"{record['local']}/{r}" for r in small)
        return local, record["verdict"]

    def local_uids(self, stage_dir: Path) -> list[tuple[Path, str]]:
        if stage_dir not in self.uids:
            found = []
            for path in sorted(stage_dir.iterdir()) if stage_dir.is_dir() and not stage_dir.is_symlink() else ():
                if RUN_NAME.match(path.name) and not path.is_symlink() and (path / RUN_FILE).is_file():
                    self.result.bytes_read_locally += (path / RUN_FILE).stat().st_size
                    info, _ = read_json(path / RUN_FILE)
                    if info and isinstance(info.get("uid"), str):
                        found.append((path, info["uid"]))
            self.uids[stage_dir] = found
        return self.uids[stage_dir]

    def free(self, stage_dir: Path, name: str) -> Path:
        """The first of ``name``, ``name-host``, ... that nothing here holds: a run with a uid is found by its uid,
        so whatever holds a name here (a run, a folder of other files) is another run's and never written into."""
        for candidate in _names(name, self.box.host):
            path = stage_dir / candidate
            if not os.path.lexists(path):
                return path

    def by_uid(self, key: str, stage_dir: Path, name: str, uid: str, view: Path, record: dict | None):
        """(local folder, verdict, notes) for a box run with a uid: the local copy on its lineage, else a new one."""
        found = [p for p, u in self.local_uids(stage_dir) if u == uid and not _held(p)]
        found.sort(key=lambda p: not record or self.rel(p) != record["local"])
        for local in found:
            verdict = compare(local, view)
            if verdict == BEHIND:
                why = (f"{self.label} has it {progress(view).describe()}, behind {progress(local).describe()} here; "
                       "the local run is left as it is")
                return local, BEHIND, [["behind", self.rel(local), why]]
            if verdict != DIVERGED:
                return local, verdict, []
        target = self.free(stage_dir, name)
        self.local_uids(stage_dir).append((target, uid))
        if found:
            why = (f"{self.label} holds a history of run {uid} ({progress(view).describe()}) that diverged from "
                   f"{self.rel(found[0])} ({progress(found[0]).describe()}): kept beside it in {self.rel(target)}")
            return target, AHEAD, [["diverged", key, why]]
        return target, AHEAD, [["relocated", key, self.rel(target)]] if target.name != name else []

    def run(self, stage: str, name: str, files: dict[str, Entry]) -> None:
        key = f"{stage}/{name}"
        try:
            stage_dir = confine.local_path(self.root, stage)
            confine.local_path(self.root, key)
        except Refused as exc:
            for rel in files:
                self.result.refused[repr(f"{key}/{rel}")] = str(exc)
            return
        if RUN_FILE not in files:  # before the manifest's shortcut: a run that lost its run.json since is refused too
            self.result.refused[repr(key)] = f"no {RUN_FILE}, which every ablate run writes first; not synced"
            return
        small = {r: e for r, e in files.items() if _small(r)}
        record = self.manifest["runs"].get(key)
        placed = self.shortcut(key, small, record) or self.place(key, stage_dir, name, small, record)
        if placed is None or placed[1] == BEHIND:
            return
        target = placed[0]
        heavy = {r: e for r, e in files.items() if r not in small}
        if heavy:
            self.heavy(key, target, heavy)
        if read_status(target)[0] == RUNNING:
            proc, _ = read_json(target / PROCESS_FILE)
            self.running.append((target, proc or {}))

    def place(self, key: str, stage_dir: Path, name: str, small: dict[str, Entry], record: dict | None):
        """Stage the box run's small files, find its local folder, install what is newer: (folder, verdict)."""
        view = self.staging / f"run{next(self.views)}"
        view.mkdir()
        reuse = None
        if record and record["verdict"] == SAME:
            try:
                reuse = confine.local_path(self.root, record["local"])
            except Refused:
                pass
        linked, todo = set(), []
        for rel, e in small.items():
            dest = confine.local_path(view, rel)
            if reuse is not None and record["box"].get(rel) == e.mark and record["here"].get(rel) is not None \
                    and _stat(reuse / rel) == record["here"][rel]:
                confine.make_parents(view, dest)
                try:
                    os.link(reuse / rel, dest)  # unchanged on both sides: the local copy is the box's file
                    linked.add(rel)
                    continue
                except OSError:
                    pass
            todo.append((f"{key}/{rel}", e, dest))
        arrived = linked | {r[len(key) + 1:] for r in self.pull.fetch(todo)}
        missing = [r for r in small if r not in arrived and (r == RUN_FILE or r in LINEAGE_FILES)]
        if missing:
            self.result.skipped.setdefault(key, f"run not synced this time: {', '.join(missing)} still being written")
            return None
        info, _ = read_json(view / RUN_FILE)
        why = f"{RUN_FILE} is not a JSON object" if info is None else confine.uid_problem(info.get("uid"))
        if why:
            self.result.refused[repr(key)] = f"{why}; not synced"
            return None
        target, verdict, notes = self.by_uid(key, stage_dir, name, info["uid"], view, record)
        agreed = set()
        if verdict != BEHIND:
            for rel in sorted(arrived, key=lambda r: r != RUN_FILE):  # run.json first: a half-synced run is known
                local = f"{self.rel(target)}/{rel}"
                try:
                    dest = confine.local_path(self.root, local)
                    if verdict == SAME and not confine.same_content(view / rel, dest, self.result):
                        self.result.skipped[f"{key}/{rel}"] = "differs from the local copy of the same moment; kept"
                        continue
                    stored = verdict != SAME and confine.install(self.root, view / rel, dest, self.result)
                except (Refused, OSError) as exc:
                    self.result.skipped[f"{key}/{rel}"] = f"could not be stored here: {exc}"
                    continue
                (self.result.copied if stored else self.result.unchanged).append(local)
                agreed.add(rel)
        same_folder = record is not None and record["local"] == self.rel(target)
        self.manifest["runs"][key] = record = {
            "local": self.rel(target), "verdict": BEHIND if verdict == BEHIND else SAME, "notes": notes,
            "box": {r: (e.mark if r in agreed or verdict == BEHIND else None) for r, e in small.items()},
            "here": {r: _stat(target / r) for r in sorted(set(small) | set(LINEAGE_FILES))},
            "heavy": record.get("heavy", {}) if same_folder else {}}
        self.note(key, record)
        return target, verdict

    def heavy(self, key: str, target: Path, heavy: dict[str, Entry]) -> None:
        """Checkpoints and final models, into the chosen local folder, unless unchanged since the last sync."""
        marks = self.manifest["runs"][key].setdefault("heavy", {})
        todo = {}
        for rel, e in sorted(heavy.items()):
            try:
                dest = confine.local_path(self.root, f"{self.rel(target)}/{rel}")
                seen = marks.get(rel)
                if seen and seen["box"] == e.mark and seen["here"] == _stat(dest):
                    self.result.unchanged.append(self.rel(dest))
                    continue
                confine.make_parents(self.root, dest)  # here, not by rsync: no folder is made through a symlink
            except Refused as exc:
                self.result.refused[repr(f"{key}/{rel}")] = str(exc)
                continue
            todo[rel] = (e, dest)
        for rel in sorted(self.pull.heavy(key, target, todo)) if todo else ():
            e, dest = todo[rel]
            self.result.copied.append(self.rel(dest))
            marks[rel] = {"box": e.mark, "here": _stat(dest)}


    def liveness(self, box_now: float | None) -> None:
        """``.remote.json`` for each run running there: is its pid alive and the same process, heartbeat age."""
        procs = [proc for _, proc in self.running]
        for (target, proc), alive in zip(self.running, self.pull.alive(procs, self.result.host)):
            beat = proc.get("heartbeat")
            known = box_now is not None and isinstance(beat, (int, float)) and not isinstance(beat, bool)
            record = {"host": self.result.host, "pid": proc.get("pid") if transfer.is_pid(proc.get("pid")) else None,
                      "attempt": proc.get("attempt") if isinstance(proc.get("attempt"), str) else None,
                      "synced_at": time.time(), "box": f"{self.box.user}@{self.box.host}:{self.box.port}",
                      "heartbeat_age": box_now - beat if known else None, "alive": alive}
            write_json(target / REMOTE_FILE, record)
            self.result.remote_state[self.rel(target)] = record


def sync(conn: Connection, local_runs: Path, remote_runs: str = "runs", with_checkpoints: bool = False) -> SyncResult:
    box = conn.box
    remote_root = box.path(remote_runs)
    result = SyncResult()
    code, out, err = conn.run(_listing_command(remote_root, with_checkpoints), timeout=max(box.timeout, 300))
    if code == NO_RUNS:
        raise BadInput(f"{box.host}:{box.port} has no runs folder {remote_root} (check --workdir and --remote-runs)")
    result.host, box_now, entries = confine.parse_listing(out, result.refused)
    root = Path(local_runs)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    loose: list[Entry] = []
    runs: dict[tuple[str, str], dict[str, Entry]] = {}
    for e in entries:
        parts = e.rel.split("/")
        inner = "/".join(parts[2:])
        if len(parts) >= 2 and RUN_NAME.match(parts[1]):
            if len(parts) == 2:
                result.refused[repr(e.rel)] = "a file where a run folder belongs"
            elif with_checkpoints or _small(inner):
                runs.setdefault((parts[0], parts[1]), {})[inner] = e
        elif with_checkpoints or _small(e.rel):
            loose.append(e)  # not inside a run folder: no identity to check, kept by path
    job = _Sync(conn, root, remote_root, result)
    try:
        job.loose(loose)
        for (stage, name), files in sorted(runs.items()):
            job.run(stage, name, files)
        job.liveness(box_now)
    finally:
        job.close()
    return result
