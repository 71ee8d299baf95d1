"""`ablate remote status|logs|stop|vast`: every session launched from this folder, on every box, at a glance.

    ablate remote status && ablate remote logs stage3b --lines 50 && ablate remote stop stage3b

The sessions come from the local record that `ablate remote launch` writes
(``.ablate/sessions/``); each box is asked once, with the options the session was
launched with and a short timeout, and a box that does not answer does not stop
the table. With a Vast instance id in the record, a silent box is triaged
through the Vast API (``VAST_API_KEY``). Everything a box sends is printed as
plain text, one line per session.
"""

from __future__ import annotations

import getpass
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Optional

import typer

from ablate.cli.remote import remote_app
from ablate.errors import BadInput

FLEET_TIMEOUT = typer.Option(5.0, "--timeout", help="seconds for each box to answer (connect and each command)")
SESSION_HOST = typer.Option(None, "--host", help="the box, when the session name was launched on several")
SESSION_PORT = typer.Option(None, "--port", help="the box's SSH port, with --host")


def _plain(text: str, limit: int = 200) -> str:
    """One line from a box, safe for a terminal (escapes shown, not obeyed), at most ``limit`` characters."""
    from ablate.remote.watch import printable

    return printable(text.replace("\n", " "))[:limit].rstrip()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def _state_dir(box, session: str) -> str:
    from ablate.remote.ssh import STATE_DIR

    return box.path(f"{STATE_DIR}/{session}")


def _session_state(conn, record) -> tuple[str, float | None, str]:
    """``(state, heartbeat age on the box's clock, last log line)`` from one probe of the session."""
    from ablate.remote.watch import COMPLETED, CRASHED, NEVER_LAUNCHED, STOPPED, SessionState, update

    conn.box = replace(conn.box, workdir=record.workdir)  # one connection per box, sessions in several work dirs
    s = SessionState(record.session, record.complete_file)
    update(conn, s)
    if s.outcome == COMPLETED:
        state = "completed"
    elif s.outcome == STOPPED:
        state = "stopped by you"
    elif s.outcome == CRASHED:
        code = s.detail.rsplit(" ", 1)[-1] if "exited with code" in s.detail else ""
        state = f"crashed (exit {_plain(code, 8)})" if code else "crashed (session gone)"
    elif s.outcome == NEVER_LAUNCHED:
        state = "never launched"
    elif s.outcome is None:
        state = "running"
    else:  # an outcome this table does not know yet: its own words
        state = _plain(s.detail, 40)
    return state, s.heartbeat_age, s.last_line[:80]


def _provider_state(record, why: str) -> str:
    """The state of a session whose box does not answer; asks Vast when the record names an instance."""
    from ablate.remote.vast import STOPPED, instance, state_of

    if record.vast_instance is None:
        return why
    try:
        status = state_of(instance(record.vast_instance))
    except BadInput as exc:
        return f"{why} (Vast: {_plain(str(exc), 60)})"
    return f"stopped by the provider (Vast: {status})" if status in STOPPED else f"{why} (Vast: {status})"


def _ask_box(records, timeout: float) -> list[tuple]:
    """One connection to one box; a row ``(record, state, heartbeat age, last line)`` per session there."""
    from ablate.remote.sessions import box_of
    from ablate.remote.ssh import Connection, Fatal, Unreachable

    conn = Connection(box_of(records[0], timeout))
    try:
        conn.connect()
    except Fatal as exc:
        return [(r, f"refused: {_plain(str(exc), 60)}", None, "") for r in records]
    except Unreachable:
        return [(r, _provider_state(r, "unreachable"), None, "") for r in records]
    rows = []
    try:
        for r in records:
            try:
                rows.append((r, *_session_state(conn, r)))
            except Unreachable:
                conn.close()
                rows.append((r, _provider_state(r, "unreachable"), None, ""))
                try:
                    conn.connect()
                except (Fatal, Unreachable):
                    pass
    finally:
        conn.close()
    return rows


def _table(rows: list[tuple]) -> list[str]:
    header = ("SESSION", "BOX", "WORKDIR", "STATE", "HEARTBEAT", "LAUNCHED", "LAST LOG LINE")
    cells = [header] + [(r.session, r.box_label, r.workdir, state, _age(age),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(r.launched_at)), last or "-")
                        for r, state, age, last in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    return ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]


@remote_app.command("status", epilog="Example:\n\n  ablate remote status\n\nStates: running, completed, "
                    "crashed (exit N), stopped by you, never launched, unreachable, stopped by the provider "
                    "(sessions launched with --vast-instance; needs VAST_API_KEY).")
def remote_status(timeout: float = FLEET_TIMEOUT):
    """One line per session launched from this folder, on every box: its state, heartbeat, last log line."""
    from ablate.cli.remote import _check_seconds
    from ablate.remote.sessions import SESSIONS_DIR, load_all

    _check_seconds(timeout=timeout)
    records = load_all()
    if not records:
        typer.echo(f"no sessions recorded in {SESSIONS_DIR} (`ablate remote launch` records them)")
        return
    boxes: dict[tuple, list] = {}
    for r in records:
        boxes.setdefault((r.host, r.port, r.user, r.key, r.known_hosts), []).append(r)
    with ThreadPoolExecutor(max_workers=min(8, len(boxes))) as pool:  # a silent box costs one timeout, not one each
        answers = list(pool.map(lambda group: _ask_box(group, timeout), boxes.values()))
    order = {id(r): i for i, r in enumerate(records)}
    rows = sorted((row for answer in answers for row in answer), key=lambda row: order[id(row[0])])
    for line in _table(rows):
        typer.echo(line.rstrip())


