"""The run store: ``runs/<stage>/<YYYYmmdd-HHMMSS>/``, one owner for naming, status, locking and lookup.

    python -c "from ablate.results.rundir import find_runs; print(find_runs('runs', 'stage1_baseline_eval'))"

A run carries an explicit status in ``status.txt`` (``running`` -> ``completed``
| ``failed`` | ``diverged`` | ``gated``); readers trust it over the presence of
other files. ``process.json`` records who writes the run (host, pid, the
process's start time, a heartbeat), so a reader shows a ``running`` run whose
process is gone as ``crashed``. A run directory is written by one process at a
time (``.lock``), is never overwritten, and callers find runs only through
``find_runs`` / ``latest`` / ``explicit_run`` (they never glob).
"""

from __future__ import annotations

import enum
import json
import errno
import fcntl
import logging
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ablate.errors import BadInput
from ablate.results.files import read_json, write_json, write_text
from ablate.results.runlog import run_log
from ablate.results.liveness import PROCESS_FILE, REMOTE_FILE, heartbeat_seconds, stale_seconds, writer_gone

__all__ = ["PROCESS_FILE", "REMOTE_FILE", "heartbeat_seconds", "stale_seconds"]  # re-exported: the run store's names

log = logging.getLogger(__name__)


class Status(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    DIVERGED = "diverged"
    GATED = "gated"
    CRASHED = "crashed"  # never written: a reader's verdict on a `running` run whose process is gone

    def __str__(self) -> str:
        return self.value


RUNNING, COMPLETED, FAILED, DIVERGED, GATED, CRASHED = (Status.RUNNING, Status.COMPLETED, Status.FAILED,
                                                        Status.DIVERGED, Status.GATED, Status.CRASHED)
USABLE = (COMPLETED, GATED)  # results a later stage may start from (a gated one only with --ignore-gate)
# The run folders of the four stages (stage 3 has one per training mask: stage3_finetune_<mask>).
STAGE1, STAGE2, STAGE3_PREFIX, STAGE4 = ("stage1_baseline_eval", "stage2_ablation_eval", "stage3_finetune_",
                                         "stage4_post_ft_eval")
RUN_NAME = re.compile(r"^\d{8}-\d{6}(-[A-Za-z0-9_.-]+)?$")
RUN_FILE, STATUS_FILE, LOCK_FILE = "run.json", "status.txt", ".lock"
HISTORY_FILE = "history.jsonl"  # one line per attempt (the run's start and each resume): its lineage


# ---------------------------------------------------------------- writing a run

def check_writable(runs_dir: Path, stage: str) -> None:
    """Fail before any model work when the runs folder cannot take a new run (read-only, full, a file).

    Creates nothing: the deepest folder that exists on the way to ``runs_dir/stage`` must take a small file.
    """
    target = Path(runs_dir) / stage
    existing = next(p for p in (target, *target.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise BadInput(f"cannot write runs under {target}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ablate-write-check-") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise BadInput(f"cannot write runs under {target}: {exc.strerror or type(exc).__name__}") from None


_LOCKS: dict[str, int] = {}


def _lock(run_dir: Path) -> None:
    """Take the run's write lock for this process; a second writer gets one line and exit 2."""
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            proc, _ = read_json(Path(run_dir) / PROCESS_FILE)
            who = f" (pid {proc.get('pid')} on {proc.get('host')})" if proc else ""
            raise BadInput(f"{run_dir} is being written by another ablate process{who}; "
                           "wait for it to end or stop it first") from None
        raise
    _LOCKS[key] = fd


def _unlock(run_dir: Path) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _process_record(attempt: str) -> dict:
    import psutil

    me = psutil.Process()
    return {"host": platform.node(), "pid": os.getpid(), "started": me.create_time(), "attempt": attempt,
            "heartbeat": time.time(), "argv": sys.argv[:1] + sys.argv[1:][:40]}


def _begin_attempt(run_dir: Path, from_step: int) -> None:
    """Record this process as the run's writer, and the attempt in the run's lineage (``history.jsonl``).

    Copies of one run on two boxes are told apart by their lineage: a sync keeps the one that extends the other.
    """
    record = _process_record(uuid.uuid4().hex)
    path = Path(run_dir) / HISTORY_FILE
    previous = path.read_bytes().decode(errors="replace") if path.is_file() else ""  # lineage skips a damaged line
    line = json.dumps({"attempt": record["attempt"], "host": record["host"], "pid": record["pid"],
                       "started": record["started"], "from_step": int(from_step)})
    write_text(path, previous + ("" if not previous or previous.endswith("\n") else "\n") + line + "\n")
    write_json(Path(run_dir) / PROCESS_FILE, record)


def new_run_dir(runs_dir: Path, stage: str, **record) -> Path:
    """Create a fresh run directory, locked by this process; a second run in the same second gets a suffix.

    ``record`` goes into ``run.json`` beside the uid: what the run was made from (``model_identity``).
    """
    base = Path(runs_dir) / stage
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _lock(path)
        write_json(path / RUN_FILE, {"uid": uuid.uuid4().hex, "stage": stage, "created": time.time(),
                                     "name": path.name, "host": platform.node(), **record})
        _begin_attempt(path, 0)
        set_status(path, RUNNING)
        return path
    raise BadInput(f"could not create a run directory under {base}")


def reopen(run_dir: Path, from_step: int = 0) -> None:
    """Take over an existing run (``--resume`` from checkpoint ``from_step``): lock it, record the attempt, mark it running."""
    _lock(run_dir)
    _begin_attempt(run_dir, from_step)
    set_status(run_dir, RUNNING)


def set_status(run_dir: Path, status: Status | str, reason: str = "") -> None:
    write_text(Path(run_dir) / STATUS_FILE, str(status) + (f"\n{reason}\n" if reason else "\n"))


def read_status(run_dir: Path) -> tuple[str, str]:
    try:
        lines = (Path(run_dir) / STATUS_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return "unknown", "no status.txt"
    return (lines[0].strip() if lines else "unknown"), "\n".join(lines[1:]).strip()


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached a running stage; like KeyboardInterrupt, not an ordinary error."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT (Ctrl-C)"
    if isinstance(exc, Terminated):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


@contextmanager
def active(run_dir: Path, is_main: bool = True, log_file: str = "run.log"):
    """The life of a run in this process: heartbeat, signals, the run log; ``failed`` with the reason if it raises.

    The body sets the terminal status itself; the lock is released when the block ends, however it ends.
    """
    run_dir = Path(run_dir)
    if not is_main:
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_seconds()):
            try:
                record, _ = read_json(run_dir / PROCESS_FILE)
                if record is not None:
                    write_json(run_dir / PROCESS_FILE, {**record, "heartbeat": time.time()})
            except OSError as exc:  # a full disk must not kill the run; the reader may call it crashed later
                log.warning("heartbeat of %s failed: %s", run_dir, exc)

    thread = threading.Thread(target=beat, name="ablate-heartbeat", daemon=True)
    thread.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        with run_log(run_dir / log_file):
            yield
    except BaseException as exc:
        if read_status(run_dir)[0] == RUNNING:
            try:
                set_status(run_dir, FAILED, failure_reason(exc))
            except OSError:  # a full disk has no room for the atomic write's temporary file; status.txt has its own
                try:
                    with os.fdopen(os.open(run_dir / STATUS_FILE, os.O_WRONLY | os.O_NOFOLLOW), "w") as fh:
                        fh.write(f"{FAILED}\n{failure_reason(exc)}\n")
                        fh.truncate()
                except OSError:
                    pass  # the original error says more than a status that cannot be written
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()
        _unlock(run_dir)


def claim(state, make) -> Path:
    """Under ``accelerate launch``: rank 0 creates or reopens (and locks) the run; every rank gets its path,
    or the same one-line refusal. ``state`` is accelerate's ``PartialState``."""
    from accelerate.utils import broadcast_object_list

    holder = [None]
    if state.is_main_process:
        try:
            holder = [(str(make()), None)]
        except BadInput as exc:
            holder = [(None, str(exc))]
    path, refused = broadcast_object_list(holder)[0]
    if refused:
        raise BadInput(refused)
    return Path(path)


# ---------------------------------------------------------------- reading runs

@dataclass(frozen=True)
class Run:
    path: Path
    status: Status | str  # the effective status: `running` whose process is gone reads `crashed`
    reason: str
    metrics: dict | None
    summary: dict | None
    error: str | None  # a metrics.json / summary.json that exists but cannot be read, by path
    config: dict | None = None
    info: dict | None = None  # run.json: the uid (tells two runs with one folder name apart) and what it was made from

    @property
    def uid(self) -> str | None:
        return (self.info or {}).get("uid")

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return self.path.parent.name

    @property
    def results(self) -> dict | None:
        return self.metrics if self.metrics is not None else self.summary


def load_run(path: Path) -> Run | None:
    """One run directory with its status and results; None when ``path`` is not a run directory."""
    path = Path(path)
    if not (path.is_dir() and RUN_NAME.match(path.name)):
        return None
    if not (path / STATUS_FILE).is_file():
        if not (path / RUN_FILE).is_file():
            return None  # a folder that merely looks like a run
        status, reason = "damaged", "its status.txt is missing"  # a run this tool made, never taken as usable
    else:
        status, reason = read_status(path)
    if status in Status._value2member_map_:
        status = Status(status)
    if status == RUNNING:
        gone, why = writer_gone(path)
        status, reason = (CRASHED if gone else status), (why or reason)
    metrics, error_m = read_json(path / "metrics.json")
    summary, error_s = read_json(path / "summary.json")
    for name, data in (("metrics.json", metrics), ("summary.json", summary)):
        recorded = (data or {}).get("stage")
        if recorded is not None and recorded != path.parent.name:  # a results file moved in from another run
            error_m = error_m or f"{path / name}: records stage {recorded!r}, not {path.parent.name}"
            metrics = summary = None
    run_info, _ = read_json(path / RUN_FILE)
    config, _ = read_json(path / "config.json")
    return Run(path, status, reason, metrics, summary, error_m or error_s, config, run_info)


def started(run: Run) -> float:
    """When a run began: the UTC time its run.json records; for an older run, its folder's (local) time stamp."""
    created = (run.info or {}).get("created")
    if isinstance(created, (int, float)) and not isinstance(created, bool) and created == created:
        return float(created)
    try:
        return time.mktime(time.strptime(run.path.name[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        return 0.0


def copies(runs: list[Run]) -> dict[Path, Path]:
    """Folders holding another copy of a run (same uid): copy -> the run's own folder, the one named as recorded.

    A backup (``RUN-backup``) or a diverged copy kept beside by a sync is never taken for the run itself.
    """
    by_uid: dict[str, list[Run]] = {}
    for run in runs:
        if run.uid:
            by_uid.setdefault(run.uid, []).append(run)
    found = {}
    for same in by_uid.values():
        if len(same) > 1:
            own = next((r for r in same if (r.info or {}).get("name") == r.path.name), None)
            own = own or min(same, key=lambda r: (len(r.path.name), r.path.name))  # older runs record no name
            found.update({r.path: own.path for r in same if r is not own})
    return found


def find_runs(runs_dir: Path, stage: str, with_copies: bool = False) -> list[Run]:
    """All runs of a stage, oldest first by recorded start time; folders that are not runs (backups, notebooks'
    caches) are skipped, and so are copies of a run (``with_copies`` keeps them)."""
    base = Path(runs_dir) / stage
    if not base.is_dir():
        return []
    runs = [r for r in (load_run(p) for p in sorted(base.iterdir(), key=lambda p: p.name)) if r is not None]
    runs.sort(key=lambda r: (started(r), r.path.name))
    if not with_copies:
        extra = copies(runs)
        runs = [r for r in runs if r.path not in extra]
    return runs


def stages_with_prefix(runs_dir: Path, prefix: str) -> list[str]:
    """Stage folders such as ``stage3_finetune_<mask>`` (or ``_<name>@<sha8>``); not a copy (``..._causal.bak``)."""
    base = Path(runs_dir)
    pattern = re.compile(re.escape(prefix) + r"[A-Za-z0-9_]+(@[0-9a-f]{8})?$")
    return sorted(p.name for p in base.iterdir() if p.is_dir() and pattern.match(p.name)) if base.is_dir() else []


def latest(runs_dir: Path, stage: str, where=None, statuses=(COMPLETED,), need_results: bool = True) -> Run | None:
    """The latest usable run of ``stage``: status in ``statuses``, results readable, ``where(run)`` true.

    ``need_results=False`` for unfinished runs (a crashed stage 3 run to resume has no summary.json).
    """
    for run in reversed(find_runs(runs_dir, stage)):
        has_results = not run.error and run.results is not None
        if run.status in statuses and (has_results or not need_results) and (where is None or where(run)):
            return run
    return None


def explicit_run(path: str | Path, stage: str, flag: str, statuses=USABLE, need_results: bool = True) -> Run:
    """A run the user named (``--baseline``, ``--stage1-run``, ...): the right stage and usable, or one line."""
    run = load_run(Path(path))
    if run is None:
        raise BadInput(f"{flag} {path} is not a run directory (runs/<stage>/<YYYYmmdd-HHMMSS>/ with a status.txt)")
    if not run.stage.startswith(stage):
        raise BadInput(f"{flag} {path} is a {run.stage} run, not {stage}" + ("*" if stage.endswith("_") else ""))
    recorded = (run.results or {}).get("stage")
    if recorded and not recorded.startswith(stage):
        raise BadInput(f"{flag} {path} records stage {recorded}, not {stage}")
    if run.status not in statuses:
        raise BadInput(f"{flag} {path} is {run.status}" + (f" ({run.reason})" if run.reason else "")
                       + f", not {' or '.join(map(str, statuses))}")
    if need_results and (run.error or run.results is None):
        raise BadInput(f"{flag} {path} has no readable results" + (f": {run.error}" if run.error else ""))
    return run
