"""`ablate remote launch|watch|sync`: run stages on a rented GPU box in tmux, watch them, sync results home.

    ablate remote --help
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from ablate.cli.console import fail as _fail
from ablate.cli.console import refresh_status as _refresh_status
from ablate.errors import BadInput


def _check_seconds(**values: float) -> None:
    """Every interval is a finite number of seconds, at least 1 (0 would poll in a busy loop)."""
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 1):
            _fail(f"--{name.replace('_', '-')} must be at least 1 (seconds), got {value:g}")


def print_sync(result, box, runs_dir, verbose: bool = True) -> None:
    """What a sync did, one line per run or file that needs the user's eyes, then the counts."""
    for rel, why in result.skipped.items() if verbose else ():
        typer.echo(f"skipped {rel}: {why}")
    for rel, why in result.refused.items():  # keys are repr()'d already: control characters shown, not obeyed
        typer.echo(f"refused {rel} from {box.host}: {why}")
    for remote, local in result.relocated.items():
        typer.echo(f"run {remote} from {box.host} is kept in {Path(runs_dir) / local}: "
                   f"{Path(runs_dir) / remote} here is another run")
    for local, why in result.behind.items():
        typer.echo(f"kept {Path(runs_dir) / local} as it is: {why}")
    for remote, why in result.diverged.items():
        typer.echo(f"DIVERGED: {remote} on {box.host}: {why}")
    moved = (f", {result.bytes_transferred / 1e6:.1f} MB over {result.transport}" if result.bytes_transferred
             else "")
    typer.echo(f"synced {len(result.copied)} file(s) from {box.host}:{box.port} into {runs_dir}; "
               f"{len(result.unchanged)} unchanged" + (f", {len(result.skipped)} still being written"
                                                       if result.skipped else "") + moved)


remote_app = typer.Typer(help="Run stages on rented GPU boxes: launch in tmux, watch, sync results home, push a run to another box, status of every session.",
                         no_args_is_help=True, rich_markup_mode=None)

HOST = typer.Option(None, "--host", envvar="VAST_HOST", help="SSH host of the box (env VAST_HOST)")
PORT = typer.Option(22, "--port", envvar="VAST_PORT", help="SSH port (env VAST_PORT)")
USER = typer.Option("root", "--user", envvar="VAST_USER", help="SSH user (env VAST_USER)")
KEY = typer.Option(None, "--key", envvar="SSH_KEY", help="private key file (env SSH_KEY; default: agent and ~/.ssh)")
WORKDIR = typer.Option("ablate", "--workdir", envvar="REMOTE_WORKDIR",
                       help="work directory on the box, absolute or relative to the login directory (env REMOTE_WORKDIR)")
TOFU = typer.Option(False, "--trust-on-first-use", help="pin an unknown box's host key in .ablate/known_hosts")
TIMEOUT = typer.Option(15.0, "--timeout", help="seconds for connect, banner, auth and each remote command")
VAST = typer.Option(None, "--vast-instance", envvar="VAST_INSTANCE",
                    help="a Vast instance id: host and port from the Vast API (VAST_API_KEY), and Vast's own "
                         "status when the box does not answer (needs ablate[vast])")
KNOWN = typer.Option(".ablate/known_hosts", "--known-hosts", envvar="ABLATE_KNOWN_HOSTS",
                     help="project known_hosts file (checked with ~/.ssh/known_hosts; --trust-on-first-use pins here)")


def _one_host(host):
    """``--host`` once: a second one would silently win over the first (watch several boxes by session name)."""
    hosts = [h for h in (host or []) if h]
    if len(hosts) > 1:
        _fail(f"--host given {len(hosts)} times ({', '.join(hosts)}); one box per call, or watch sessions "
              "launched with ablate by their --session names alone")
    if not hosts:
        _fail("--host is required (or VAST_HOST)")
    return hosts[0]


