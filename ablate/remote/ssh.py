"""SSH to a rented GPU box and launch a command in a detached tmux session there.

    ablate remote launch --host ssh4.vast.ai --port 31234 --session stage3b -- ablate stage3 --mask prefill_bidir

One paramiko connection with timeouts on connect, banner, auth and every
command. Host keys are verified against known_hosts (the user's and the
project's ``.ablate/known_hosts``); ``--trust-on-first-use`` pins an unknown
box's key into the project file, never a changed one. Every remote argument is
shell-quoted. On the box, a generated wrapper runs the command, touches a
heartbeat, writes the completion file only on success (temporary file, then
rename) and a failure marker with the exit code otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import paramiko

from ablate.errors import BadInput

log = logging.getLogger(__name__)
PROJECT_KNOWN_HOSTS = Path(".ablate") / "known_hosts"
SESSION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATE_DIR = ".ablate-remote"  # per-session wrapper, log, heartbeat and markers, inside the work dir
# Not copied to the box: outputs, caches, environments (git's ignore rules apply too).
COPY_EXCLUDES = ("runs", ".venv", ".git", ".cache", "__pycache__", ".ablate", ".pytest_cache", STATE_DIR)


class Unreachable(Exception):
    """The box did not answer (network, refused, timeout): worth retrying."""


class Fatal(Exception):
    """Authentication or host-key failure: retrying cannot help."""


@dataclass(frozen=True)
class Box:
    host: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    workdir: str = "ablate"
    trust_on_first_use: bool = False
    known_hosts: str = str(PROJECT_KNOWN_HOSTS)
    timeout: float = 15.0
    env: dict = field(default_factory=dict)

    def path(self, relative: str) -> str:
        """A remote path: absolute as given, else inside the work directory."""
        return relative if relative.startswith("/") else f"{self.workdir.rstrip('/')}/{relative}"


def check_session(name: str) -> str:
    if not SESSION_NAME.match(name):
        raise BadInput(f"session name {name!r} must be 1-64 letters, digits, '-' or '_' "
                       "(tmux treats '.' and ':' as separators)")
    return name


class Connection:
    """A paramiko SSH client with timeouts everywhere; ``run`` raises Unreachable or Fatal."""

    def __init__(self, box: Box):
        self.box = box
        self.client: paramiko.SSHClient | None = None

    def connect(self) -> "Connection":
        self.close()
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        project = Path(self.box.known_hosts)
        if project.is_file():
            client.load_host_keys(str(project))  # also where new keys are saved
        if self.box.trust_on_first_use:
            project.parent.mkdir(parents=True, exist_ok=True)
            project.touch(exist_ok=True)
            client.load_host_keys(str(project))
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.box.host, port=self.box.port, username=self.box.user, key_filename=self.box.key,
                timeout=self.box.timeout, banner_timeout=self.box.timeout, auth_timeout=self.box.timeout,
                channel_timeout=self.box.timeout, allow_agent=self.box.key is None,
                look_for_keys=self.box.key is None,
            )
        except paramiko.BadHostKeyException as exc:
            raise Fatal(f"host key of {self.box.host}:{self.box.port} does not match known_hosts "
                        f"(got {exc.key.get_name()}); refusing to connect") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise Fatal(f"{self.box.host}:{self.box.port} is not in known_hosts; check its key, or pass "
                            "--trust-on-first-use to pin it in .ablate/known_hosts") from None
            if isinstance(exc, paramiko.AuthenticationException):
                raise Fatal(f"authentication to {self.box.user}@{self.box.host}:{self.box.port} failed") from None
            raise Unreachable(f"SSH error: {exc}") from None
        except (OSError, socket.timeout, EOFError) as exc:
            raise Unreachable(f"{self.box.host}:{self.box.port}: {exc or type(exc).__name__}") from None
        if self.box.trust_on_first_use:
            client.save_host_keys(str(self.box.known_hosts))
        transport = client.get_transport()
        transport.set_keepalive(15)
        self.client = client
        self.box = replace(self.box, workdir=self._absolute_workdir())
        return self

    def _absolute_workdir(self) -> str:
        """The work directory as an absolute path on the box.

        Commands start in the login directory, SFTP too; a relative ``--workdir`` (the default ``ablate``)
        is resolved against it once, so every later path means the same file to tmux, the shell and SFTP.
        """
        workdir = self.box.workdir
        if workdir.startswith("/"):
            return workdir.rstrip("/") or "/"
        home = self.check("pwd").strip()
        if not home.startswith("/"):
            raise Unreachable(f"the box answered 'pwd' with {home[:80]!r}")
        rest = workdir[2:] if workdir.startswith("~/") else ("" if workdir == "~" else workdir)
        return f"{home.rstrip('/')}/{rest}".rstrip("/") or "/"

    def run(self, command: str, timeout: float | None = None) -> tuple[int, str, str]:
        """Run a shell command on the box; ``(exit code, stdout, stderr)``."""
        if self.client is None or not (self.client.get_transport() and self.client.get_transport().is_active()):
            raise Unreachable("not connected")
        try:
            _, out, err = self.client.exec_command(command, timeout=timeout or self.box.timeout)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), stdout, stderr
        except (paramiko.SSHException, OSError, socket.timeout, EOFError) as exc:
            self.close()
            raise Unreachable(f"command failed in transit: {exc or type(exc).__name__}") from None

    def check(self, command: str, timeout: float | None = None) -> str:
        code, out, err = self.run(command, timeout)
        if code != 0:
            raise BadInput(f"remote command failed ({code}): {err.strip().splitlines()[-1] if err.strip() else out}")
        return out

    def sftp(self) -> paramiko.SFTPClient:
        sftp = self.client.open_sftp()
        sftp.get_channel().settimeout(self.box.timeout)
        return sftp

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def ssh_command(box: Box) -> list[str]:
    """``ssh`` with the settings paramiko connects with; append the host and a command, or hand it to ``rsync -e``."""
    known = [str(Path(box.known_hosts).expanduser().resolve()), "~/.ssh/known_hosts"]
    quoted = " ".join(f'"{k}"' if " " in k else k for k in known)
    command = ["ssh", "-F", "none", "-p", str(box.port), "-l", box.user, "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={quoted}",
               "-o", f"ConnectTimeout={max(1, int(box.timeout))}", "-o", "ServerAliveInterval=15",
               "-o", "ServerAliveCountMax=4"]
    if box.key:
        command += ["-i", str(box.key), "-o", "IdentitiesOnly=yes"]
    return command


def project_files(root: Path) -> list[str]:
    """The project's files, relative to ``root``: git's view where there is one, minus COPY_EXCLUDES."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=root, capture_output=True, check=True, timeout=30).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return sorted(f for f in files if f.split("/")[0] not in COPY_EXCLUDES and (root / f).is_file())


