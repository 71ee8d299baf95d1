"""Losing a box: copy a local run, checkpoints included, to another box, where ``--resume`` continues it.

    ablate remote push runs/stage3_finetune_prefill_bidir/20260214-201019 --host ssh5.vast.ai --port 40022

The run lands at the same relative path under the box's runs folder, so the
resume command is the one you would type at home. A run that this machine
still believes alive on its box is refused unless ``--lost`` declares that box
lost; the pushed copy then carries that verdict (``.remote.json``), so the new
box reads the run as crashed and ``ablate stage3 --resume`` may take it over.
Nothing is written over a run the box already holds.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from pathlib import Path

from ablate.errors import BadInput
from ablate.remote.ssh import Connection
from ablate.results import rundir
from ablate.results.files import read_json


def run_files(run_dir: Path) -> list[str]:
    """Every regular file of the run, relative to it; dot files (the lock, local records, temporaries) stay home."""
    files = []
    for path in sorted(Path(run_dir).rglob("*")):
        rel = path.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
            continue
        files.append(rel.as_posix())
    return files


def _verdict(run: rundir.Run, lost: bool) -> dict | None:
    """The record the pushed copy carries about its writer on the old box; None for a run that has ended."""
    if rundir.read_status(run.path)[0] != rundir.RUNNING:
        return None
    proc, _ = read_json(run.path / rundir.PROCESS_FILE)
    proc = proc or {}
    if proc.get("host") == platform.node() and run.status == rundir.RUNNING:
        raise BadInput(f"{run.path} is being written on this machine right now (pid {proc.get('pid')}); "
                       "stop it before pushing it elsewhere")
    if run.status == rundir.RUNNING and not lost:
        raise BadInput(f"{run.path} is {run.reason or 'running'}; if that box is gone, pass --lost to declare it "
                       "lost, or `ablate remote sync` it first for fresh evidence")
    why = (f"declared lost by `ablate remote push --lost` from {platform.node()} at "
           f"{time.strftime('%Y-%m-%d %H:%M:%S')}" if run.status == rundir.RUNNING else
           f"{run.reason} (as known to {platform.node()} when it pushed the run)")
    return {"host": proc.get("host"), "pid": proc.get("pid"), "attempt": proc.get("attempt"), "alive": False,
            "why": why, "synced_at": time.time()}


def prepare(run_dir: Path, lost: bool = False) -> tuple[rundir.Run, dict | None]:
    """The run to push and what its copy will say of its old writer; checked here before any connection."""
    run = rundir.load_run(Path(run_dir))
    if run is None:
        raise BadInput(f"{run_dir} is not a run directory (runs/<stage>/<YYYYmmdd-HHMMSS>/ with a status.txt)")
    if not run.uid:
        raise BadInput(f"{run_dir} has no run.json uid (removed or damaged); a sync could not tell its copies apart")
    return run, _verdict(run, lost)


def push(conn: Connection, prepared: tuple[rundir.Run, dict | None], remote_runs: str = "runs") -> dict:
    from ablate.remote.transfer import push_files

    run, verdict = prepared
    box = conn.box
    rel = f"{remote_runs.strip('/')}/{run.stage}/{run.path.name}"
    remote = box.path(rel)
    code, out, _ = conn.run(f"cat {shlex.quote(remote + '/' + rundir.RUN_FILE)} 2>/dev/null || "
                            f"test ! -e {shlex.quote(remote)}")
    if code != 0 or out.strip():
        try:
            theirs = json.loads(out).get("uid")
        except (ValueError, AttributeError):
            theirs = None
        same = "this run" if theirs == run.uid else "another run"
        raise BadInput(f"{box.host}:{box.port} already holds {same} at {remote}; nothing pushed"
                       + ("; `ablate remote sync` brings its state home" if theirs == run.uid else ""))
    files = run_files(run.path)
    moved = push_files(conn, run.path, files, remote)
    if verdict is not None:
        sftp = conn.sftp()
        try:
            with sftp.open(f"{remote}/{rundir.REMOTE_FILE}", "w") as fh:
                fh.write(json.dumps({**verdict, "box": f"{platform.node()} (push)"}))
        finally:
            sftp.close()
    return {"remote": remote, "relative": rel, "files": len(files), "how": moved, "verdict": verdict,
            "resume": f"ablate stage3 --resume --run-dir {rel}" if run.stage.startswith(rundir.STAGE3_PREFIX) else None}
