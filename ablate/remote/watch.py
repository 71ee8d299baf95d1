"""Watch remote tmux sessions until each one completes, crashes, or the box stays unreachable.

    VAST_HOST=ssh4.vast.ai VAST_PORT=31234 REMOTE_SESSION=stage3b COMPLETE_FILE=runs/.complete-stage3b \
        scripts/local/wait_or_crash.sh

Exit codes: 0 completed (completion file present); 1 crashed (session gone
without the completion file, or a failure marker); 3 unreachable for longer
than the grace window; 4 stopped with ``ablate remote stop``; 2 bad usage or
configuration (including authentication and host-key failures, which are fatal
at once, a session never launched there: no tmux session and no
``.ablate-remote/NAME`` state in the work dir, and a session that runs from
another work dir than the one watched). Sessions on several boxes are watched
in one call; the worst outcome decides the exit code. Each poll is one short
remote command, which doubles as the liveness probe: paramiko's keepalive alone
does not notice a dead host.
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import dataclass
from typing import Callable

from ablate.remote.ssh import STATE_DIR, Box, Connection, Fatal, Unreachable

COMPLETED, CRASHED, UNREACHABLE, USAGE, STOPPED = 0, 1, 3, 2, 4
NEVER_LAUNCHED = USAGE  # a wrong host, work dir or session name, not a crash
RUNNING = "running"
STOPPED_MARKER = "stopped"  # written into .ablate-remote/NAME/ by `ablate remote stop`
SEVERITY = {COMPLETED: 0, STOPPED: 1, CRASHED: 2, USAGE: 3, UNREACHABLE: 4}  # several sessions: the worst decides
LABELS = {COMPLETED: "completed", CRASHED: "CRASHED", NEVER_LAUNCHED: "never launched", UNREACHABLE: "UNREACHABLE",
          STOPPED: "stopped by you", None: RUNNING}


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
        f"test -e {q(state + '/' + STOPPED_MARKER)} && echo STOPPED=1 || echo STOPPED=0",
        f"echo START=$(tmux display-message -p -t {q('=' + s.name + ':')} '#{{pane_start_command}}' 2>/dev/null "
        "| tr -d '\\r\\n' | cut -c1-400)",
        f"echo HEARTBEAT=$(cat {q(state + '/heartbeat')} 2>/dev/null)",
        " || ".join(f"test -e {q(state + '/' + f)}" for f in ("run.sh", "log", "heartbeat"))
        + " && echo STATE=1 || echo STATE=0",
        "echo NOW=$(date +%s)",
        f"echo LAST=$(tail -n 1 {q(state + '/log')} 2>/dev/null | tr -d '\\r' | cut -c1-160)",
    ])


def printable(text: str) -> str:
    """A box's text made safe for a terminal: escape sequences and other control characters shown, not obeyed."""
    return "".join(c if c == "\n" or (c.isprintable() and c != "\x1b") else repr(c)[1:-1] for c in text)


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
    return printable(out.rstrip())


def update(conn: Connection, s: SessionState) -> None:
    v = parse(conn.run(probe_command(conn.box, s))[1])
    hb, now = v.get("HEARTBEAT", ""), v.get("NOW", "")
    s.heartbeat_age = float(now) - float(hb) if hb.isdigit() and now.isdigit() else None
    s.last_line = printable(v.get("LAST", ""))
    s.seen_alive = s.seen_alive or v.get("ALIVE") == "1"
    box = conn.box
    ours = f"{box.path(STATE_DIR)}/{s.name}/run.sh"
    start = printable(v.get("START", ""))
    if v.get("ALIVE") == "1" and f"/{STATE_DIR}/{s.name}/run.sh" in start and ours not in start:
        # tmux sessions belong to the user, not to a folder: this one was launched from another work dir
        s.outcome, s.detail = NEVER_LAUNCHED, (f"session {s.name} on {box.host}:{box.port} runs {start.strip(chr(34))}, "
                                               f"not from {box.workdir}: watch it with that --workdir")
    elif v.get("COMPLETE") == "1":
        s.outcome, s.detail = COMPLETED, "completion file present"
    elif v.get("STOPPED") == "1" and v.get("ALIVE") != "1":
        s.outcome, s.detail = STOPPED, "stopped with `ablate remote stop`"
    elif v.get("FAILED"):
        s.outcome, s.detail = CRASHED, f"command exited with code {printable(v['FAILED'][:40])}"
    elif not s.seen_alive and v.get("STATE") != "1":
        s.outcome, s.detail = NEVER_LAUNCHED, (f"no session {s.name} was ever launched in {box.workdir} on "
                                               f"{box.host}:{box.port} (no tmux session, no {STATE_DIR}/{s.name})")
    elif v.get("ALIVE") != "1":
        s.outcome, s.detail = CRASHED, "tmux session is gone and there is no completion file"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Target:
    """One box and the sessions watched on it, with its own connection and unreachable clock."""
    box: Box
    sessions: list[SessionState]
    triage: Callable[[], str] | None = None  # the provider's word on a box that does not answer (Vast)
    conn: Connection | None = None
    unreachable_since: float | None = None
    backoff: float = 1.0
    retry_at: float = 0.0

    def pending(self) -> list[SessionState]:
        return [s for s in self.sessions if s.outcome is None]

    def end_all(self, outcome: int, detail: str) -> None:
        for s in self.pending():
            s.outcome, s.detail = outcome, detail