def copy_code(conn: Connection, root: Path, files: list[str]) -> str:
    """Copy the project's ``files`` to the work dir: rsync over SSH when both ends have it, SFTP otherwise."""
    box = conn.box
    conn.check(f"mkdir -p {shlex.quote(box.workdir)}")
    remote_rsync = conn.run("command -v rsync")[0] == 0
    local_rsync = subprocess.run(["sh", "-c", "command -v rsync"], capture_output=True).returncode == 0
    if remote_rsync and local_rsync:
        host = f"[{box.host}]" if ":" in box.host else box.host
        proc = subprocess.run(["rsync", "-a", "--files-from=-", "-e", shlex.join(ssh_command(box)), "./",
                               f"{host}:{box.workdir}/"],
                              input="\n".join(files).encode(), cwd=root, capture_output=True, timeout=3600)
        if proc.returncode == 0:
            return f"rsync ({len(files)} files)"
        log.warning("rsync failed (%s); copying over SFTP", proc.stderr.decode(errors="replace").strip()[-200:])
    sftp = conn.sftp()
    made = set()
    for f in files:
        parent = str(Path(f).parent)
        if parent != "." and parent not in made:
            conn.check(f"mkdir -p {shlex.quote(box.path(parent))}")
            made.add(parent)
        sftp.put(str(root / f), box.path(f))
    sftp.close()
    return f"sftp ({len(files)} files)"


SECRETS = "secrets"  # --env values: mode 0600 in a 0700 folder, read and deleted by the wrapper before the command


