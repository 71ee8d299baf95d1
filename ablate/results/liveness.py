"""Is the writer of a ``running`` run still alive? Judged without trusting clocks to agree across machines.

    python -c "from ablate.results.liveness import writer_gone; print(writer_gone('runs/stage3_finetune_causal/RUN'))"

``process.json`` names the writer (host, pid, start time, attempt, heartbeat). On
this host the pid tells. A run written on a rented box is judged by what a sync
(or a push) recorded in the run's local ``.remote.json``: the box's own answer
whether that process lives, and the heartbeat's age on the box's clock.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from ablate.results.files import read_json

PROCESS_FILE = "process.json"
REMOTE_FILE = ".remote.json"  # local only: what a sync or a push last learnt about the writer on another host


def heartbeat_seconds() -> float:
    return max(1.0, float(os.environ.get("ABLATE_HEARTBEAT_SECONDS", "30")))


def stale_seconds() -> float:
    """A run on another host whose heartbeat was older than this at a sync (box's clock) is taken for crashed."""
    return max(120.0, 4 * heartbeat_seconds())


def writer_gone(run_dir: Path) -> tuple[bool, str]:
    """``(gone, why)`` for the writer of a ``running`` run.

    On this host the pid and its start time tell. On another host this machine's clock says nothing (the box's
    may be minutes off): the verdict comes from evidence a sync or a push recorded in ``.remote.json``, the
    box's own answer whether the process lives and the heartbeat's age measured on the box's clock.
    """
    import psutil

    proc, error = read_json(run_dir / PROCESS_FILE)
    if proc is None:
        return True, error or "no process record (process.json) for a running run"
    host, pid = proc.get("host"), proc.get("pid")
    if host == platform.node():
        try:
            alive = abs(psutil.Process(int(pid)).create_time() - float(proc["started"])) < 1.0
        except (psutil.Error, KeyError, TypeError, ValueError):
            alive = False
        age = time.time() - float(proc.get("heartbeat") or 0)
        return (False, "") if alive else (True, f"its process (pid {pid} on {host}) is gone; last heartbeat "
                                                f"{age:.0f} s ago")
    seen, _ = read_json(run_dir / REMOTE_FILE)
    if not seen or seen.get("host") != host or seen.get("pid") != pid or (
            seen.get("attempt") and proc.get("attempt") and seen["attempt"] != proc["attempt"]):
        return False, f"running on {host} (pid {pid}) as far as this machine knows: no sync has checked it since"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(seen.get("synced_at") or 0)))
    if seen.get("alive") is False:
        return True, seen.get("why") or f"{seen.get('box') or host} said at {when} that its process (pid {pid}) is gone"
    age = seen.get("heartbeat_age")
    if isinstance(age, (int, float)) and age > stale_seconds():
        return True, (f"no heartbeat on {host} for {age:.0f} s at the sync of {when} "
                      "(measured on the box's own clock)")
    shown = f"{age:.0f} s" if isinstance(age, (int, float)) else "of unknown age"
    return False, f"running on {host}, heartbeat {shown} old at {when}"