def connection_flags(box, complete_file: str | None = None, session: str | None = None) -> str:
    """The options that reach ``box`` again, as a user types them (never an --env value)."""
    import shlex

    from ablate.remote.ssh import PROJECT_KNOWN_HOSTS

    parts = ["--host", box.host, "--port", str(box.port)]
    parts += ["--user", box.user] if box.user != "root" else []
    parts += ["--key", box.key] if box.key else []
    parts += ["--workdir", box.workdir] if box.workdir != "ablate" else []
    parts += ["--known-hosts", box.known_hosts] if Path(box.known_hosts) != PROJECT_KNOWN_HOSTS else []
    parts += ["--timeout", f"{box.timeout:g}"] if box.timeout != 15.0 else []
    parts += ["--session", session] if session else []
    parts += ["--complete-file", complete_file] if complete_file else []
    return shlex.join(parts)


def _box(host, port, user, key, workdir, tofu, timeout, known_hosts, env=(), vast_instance=None):
    from ablate.remote.ssh import Box

    if vast_instance and not host:
        from ablate.remote import vast

        host, port = vast.ssh_address(vast_instance)
    host = _one_host(host) if isinstance(host, list) else host
    if not host:
        _fail("--host is required (or VAST_HOST, or --vast-instance)")
    if not 1 <= port <= 65535:
        _fail(f"--port must be in 1..65535, got {port}")
    _check_seconds(timeout=timeout)
    pairs = {}
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            _fail(f"--env expects NAME=VALUE, got '{item}'")
        pairs[name] = value
    if key and not Path(key).expanduser().is_file():
        _fail(f"SSH key file not found: {key}")
    return Box(host=host, port=port, user=user, key=str(Path(key).expanduser()) if key else None, workdir=workdir,
               trust_on_first_use=tofu, timeout=timeout, known_hosts=known_hosts, env=pairs)


def _connect(box, vast_instance=None):
    from ablate.remote.ssh import Connection, Fatal, Unreachable

    try:
        return Connection(box).connect()
    except Fatal as exc:
        _fail(str(exc))
    except Unreachable as exc:
        verdict = f"; {_triage_for(vast_instance)()}" if vast_instance else ""
        typer.echo(f"ablate: {box.host}:{box.port} unreachable: {exc}{verdict}", err=True)
        raise typer.Exit(3)


@contextmanager
def connected(box, doing: str, vast_instance=None):
    """One connection for one command; a box lost on the way is exit 3, with Vast's word when there is an instance."""
    from ablate.remote.ssh import Unreachable

    conn = _connect(box, vast_instance)
    try:
        yield conn
    except Unreachable as exc:
        verdict = f"; {_triage_for(vast_instance)()}" if vast_instance else ""
        typer.echo(f"ablate: lost {box.host}:{box.port} during {doing}: {exc}{verdict}", err=True)
        raise typer.Exit(3)
    finally:
        conn.close()


@remote_app.command("launch", epilog="Example:\n\n  ablate remote launch --host ssh4.vast.ai --port 31234 "
                    "--session stage3b -- ablate stage3 --mask prefill_bidir")
def remote_launch(
    command: List[str] = typer.Argument(None, help="the command to run on the box, after --"),
    session: str = typer.Option(..., "--session", envvar="REMOTE_SESSION", help="tmux session name"),
    complete_file: Optional[str] = typer.Option(None, "--complete-file", envvar="COMPLETE_FILE",
                                                help="completion file on the box (default runs/.complete-SESSION)"),
    env: Optional[List[str]] = typer.Option(None, "--env", help="NAME=VALUE passed to the command (repeatable)"),
    heartbeat_seconds: int = typer.Option(30, help="how often the box touches the heartbeat file"),
    copy: bool = typer.Option(True, "--copy/--no-copy", help="copy the project's code to the work directory"),
    host: Optional[List[str]] = HOST, port: int = PORT, user: str = USER, key: Optional[str] = KEY, workdir: str = WORKDIR,
    trust_on_first_use: bool = TOFU, timeout: float = TIMEOUT, known_hosts: str = KNOWN,
    vast_instance: Optional[str] = VAST,
):
    """Copy the code to the box and start a command in a detached tmux session there."""
    from ablate.remote.ssh import launch

    box = _box(host, port, user, key, workdir, trust_on_first_use, timeout, known_hosts, env or (), vast_instance)
    _check_seconds(heartbeat_seconds=heartbeat_seconds)
    from ablate.remote.sessions import record_box_launch

    with connected(box, "launch", vast_instance) as conn:
        info = launch(conn, Path.cwd(), session, list(command or []),
                      complete_file or f"runs/.complete-{session}", heartbeat_seconds, copy)
        # What `remote status`, `watch --session` alone, `logs` and `stop` find the session by (no --env values).
        record_box_launch(conn.box, session, list(command or []), info["complete_file"], vast_instance=vast_instance)
    typer.echo(f"launched '{session}' on {box.host}:{box.port} in {info['workdir']} (code copied by {info['copied']})")
    source = info.get("source")
    if source:
        typer.echo(f"code: {source['git_sha'] or 'not a git checkout'}" + (" + uncommitted changes "
                   f"(diff sha256 {source['diff_sha256'][:12]})" if source.get("git_dirty") else ""))
    typer.echo(f"log: {info['log']}\ncompletion file: {info['complete_file']}")
    flags = connection_flags(conn.box, complete_file, session)  # the work dir as resolved on the box
    typer.echo(f"watch: ablate remote watch {flags}")
    typer.echo(f"sync:  ablate remote sync {connection_flags(conn.box)}")


