"""A rented box played on loopback: a real OpenSSH server and tmux, optionally with a hostname of its own.

    cd tests && python -c "from sshbox import Server; import pathlib, tempfile; s = Server(pathlib.Path(tempfile.mkdtemp()), 'box-one'); print(s.port); s.stop()"

``Server(root, hostname=...)`` runs sshd inside its own UTS namespace (``unshare -u``),
so every process a connection starts (tmux, the stages, their heartbeats) sees that
hostname, as on another machine. Its sessions get their own tmux server
(``TMUX_TMPDIR`` set by sshd's ``SetEnv``), so two boxes never share one.
Root only (as in CI and on Vast boxes); ``.ci/run`` installs openssh-server, tmux and rsync.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
AVAILABLE = Path(SSHD).exists() and bool(shutil.which("tmux")) and os.geteuid() == 0
WHY_NOT = "needs OpenSSH server, tmux and root (installed by .ci/run)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, hostname: str | None = None, setenv: dict | None = None):
        self.root, self.port, self.hostname = Path(root), free_port(), hostname
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmux_dir = self.root / "tmux"
        self.tmux_dir.mkdir(exist_ok=True)
        for name in ("host_key", "client_key", "other_key"):
            if not (self.root / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)],
                               check=True)
        shutil.copy(self.root / "client_key.pub", self.root / "authorized_keys")
        env = {"TMUX_TMPDIR": str(self.tmux_dir), **(setenv or {})}
        (self.root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin yes", "Subsystem sftp internal-sftp", "LogLevel ERROR",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()), ""]))
        host_pub = (self.root / "host_key.pub").read_text().split()
        other_pub = (self.root / "other_key.pub").read_text().split()
        (self.root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (self.root / "wrong_known_hosts").write_text(f"[127.0.0.1]:{self.port} {other_pub[0]} {other_pub[1]}\n")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.start()

    @property
    def key(self) -> str:
        return str(self.root / "client_key")

    @property
    def known_hosts(self) -> str:
        return str(self.root / "known_hosts")

    @property
    def user(self) -> str:
        return getpass.getuser()

    def start(self):
        log = open(self.root / "sshd.log", "a")  # the readiness probe makes sshd complain; keep it out of the output
        sshd = [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")]
        if self.hostname:
            sshd = ["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *sshd]
        self.proc = subprocess.Popen(sshd, start_new_session=True, stderr=log, stdout=log)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def stop(self):
        """The box is lost: the listener, every connection it forked, and its tmux server with what runs there."""
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    @property
    def tmux_env(self) -> dict:
        """The environment that reaches this box's tmux server from this machine."""
        return {**os.environ, "TMUX_TMPDIR": str(self.tmux_dir)}

    def kill_tmux(self):
        """Everything running in this box's tmux server dies at once (a preempted instance)."""
        subprocess.run(["tmux", "kill-server"], env=self.tmux_env, capture_output=True)

    def flags(self, workdir: str, *extra) -> list[str]:
        """The connection options of every `ablate remote` command for this box."""
        return ["--host", "127.0.0.1", "--port", str(self.port), "--user", self.user, "--key", self.key,
                "--workdir", workdir, "--timeout", "5", "--known-hosts", self.known_hosts, *map(str, extra)]


def make_run(path: Path, uid, status="completed", files=()):
    """A run folder as ablate writes it (``uid=None``: without run.json, a run sync refuses)."""
    import json

    path.mkdir(parents=True)
    if uid:
        (path / "run.json").write_text(json.dumps({"uid": uid, "stage": path.parent.name, "created": 0, "host": "h"}))
    (path / "status.txt").write_text(status + "\n")
    for name, content in dict(files).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)


def hashes(root: Path) -> dict:
    """Every regular file under ``root`` by its sha256 (what a test compares before and after)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.is_symlink()}
