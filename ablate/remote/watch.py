"""Watch remote tmux sessions until each one completes, crashes, or the box stays unreachable.

    VAST_HOST=ssh4.vast.ai VAST_PORT=31234 REMOTE_SESSION=stage3b COMPLETE_FILE=runs/.complete-stage3b \
        scripts/local/wait_or_crash.sh

Exit codes: 0 completed (completion file present); 1 crashed (session gone
without the completion file, or a failure marker); 3 unreachable for longer
than the grace window; 2 bad usage or configuration (including authentication
and host-key failures, which are fatal at once, and a session never launched
there: no tmux session and no ``.ablate-remote/NAME`` state in the work dir).
Each poll is one short remote command, which doubles as the liveness probe:
paramiko's keepalive alone does not notice a dead host.
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import dataclass

from ablate.remote.ssh import STATE_DIR, Box, Connection, Fatal, Unreachable, check_session

COMPLETED, CRASHED, UNREACHABLE, USAGE = 0, 1, 3, 2
NEVER_LAUNCHED = USAGE  # a wrong host, work dir or session name, not a crash
RUNNING = "running"


@dataclass
class SessionState:
    name: str
    complete_file: str
    outcome: int | None = None
    detail: str = ""
    heartbeat_age: float | None = None
    last_line: str = ""
    seen_alive: bool = False  # a session started by hand leaves no state; once seen, its end is a crash


def probe_command(box: Box, s: SessionState) -> str:
    q = shlex.quote
    state = box.path(f"{STATE_DIR}/{s.name}")
    return "; ".join([
        f"cd {q(box.workdir)} 2>/dev/null",
        f"tmux has-session -t {q('=' + s.name)} 2>/dev/null && echo ALIVE=1 || echo ALIVE=0",
        f"test -f {q(box.path(s.complete_file))} && echo COMPLETE=1 || echo COMPLETE=0",
        f"echo FAILED=$(cat {q(state + '/failed')} 2>/dev/null)",
        f"echo HEARTBEAT=$(cat {q(state + '/heartbeat')} 2>/dev/null)",
        " || ".join(f"test -e {q(state + '/' + f)}" for f in ("run.sh", "log", "heartbeat"))
        + " && echo STATE=1 || echo STATE=0",
        "echo NOW=$(date +%s)",
        f"echo LAST=$(tail -n 1 {q(state + '/log')} 2>/dev/null | tr -d '\\r' | cut -c1-160)",
    ])


def parse(out: str) -> dict:
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def log_tail(conn: Connection, s: SessionState, lines: int = 20) -> str:
    box = conn.box
    state = box.path(f"{STATE_DIR}/{s.name}")
    code, out, _ = conn.run(f"tail -n {lines} {shlex.quote(state + '/log')} 2>/dev/null || "
                            f"tmux capture-pane -p -t {shlex.quote('=' + s.name)} 2>/dev/null | tail -n {lines}")
    return out.rstrip()


def update(conn: Connection, s: SessionState) -> None:
    v = parse(conn.run(probe_command(conn.box, s))[1])
    hb, now = v.get("HEARTBEAT", ""), v.get("NOW", "")
    s.heartbeat_age = float(now) - float(hb) if hb.isdigit() and now.isdigit() else None
    s.last_line = v.get("LAST", "")
    s.seen_alive = s.seen_alive or v.get("ALIVE") == "1"
    if v.get("COMPLETE") == "1":
        s.outcome, s.detail = COMPLETED, "completion file present"
    elif v.get("FAILED"):
        s.outcome, s.detail = CRASHED, f"command exited with code {v['FAILED']}"
    elif not s.seen_alive and v.get("STATE") != "1":
        box = conn.box
        s.outcome, s.detail = NEVER_LAUNCHED, (f"no session {s.name} was ever launched in {box.workdir} on "
                                               f"{box.host}:{box.port} (no tmux session, no {STATE_DIR}/{s.name})")
    elif v.get("ALIVE") != "1":
        s.outcome, s.detail = CRASHED, "tmux session is gone and there is no completion file"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def watch(box: Box, sessions: list[tuple[str, str]], poll: float = 30, max_poll: float = 600, grace: float = 900,
          echo=print, on_done=None) -> int:
    """Poll until every session has an outcome; returns the exit code (worst outcome wins)."""
    states = [SessionState(check_session(name), complete) for name, complete in sessions]
    conn = Connection(box)
    started = time.monotonic()
    unreachable_since: float | None = None
    backoff, interval = 1.0, poll
    while True:
        try:
            if conn.client is None:
                conn.connect()
                if unreachable_since is not None:
                    echo(f"[{_clock(time.monotonic() - started)}] reconnected to {box.host}:{box.port}")
            for s in states:
                if s.outcome is None:
                    update(conn, s)
                    if s.outcome is not None:
                        if s.outcome == CRASHED:
                            s.detail += "\n--- last lines of the remote log ---\n" + log_tail(conn, s)
                        if on_done and s.outcome != NEVER_LAUNCHED:
                            on_done(conn, s)
            unreachable_since, backoff = None, 1.0
        except Fatal as exc:
            echo(f"fatal: {exc}")
            return USAGE
        except Unreachable as exc:
            conn.close()
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > grace:
                echo(f"unreachable for {_clock(now - unreachable_since)} (grace {grace:g}s): {exc}")
                return UNREACHABLE
            # Exponential backoff with jitter, capped by the poll interval.
            wait = min(backoff, interval) * (0.5 + random.random() / 2)
            echo(f"[{_clock(now - started)}] {box.host}:{box.port} unreachable ({exc}); retrying in {wait:.1f}s")
            time.sleep(wait)
            backoff *= 2
            continue
        elapsed = _clock(time.monotonic() - started)
        for s in states:
            hb = f"{s.heartbeat_age:.0f}s ago" if s.heartbeat_age is not None else "none"
            status = {COMPLETED: "completed", CRASHED: "CRASHED", NEVER_LAUNCHED: "never launched",
                      None: RUNNING}[s.outcome]
            echo(f"[{elapsed}] {s.name}: {status}, heartbeat {hb}, last log: {s.last_line}")
        if all(s.outcome is not None for s in states):
            for s in states:
                if s.outcome != COMPLETED:
                    echo(f"{s.name}: {s.detail}")
            conn.close()
            return max(s.outcome for s in states)
        time.sleep(interval)
        interval = min(interval * 2, max_poll)  # sparse polling for long trusted runs