@remote_app.command("watch", epilog="Example:\n\n  ablate remote watch --host ssh4.vast.ai --port 31234 "
                    "--session stage3a --session stage3b\n\nExit codes: 0 completed, 1 crashed, "
                    "3 unreachable past the grace window, 2 bad usage or configuration, or a session "
                    "never launched there (no tmux session and no .ablate-remote/SESSION in the work dir).")
def remote_watch(
    session: List[str] = typer.Option(..., "--session", envvar="REMOTE_SESSION", help="tmux session (repeatable)"),
    complete_file: Optional[str] = typer.Option(None, "--complete-file", envvar="COMPLETE_FILE",
                                                help="completion file on the box (default runs/.complete-SESSION)"),
    poll_seconds: float = typer.Option(30, "--poll-seconds", envvar="POLL_SECONDS", help="first poll interval"),
    max_poll_seconds: float = typer.Option(600, "--max-poll-seconds", envvar="MAX_POLL_SECONDS",
                                           help="the interval doubles up to this (sparse polling)"),
    grace_seconds: float = typer.Option(900, "--grace-seconds", envvar="GRACE_SECONDS",
                                        help="how long the box may be unreachable before exit 3"),
    sync_results: bool = typer.Option(True, "--sync/--no-sync", help="sync results when a session ends"),
    runs_dir: str = typer.Option("runs", help="local runs folder to sync into"),
    host: Optional[List[str]] = HOST, port: int = PORT, user: str = USER, key: Optional[str] = KEY, workdir: str = WORKDIR,
    trust_on_first_use: bool = TOFU, timeout: float = TIMEOUT, known_hosts: str = KNOWN,
    vast_instance: Optional[str] = VAST,
):
    """Poll remote sessions until each completes (0), crashes (1) or the box is lost (3)."""
    from ablate.remote.ssh import check_session
    from ablate.remote.sync import sync
    from ablate.remote.watch import SessionState, Target, watch

    _check_seconds(poll_seconds=poll_seconds, max_poll_seconds=max_poll_seconds, grace_seconds=grace_seconds)
    if max_poll_seconds < poll_seconds:
        _fail(f"--max-poll-seconds ({max_poll_seconds:g}) must be at least --poll-seconds ({poll_seconds:g})")
    if complete_file and len(session) > 1:
        _fail("--complete-file names one file; with several sessions each uses runs/.complete-SESSION")
    names = [check_session(s) for s in session]
    if host or vast_instance:
        box = _box(host, port, user, key, workdir, trust_on_first_use, timeout, known_hosts, (), vast_instance)
        targets = [Target(box, [SessionState(n, complete_file or f"runs/.complete-{n}") for n in names],
                          triage=_triage_for(vast_instance))]
    else:  # sessions on any number of boxes, each found in the record `ablate remote launch` keeps
        targets = _targets_from_record(names, complete_file)

    def on_done(conn, state):
        if sync_results:
            try:
                result = sync(conn, Path(runs_dir))
            except BadInput as exc:  # the session's outcome still decides the exit code
                typer.echo(f"nothing synced: {exc}")
                return
            print_sync(result, conn.box, runs_dir, verbose=False)
            _refresh_status(runs_dir)

    code = watch(targets, poll=poll_seconds, max_poll=max_poll_seconds, grace=grace_seconds,
                 echo=typer.echo, on_done=on_done)
    raise typer.Exit(code)


