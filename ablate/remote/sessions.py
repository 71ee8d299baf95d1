"""The local record of launched sessions: one JSON file per session and box under ``.ablate/sessions/``.

    ablate remote status   # reads every record written by `ablate remote launch` in this folder

A record holds what it takes to find the session again (box, user, key, absolute
work directory on the box, known_hosts, completion file), the command as
launched, when, and the Vast instance id when one was given. Values passed with
``--env`` are never recorded, only their names. Files are written atomically,
mode 0600, in a folder of mode 0700; they are read back as untrusted data (a
file that is not a valid record is skipped with a warning).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ablate.errors import BadInput
from ablate.remote.ssh import SESSION_NAME, Box
from ablate.results.files import read_json, write_json

log = logging.getLogger(__name__)
SESSIONS_DIR = Path(".ablate") / "sessions"


@dataclass(frozen=True)
class SessionRecord:
    session: str
    host: str
    port: int
    user: str
    key: str | None  # private key file on this machine, or None for the agent and ~/.ssh
    workdir: str  # absolute on the box
    known_hosts: str
    complete_file: str  # relative to the work directory, or absolute
    command: list  # the command as launched, as strings
    launched_at: float  # local epoch
    env_names: list  # names passed with --env; their values are never written here
    vast_instance: int | None = None

    @property
    def box_label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _check(data: dict) -> SessionRecord:
    """A record from a file's JSON, or ValueError saying which field is wrong."""
    def need(name, ok, what):
        if not ok(data.get(name)):
            raise ValueError(f"{name} must be {what}, got {str(data.get(name))[:60]!r}")

    def text(v):
        return isinstance(v, str) and v != "" and not any(ord(c) < 32 for c in v)

    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    need("session", lambda v: isinstance(v, str) and SESSION_NAME.match(v), "a session name")
    need("host", text, "a host name")
    need("port", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535, "a port")
    need("user", text, "a user name")
    need("key", lambda v: v is None or text(v), "a key file or null")
    need("workdir", lambda v: text(v) and v.startswith("/"), "an absolute path on the box")
    need("known_hosts", text, "a known_hosts file")
    need("complete_file", text, "a path")
    need("command", strings, "a list of strings")
    need("env_names", lambda v: strings(v) and all(x.isidentifier() for x in v), "a list of variable names")
    need("launched_at", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "an epoch")
    need("vast_instance", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
         "an instance id or null")
    return SessionRecord(**{f.name: data.get(f.name) for f in fields(SessionRecord)})


def _file_name(session: str, host: str, port: int) -> str:
    # Readable, one file per session and box; the digest keeps two hosts that read alike apart.
    readable = re.sub(r"[^A-Za-z0-9.-]", "_", host)[:60]
    digest = hashlib.sha256(f"{host}:{port}".encode()).hexdigest()[:8]
    return f"{session}@{readable}-{port}-{digest}.json"


def _folder(root: Path | None) -> Path:
    return Path(root) if root is not None else SESSIONS_DIR


def record_launch(*, session: str, host: str, port: int, user: str, key: str | None, workdir: str,
                  known_hosts: str, complete_file: str, command: list, env_names=(), vast_instance: int | None = None,
                  launched_at: float | None = None, root: Path | None = None) -> Path:
    """Write (or replace: a relaunch of one session name on one box) the record of a launch; its path.

    ``workdir`` is the absolute work directory on the box (``Connection.box.workdir`` after ``connect``);
    a field of the wrong type or shape is a ValueError (a caller's bug, not the user's input).
    """
    record = _check({
        "session": session, "host": host, "port": port, "user": user,
        "key": str(Path(key).expanduser().resolve()) if key else None, "workdir": workdir,
        "known_hosts": str(Path(known_hosts).expanduser().resolve()), "complete_file": complete_file,
        "command": [str(c) for c in command], "env_names": sorted(set(env_names)),
        "launched_at": time.time() if launched_at is None else launched_at,
        "vast_instance": int(vast_instance) if vast_instance is not None else None,  # `--vast-instance 1234`
    })
    folder = _folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # key paths and commands are nobody else's business
    path = folder / _file_name(session, host, port)
    write_json(path, asdict(record))  # a temporary file from mkstemp: mode 0600, renamed into place
    path.chmod(0o600)
    return path


def record_box_launch(box: Box, session: str, command: list, complete_file: str,
                      vast_instance: int | None = None, root: Path | None = None) -> Path:
    """``record_launch`` from the connected ``Box`` of a launch (its work directory already absolute)."""
    return record_launch(session=session, host=box.host, port=box.port, user=box.user, key=box.key,
                         workdir=box.workdir, known_hosts=box.known_hosts, complete_file=complete_file,
                         command=command, env_names=list(box.env), vast_instance=vast_instance, root=root)


def load_all(root: Path | None = None) -> list[SessionRecord]:
    """Every readable record, oldest launch first; unreadable or malformed files are skipped with a warning."""
    folder = _folder(root)
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        data, why = read_json(path)
        if data is None:
            log.warning("skipped session record %s", why or f"{path}: unreadable")
            continue
        try:
            records.append(_check(data))
        except ValueError as exc:
            log.warning("skipped session record %s: %s", path, exc)
    return sorted(records, key=lambda r: (r.launched_at, r.session, r.host, r.port))


def find(session: str, host: str | None = None, port: int | None = None,
         root: Path | None = None) -> SessionRecord:
    """The one record of ``session`` (on ``host``/``port`` when given); BadInput when none or several."""
    every = [r for r in load_all(root) if r.session == session]
    matches = [r for r in every if (host is None or r.host == host) and (port is None or r.port == port)]
    if not matches:
        where = "".join([f" on {host}" if host else "", f" port {port}" if port else ""])
        others = f" (it was launched on {', '.join(r.box_label for r in every)})" if every else ""
        raise BadInput(f"no session {session}{where} recorded in {_folder(root)}{others}; "
                       "`ablate remote status` lists the sessions launched from this folder")
    if len(matches) > 1:
        boxes = ", ".join(f"{r.box_label} ({r.workdir})" for r in matches)
        raise BadInput(f"session {session} was launched on several boxes: {boxes}; pass --host (and --port)")
    return matches[0]


def box_of(record: SessionRecord, timeout: float = 15.0) -> Box:
    """The connection settings the session was launched with (an unknown host key is never pinned here)."""
    return Box(host=record.host, port=record.port, user=record.user, key=record.key, workdir=record.workdir,
               known_hosts=record.known_hosts, timeout=timeout)