def wrapper_script(box: Box, session: str, command: list[str], complete_file: str, heartbeat_seconds: int) -> str:
    """The script tmux runs on the box. It holds no ``--env`` value: those wait in ``SECRETS`` for a moment."""
    state = box.path(f"{STATE_DIR}/{session}")
    q = shlex.quote
    # `-- ablate stageN ...` means the project's own environment on the box: the venv that set-up made,
    # made on first use when there is none yet.
    setup = ("if [ ! -x .venv/bin/ablate ]; then echo \"ablate: no .venv on this box yet; running "
             "scripts/local/setup.sh first\"; bash scripts/local/setup.sh || exit 91; fi\n"
             if command[0] == "ablate" else "")
    return f"""#!/usr/bin/env bash
# Generated by `ablate remote launch`: runs one command, records how it ended.
cd {q(box.workdir)} || exit 90
state={q(state)}
complete={q(box.path(complete_file))}
if [ -f "$state/{SECRETS}" ]; then . "$state/{SECRETS}"; rm -f "$state/{SECRETS}"; fi
mkdir -p "$(dirname "$complete")"
rm -f "$state/failed" "$state/exit_code" "$complete"
( while true; do date +%s > "$state/heartbeat"; sleep {int(heartbeat_seconds)}; done ) &
heartbeat=$!
{{
{setup}if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
{shlex.join(command)}
}} >> "$state/log" 2>&1 < /dev/null
code=$?
kill "$heartbeat" 2>/dev/null
echo "$code" > "$state/exit_code"
if [ "$code" -eq 0 ]; then
  date +%s > "$complete.tmp" && mv "$complete.tmp" "$complete"
else
  echo "$code" > "$state/failed.tmp" && mv "$state/failed.tmp" "$state/failed"
fi
exit "$code"
"""


def _put_private(sftp, path: str, text: str) -> None:
    """A file only the box's user can read: made empty, chmod 0600, then written (its folder is 0700 too)."""
    with sftp.open(path, "w") as fh:
        sftp.chmod(path, 0o600)
        fh.write(text)


def write_source(conn: Connection, root: Path, files: list[str]) -> dict:
    """Leave the laptop's provenance beside the copied code (read by every run's env.json on the box)."""
    from ablate.results.environment import SOURCE_FILE, source_record

    record = source_record(root, files)
    sftp = conn.sftp()
    try:
        with sftp.open(conn.box.path(SOURCE_FILE + ".tmp"), "w") as fh:
            fh.write(json.dumps(record, indent=1))
        conn.check(f"mv -f {shlex.quote(conn.box.path(SOURCE_FILE + '.tmp'))} "
                   f"{shlex.quote(conn.box.path(SOURCE_FILE))}")
    finally:
        sftp.close()
    return record


def launch(conn: Connection, root: Path, session: str, command: list[str], complete_file: str,
           heartbeat_seconds: int = 30, copy: bool = True) -> dict:
    box = conn.box
    check_session(session)
    if not command:
        raise BadInput("no command given: put it after `--`, e.g. -- ablate stage1")
    if conn.run(f"tmux has-session -t {shlex.quote('=' + session)}")[0] == 0:
        raise BadInput(f"tmux session '{session}' already exists on {box.host}; watch it, or choose another name")
    source = None
    if copy:
        files = project_files(root)
        copied = copy_code(conn, root, files)
        source = write_source(conn, root, files)
    else:
        copied = "not copied"
    state = box.path(f"{STATE_DIR}/{session}")
    q = shlex.quote
    # A relaunched name starts clean: the last run's log, heartbeat and markers would read as this one's.
    conn.check(f"mkdir -p {q(state)} && chmod 700 {q(box.path(STATE_DIR))} {q(state)} && "
               f"rm -f {q(state)}/log {q(state)}/heartbeat {q(state)}/exit_code {q(state)}/failed "
               f"{q(state)}/stopped {q(state)}/{SECRETS}")
    sftp = conn.sftp()
    try:
        with sftp.open(f"{state}/run.sh", "w") as fh:
            fh.write(wrapper_script(box, session, command, complete_file, heartbeat_seconds))
        sftp.chmod(f"{state}/run.sh", 0o700)
        if box.env:
            _put_private(sftp, f"{state}/{SECRETS}", "".join(f"export {k}={q(v)}\n" for k, v in box.env.items()))
    finally:
        sftp.close()
    # `env -u TMUX`: a box whose login shell already runs inside tmux (Vast does) must not nest.
    # tmux hands its command string to sh -c: quote the path once for tmux's shell, once for ours.
    wrapper = shlex.quote("bash " + shlex.quote(state + "/run.sh"))
    conn.check(f"env -u TMUX tmux new-session -d -s {shlex.quote(session)} {wrapper}")
    return {"session": session, "copied": copied, "wrapper": f"{state}/run.sh", "workdir": box.workdir,
            "complete_file": box.path(complete_file), "log": f"{state}/log", "source": source}