def _targets_from_record(names, complete_file):
    from ablate.remote import sessions
    from ablate.remote.watch import SessionState, Target

    boxes = {}
    for name in names:
        record = sessions.find(name)
        box = sessions.box_of(record)
        key = (box.host, box.port, box.user, box.workdir)
        target = boxes.setdefault(key, Target(box, [], triage=_triage_for(record.vast_instance)))
        target.sessions.append(SessionState(name, complete_file or record.complete_file))
    return list(boxes.values())


def _triage_for(instance):
    if not instance:
        return None

    def triage():
        from ablate.remote import vast

        return vast.triage(instance)

    return triage


@remote_app.command("sync", epilog="Example:\n\n  ablate remote sync --host ssh4.vast.ai --port 31234")
def remote_sync(
    runs_dir: str = typer.Option("runs", help="local runs folder"),
    remote_runs: str = typer.Option("runs", help="runs folder on the box (relative to the work directory)"),
    with_checkpoints: bool = typer.Option(False, "--with-checkpoints", help="also pull checkpoints and final models"),
    host: Optional[List[str]] = HOST, port: int = PORT, user: str = USER, key: Optional[str] = KEY, workdir: str = WORKDIR,
    trust_on_first_use: bool = TOFU, timeout: float = TIMEOUT, known_hosts: str = KNOWN,
    vast_instance: Optional[str] = VAST,
):
    """Pull the runs' metrics, summaries, configs, samples and logs from the box."""
    from ablate.remote.sync import sync

    box = _box(host, port, user, key, workdir, trust_on_first_use, timeout, known_hosts, (), vast_instance)
    with connected(box, "sync", vast_instance) as conn:
        result = sync(conn, Path(runs_dir), remote_runs, with_checkpoints)
    print_sync(result, conn.box, runs_dir)
    _refresh_status(runs_dir)


@remote_app.command("push", epilog="Example (the box of a stage 3 run is gone; continue on another):\n\n"
                    "  ablate remote push runs/stage3_finetune_prefill_bidir/20260214-201019 --lost "
                    "--host ssh5.vast.ai --port 40022\n\n"
                    "  ablate remote launch --host ssh5.vast.ai --port 40022 --session stage3b-resume -- "
                    "ablate stage3 --resume --run-dir runs/stage3_finetune_prefill_bidir/20260214-201019")
def remote_push(
    run_dir: Path = typer.Argument(..., help="the local run folder to copy (checkpoints included)"),
    lost: bool = typer.Option(False, "--lost", help="the run's box is gone: the copy reads crashed there, so "
                                                    "--resume may take it over"),
    remote_runs: str = typer.Option("runs", help="runs folder on the box (relative to the work directory)"),
    host: Optional[List[str]] = HOST, port: int = PORT, user: str = USER, key: Optional[str] = KEY,
    workdir: str = WORKDIR, trust_on_first_use: bool = TOFU, timeout: float = TIMEOUT, known_hosts: str = KNOWN,
    vast_instance: Optional[str] = VAST,
):
    """Copy a local run to a box, at the same relative path, so that it can be resumed there."""
    from ablate.remote.push import prepare, push

    box = _box(host, port, user, key, workdir, trust_on_first_use, timeout, known_hosts, (), vast_instance)
    prepared = prepare(run_dir, lost)
    with connected(box, "push", vast_instance) as conn:
        info = push(conn, prepared, remote_runs)
    typer.echo(f"pushed {info['files']} file(s) of {run_dir} to {box.host}:{box.port}:{info['remote']} "
               f"({info['how']})")
    if info["verdict"]:
        typer.echo(f"the copy there reads crashed: {info['verdict']['why']}")
    if info["resume"]:
        typer.echo(f"resume: ablate remote launch {connection_flags(conn.box)} --session <name> -- {info['resume']}")
