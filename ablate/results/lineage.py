"""One history per run: of two copies of a run (this machine's, a box's), which is further along, or did they part.

    python -c "from ablate.results.lineage import compare; print(compare('runs/s/20250101-000000', 'runs/s/20250101-000000-box'))"

A run's lineage is its ``history.jsonl``: one line per attempt (the start and
each ``--resume``), each with the checkpoint step it started from. Two copies
with the same attempts are one history at two moments: the one with more steps
is ahead, then a terminal status over ``running``, then the newer heartbeat
(comparable only within one attempt: one host, one clock). When one copy's
attempts are a strict prefix of the other's, the longer one continued the
shorter one, unless the shorter one's last attempt went on to a result past the
step the longer one resumed from: then the longer one was resumed from a state
the shorter one had left behind, and the two diverged. Anything else diverged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ablate.results.rundir import COMPLETED, DIVERGED as DIVERGED_STATUS, FAILED, GATED, HISTORY_FILE, PROCESS_FILE, \
    STATUS_FILE

TRAIN_LOG = "train_log.jsonl"
LINEAGE_FILES = (HISTORY_FILE, STATUS_FILE, PROCESS_FILE, TRAIN_LOG)  # every file a verdict reads
TERMINAL = tuple(str(s) for s in (COMPLETED, FAILED, DIVERGED_STATUS, GATED))  # the run store's own statuses
# Outcomes `--resume` refuses to continue: a later attempt that started from an earlier step cannot have built on them.
RESULTS = tuple(str(s) for s in (COMPLETED, GATED, DIVERGED_STATUS))
SAME, AHEAD, BEHIND, DIVERGED = "same", "ahead", "behind", "diverged"


def _json_lines(path: Path):
    try:
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a file still being appended
                if isinstance(row, dict):
                    yield row
    except OSError:
        return


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_history(run_dir: Path) -> list[dict]:
    """The run's attempts, oldest first (empty for a run made before ``history.jsonl`` existed)."""
    attempts = []
    for row in _json_lines(Path(run_dir) / HISTORY_FILE):
        if isinstance(row.get("attempt"), str) and row["attempt"]:
            from_step = _number(row.get("from_step"))
            attempts.append({**row, "from_step": int(from_step) if from_step and from_step > 0 else 0})
    return attempts


@dataclass(frozen=True)
class Progress:
    attempts: tuple[str, ...]
    from_steps: tuple[int, ...]
    status: str  # first line of status.txt ("unknown" when absent)
    step: int  # the largest "step" in train_log.jsonl, 0 when there is none
    heartbeat: float | None
    writer: tuple | None  # who wrote the heartbeat: (attempt,) or (host, pid, started) for older records

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def describe(self) -> str:
        return f"{self.status} at step {self.step}" + (f" (attempt {len(self.attempts)})" if self.attempts else "")


def progress(run_dir: Path) -> Progress:
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    try:
        lines = (run_dir / STATUS_FILE).read_text(errors="replace").splitlines()
        status = lines[0].strip() if lines else "unknown"
    except OSError:
        status = "unknown"
    steps = (_number(row.get("step")) for row in _json_lines(run_dir / TRAIN_LOG))
    step = int(max((s for s in steps if s is not None), default=0))
    try:
        proc = json.loads((run_dir / PROCESS_FILE).read_bytes())
    except (OSError, ValueError):
        proc = None
    proc = proc if isinstance(proc, dict) else {}
    writer = None
    if isinstance(proc.get("attempt"), str) and proc["attempt"]:
        writer = (proc["attempt"],)
    elif proc.get("host") is not None and proc.get("pid") is not None:
        writer = (str(proc.get("host")), str(proc.get("pid")), str(proc.get("started")))
    return Progress(tuple(h["attempt"] for h in history), tuple(h["from_step"] for h in history), status, step,
                    _number(proc.get("heartbeat")), writer)


def _snapshots(local: Progress, remote: Progress) -> str:
    """Two moments of one history (same attempts): which is later."""
    if remote.step != local.step:
        return AHEAD if remote.step > local.step else BEHIND
    if remote.terminal != local.terminal:
        return AHEAD if remote.terminal else BEHIND
    comparable = (local.writer is not None and local.writer == remote.writer
                  and local.heartbeat is not None and remote.heartbeat is not None)
    if comparable and remote.heartbeat != local.heartbeat:
        return AHEAD if remote.heartbeat > local.heartbeat else BEHIND
    return SAME if remote.status == local.status else DIVERGED


def verdict(local: Progress, remote: Progress) -> str:
    """The remote copy relative to the local one: 'same', 'ahead', 'behind' or 'diverged'."""
    if local.attempts == remote.attempts:
        return _snapshots(local, remote)
    remote_longer = len(remote.attempts) > len(local.attempts)
    short, long = (local, remote) if remote_longer else (remote, local)
    if long.attempts[:len(short.attempts)] != short.attempts:
        return DIVERGED
    resumed_from = long.from_steps[len(short.attempts)]
    if short.attempts and short.step > resumed_from and short.status in RESULTS:
        return DIVERGED  # the shorter one reached a result the longer one never built on
    return AHEAD if remote_longer else BEHIND


def compare(local_dir: Path, remote_copy_dir: Path) -> str:
    """The box's copy (in ``remote_copy_dir``) relative to the local run folder: same, ahead, behind or diverged."""
    return verdict(progress(local_dir), progress(remote_copy_dir))