def _poll(t: Target, started: float, echo, on_done, grace: float, interval: float) -> bool:
    """Poll one box once; True when its sessions were read (False: unreachable, retry scheduled)."""
    box = t.box
    try:
        if t.conn.client is None:
            t.conn.connect()
            if t.unreachable_since is not None:
                echo(f"[{_clock(time.monotonic() - started)}] reconnected to {box.host}:{box.port}")
        for s in t.pending():
            update(t.conn, s)
            if s.outcome is not None:
                if s.outcome == CRASHED:
                    s.detail += "\n--- last lines of the remote log ---\n" + log_tail(t.conn, s)
                if on_done and s.outcome in (COMPLETED, CRASHED, STOPPED):
                    on_done(t.conn, s)
        t.unreachable_since, t.backoff = None, 1.0
        return True
    except Fatal as exc:
        echo(f"fatal: {exc}")
        t.end_all(USAGE, str(exc))
        return False
    except Unreachable as exc:
        t.conn.close()
        now = time.monotonic()
        t.unreachable_since = t.unreachable_since or now
        if now - t.unreachable_since > grace:
            verdict = ""
            if t.triage is not None:
                try:
                    verdict = f"; {t.triage()}"
                except Exception as why:  # the provider's API is a second opinion; its failure must not hide the first
                    verdict = f"; the provider could not be asked ({why})"
            t.end_all(UNREACHABLE, f"{box.host}:{box.port} unreachable for {_clock(now - t.unreachable_since)} "
                                   f"(grace {grace:g}s): {exc}{verdict}")
            echo(f"{box.host}:{box.port}: unreachable for {_clock(now - t.unreachable_since)} (grace {grace:g}s): "
                 f"{exc}{verdict}")
            return False
        wait = min(t.backoff, interval) * (0.5 + random.random() / 2)  # exponential backoff with jitter
        echo(f"[{_clock(now - started)}] {box.host}:{box.port} unreachable ({exc}); retrying in {wait:.1f}s")
        t.retry_at, t.backoff = now + wait, t.backoff * 2
        return False


def watch(targets: list[Target], poll: float = 30, max_poll: float = 600, grace: float = 900,
          echo=print, on_done=None) -> int:
    """Poll every box until each session has an outcome; returns the exit code (worst outcome wins)."""
    for t in targets:
        t.conn = t.conn or Connection(t.box)
    started = time.monotonic()
    interval, next_poll = poll, 0.0
    while True:
        now = time.monotonic()
        due = [t for t in targets if t.pending() and (t.unreachable_since is None and now >= next_poll
                                                       or t.unreachable_since is not None and now >= t.retry_at)]
        read = [t for t in due if _poll(t, started, echo, on_done, grace, interval)]
        elapsed = _clock(time.monotonic() - started)
        for t in read:
            for s in t.sessions:
                hb = f"{s.heartbeat_age:.0f}s ago" if s.heartbeat_age is not None else "none"
                where = f" on {t.box.host}:{t.box.port}" if len(targets) > 1 else ""
                echo(f"[{elapsed}] {s.name}{where}: {LABELS[s.outcome]}, heartbeat {hb}, last log: {s.last_line}")
        if any(t.unreachable_since is None for t in due):
            next_poll = time.monotonic() + interval
            interval = min(interval * 2, max_poll)  # sparse polling for long trusted runs
        if not any(t.pending() for t in targets):
            for t in targets:
                for s in t.sessions:
                    if s.outcome != COMPLETED:
                        echo(f"{s.name}: {s.detail}")
                t.conn.close()
            return max((s.outcome for t in targets for s in t.sessions), key=SEVERITY.__getitem__)
        waits = [t.retry_at for t in targets if t.pending() and t.unreachable_since is not None]
        waits += [next_poll] if any(t.pending() and t.unreachable_since is None for t in targets) else []
        time.sleep(max(0.0, min(waits) - time.monotonic()))