def _connect_to(record, timeout: float):
    """A connection to the session's box; exit 3 with Vast's verdict when it does not answer."""
    from ablate.remote.sessions import box_of
    from ablate.remote.ssh import Connection, Fatal, Unreachable
    from ablate.remote.vast import triage

    try:
        return Connection(box_of(record, timeout)).connect()
    except Fatal as exc:
        raise BadInput(str(exc)) from None
    except Unreachable as exc:
        typer.echo(f"ablate: {record.host}:{record.port} unreachable: {exc}", err=True)
        if record.vast_instance is not None:
            typer.echo(f"ablate: {triage(record.vast_instance)}", err=True)
        raise typer.Exit(3)


@remote_app.command("logs", epilog="Example:\n\n  ablate remote logs stage3b --lines 100")
def remote_logs(
    session: str = typer.Argument(..., help="a session launched from this folder (see `ablate remote status`)"),
    lines: int = typer.Option(40, "--lines", "-n", help="how many lines from the end of the log"),
    host: Optional[str] = SESSION_HOST, port: Optional[int] = SESSION_PORT, timeout: float = FLEET_TIMEOUT,
):
    """The end of a session's log on its box, found through the local record of the launch."""
    from ablate.cli.remote import _check_seconds
    from ablate.remote.sessions import find
    from ablate.remote.ssh import Unreachable

    if not 1 <= lines <= 100_000:
        raise BadInput(f"--lines must be in 1..100000, got {lines}")
    _check_seconds(timeout=timeout)
    record = find(session, host, port)
    conn = _connect_to(record, timeout)
    log = f"{_state_dir(conn.box, record.session)}/log"
    try:
        code, out, _ = conn.run(f"tail -n {lines} {shlex.quote(log)}", timeout=max(timeout, 30.0))
    except Unreachable as exc:
        typer.echo(f"ablate: lost {record.host}:{record.port} while reading the log: {exc}", err=True)
        raise typer.Exit(3)
    finally:
        conn.close()
    if code != 0:
        raise BadInput(f"no log at {log} on {record.box_label}")
    for line in out.rstrip("\n").split("\n") if out.strip() else []:
        # a progress bar redraws its line with \r: show its last state, as a terminal would
        typer.echo(_plain(line.rstrip("\r").split("\r")[-1], 2000))


@remote_app.command("stop", epilog="Example:\n\n  ablate remote stop stage3b\n\nThe box keeps "
                    ".ablate-remote/SESSION/stopped, so watch and status say 'stopped by you', not 'crashed'.")
def remote_stop(
    session: str = typer.Argument(..., help="a session launched from this folder (see `ablate remote status`)"),
    host: Optional[str] = SESSION_HOST, port: Optional[int] = SESSION_PORT, timeout: float = FLEET_TIMEOUT,
):
    """Stop a running session on its box: mark it stopped, then kill its tmux session."""
    from ablate.cli.remote import _check_seconds
    from ablate.remote.sessions import find
    from ablate.remote.ssh import Unreachable
    from ablate.remote.watch import STOPPED_MARKER

    _check_seconds(timeout=timeout)
    record = find(session, host, port)
    conn = _connect_to(record, timeout)
    q = shlex.quote
    target = q("=" + record.session)
    try:
        conn.box = replace(conn.box, workdir=record.workdir)
        if conn.run(f"tmux has-session -t {target}")[0] != 0:
            state = _session_state(conn, record)[0]
            raise BadInput(f"session {session} on {record.box_label} is not running ({state}); nothing to stop")
        state_dir = _state_dir(conn.box, record.session)
        marker = q(f"{state_dir}/{STOPPED_MARKER}")
        who = q(f"{int(time.time())} by {getpass.getuser()}@{socket.gethostname()}")
        # The marker first: the session's end must never read as a crash, even if the kill races its exit.
        conn.check(f"mkdir -p {q(state_dir)} && echo {who} > {marker}.tmp && mv -f {marker}.tmp {marker}")
        conn.run(f"tmux kill-session -t {target}")
        if conn.run(f"tmux has-session -t {target}")[0] == 0:
            raise BadInput(f"tmux session {session} on {record.box_label} is still there after kill-session")
    except Unreachable as exc:
        typer.echo(f"ablate: lost {record.host}:{record.port} while stopping {session}: {exc}", err=True)
        raise typer.Exit(3)
    finally:
        conn.close()
    typer.echo(f"stopped {session} on {record.box_label}; {state_dir}/{STOPPED_MARKER} on the box says so")


@remote_app.command("vast", epilog="Example:\n\n  eval \"$(VAST_API_KEY=... ablate remote vast 1234 | head -n 2)\" "
                    "&& scripts/local/wait_or_crash.sh")
def remote_vast(instance_id: str = typer.Argument(..., help="the Vast instance id (console.vast.ai, Instances)")):
    """Where a Vast instance's SSH answers (VAST_HOST, VAST_PORT) and what Vast says about it (needs VAST_API_KEY)."""
    from ablate.remote.vast import address_of, instance, verdict

    row = instance(instance_id)
    address = address_of(row)
    if address is None:
        raise BadInput(f"{verdict(instance_id, row)}; it has no SSH address yet")
    typer.echo(f"VAST_HOST={address[0]}\nVAST_PORT={address[1]}")
    typer.echo(verdict(instance_id, row))
