"""Several boxes and Vast: python -m pytest tests/test_remote_fleet.py -q

Boxes are real OpenSSH servers with tmux on 127.0.0.1, each with its own hostname
(tests/sshbox.py). Vast's API cannot be reached here: a local http.server answers
the one endpoint that vastai 1.9.1's ``show_instance`` requests
(``GET /api/v0/instances/ID/?owner=me``) with responses of the documented shape.
"""

import json
import logging
import os
import re
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

import ablate.cli.remote_fleet  # noqa: F401 - registers status/logs/stop/vast on `ablate remote`
from ablate.cli import app
from ablate.remote import vast
from ablate.remote.sessions import SESSIONS_DIR, box_of, find, load_all, record_launch
from ablate.errors import BadInput

from sshbox import AVAILABLE, WHY_NOT, Server, free_port

runner = CliRunner()
KEY = "vast-test-key-7f3a9c21"  # must never appear in any output or file


def instance_row(id, actual, intended="running", cur="running", msg="", **extra):
    """An instance as GET /api/v0/instances/ID/ returns it (fields trimmed to the ones of interest)."""
    return {"id": id, "machine_id": 8123, "actual_status": actual, "intended_status": intended, "cur_state": cur,
            "next_state": cur, "status_msg": msg, "image_runtype": "ssh_proxy", "ssh_host": "ssh4.vast.ai",
            "ssh_idx": "4", "ssh_port": 31234, "public_ipaddr": "203.0.113.7",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]}, "start_date": 1767225600.5,
            "extra_env": [["JUPYTER_DIR", "/"]], "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.41,
            "label": None, **extra}


INSTANCES = {
    1001: instance_row(1001, "running", msg="success, running pytorch/pytorch_2.5.1-cuda12.4/ssh"),
    1002: instance_row(1002, "exited", cur="stopped", msg="Instance stopped: outbid"),
    1003: instance_row(1003, "offline"),
    1004: instance_row(1004, "loading", msg="Pulling image: 3.1GB/8.2GB"),
    1005: instance_row(1005, "exited", intended="stopped", cur="stopped"),
    1006: instance_row(1006, None, msg="\x1b[31mscheduling\x1b[0m"),
    1007: instance_row(1007, "running", image_runtype="jupyter_proxy ssh_proxy"),
    1008: instance_row(1008, "running", ssh_host=None, ssh_port=None),
    1009: instance_row(1009, "loading", ssh_host=None, ssh_port=None, ports={}),
}


class VastAPI(BaseHTTPRequestHandler):
    requests = []

    def do_GET(self):
        url = urlsplit(self.path)
        VastAPI.requests.append(self.path)
        match = re.fullmatch(r"/api/v0/instances/(\d+)/", url.path)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.answer(401, {"success": False, "error": "invalid_api_key", "msg": "Invalid user key"})
        if not match or parse_qs(url.query) != {"owner": ["me"]}:
            return self.answer(404, {"success": False, "error": "not_found"})
        number = int(match.group(1))
        if number == 404404:
            return self.answer(404, {"success": False, "error": "no_such_instance"})
        self.answer(200, {"instances": INSTANCES.get(number)})

    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def vast_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), VastAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def vast_env(vast_api, monkeypatch):
    monkeypatch.setenv("VAST_URL", vast_api)
    monkeypatch.setenv("VAST_API_KEY", KEY)
    return {"VAST_URL": vast_api, "VAST_API_KEY": KEY}


@pytest.fixture(scope="module")
def boxes(tmp_path_factory):
    if not AVAILABLE:
        pytest.skip(WHY_NOT)
    servers = [Server(tmp_path_factory.mktemp(f"sshd{i}"), hostname=f"box-{i}") for i in (1, 2)]
    yield servers
    for s in servers:
        s.kill_tmux()
        s.stop()


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    return root


def cli(*args, cwd, env=None):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(old)


def launch(server, workdir, session, *command, project, vast_instance=None, env=()):
    """`ablate remote launch` as documented, then its record (what the launch writes, written directly here)."""
    env_flags = [x for item in env for x in ("--env", item)]
    result = cli("remote", "launch", *server.flags(workdir), "--session", session, "--no-copy",
                 "--heartbeat-seconds", "1", *env_flags, "--", *command, cwd=project)
    assert result.exit_code == 0, result.output
    return record_launch(session=session, host="127.0.0.1", port=server.port, user=server.user, key=server.key,
                         workdir=str(workdir), known_hosts=server.known_hosts, complete_file=f"runs/.complete-{session}",
                         command=list(command), env_names=[e.split("=")[0] for e in env],
                         vast_instance=vast_instance, root=project / SESSIONS_DIR)


def wait_for(path: Path, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def table(output: str) -> dict:
    """``session -> its status line``."""
    return {line.split()[0]: line for line in output.splitlines()[1:]}


def test_a_record_holds_the_launch_and_no_secret(boxes, project, tmp_path, caplog):
    box = boxes[0]
    workdir = tmp_path / "work"
    path = launch(box, workdir, "rec1", "sh", "-c", 'echo "$HF_TOKEN" > /dev/null', project=project,
                  env=["HF_TOKEN=hf_secret_value_123"])
    assert path.parent == project / SESSIONS_DIR
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert data["env_names"] == ["HF_TOKEN"] and "hf_secret_value_123" not in path.read_text()
    assert data["workdir"] == str(workdir) and data["port"] == box.port and data["vast_instance"] is None
    assert data["command"] == ["sh", "-c", 'echo "$HF_TOKEN" > /dev/null'] and data["launched_at"] > 0
    again = launch(box, workdir, "rec1", "true", project=project)  # a relaunch on the same box replaces it
    assert again == path and [r.command for r in load_all(project / SESSIONS_DIR)] == [["true"]]
    record = find("rec1", root=project / SESSIONS_DIR)
    got = box_of(record)
    assert (got.host, got.port, got.user, got.key, got.workdir) == ("127.0.0.1", box.port, box.user, box.key,
                                                                  str(workdir))
    assert got.trust_on_first_use is False  # status never pins a key the launch did not
    # local files are still read as data: broken or mistyped ones are skipped with a warning
    (path.parent / "broken.json").write_text("{not json")
    (path.parent / "typed.json").write_text(json.dumps({**data, "port": "22; rm -rf /", "session": "x"}))
    (path.parent / "relative.json").write_text(json.dumps({**data, "session": "rel1", "workdir": "ablate"}))
    with caplog.at_level(logging.WARNING, logger="ablate.remote.sessions"):
        assert [r.session for r in load_all(project / SESSIONS_DIR)] == ["rec1"]
    assert len([r for r in caplog.records if r.name == "ablate.remote.sessions"]) == 3
    assert "port must be a port" in caplog.text and "workdir must be an absolute path" in caplog.text
    with pytest.raises(BadInput, match="no session nope1 recorded"):
        find("nope1", root=project / SESSIONS_DIR)


def test_status_of_sessions_on_several_boxes(boxes, project, tmp_path, vast_env):
    one, two = boxes
    lost = Server(tmp_path / "sshd-lost", hostname="box-lost")
    w1, w2, w3 = tmp_path / "w1", tmp_path / "w2", tmp_path / "w3"
    launch(one, w1, "done1", "sh", "-c", "echo all-done", project=project)
    launch(one, w1, "crash1", "sh", "-c", "echo boom-from-box-one; exit 3", project=project)
    launch(two, w2, "run1", "sh", "-c", "echo started-working; sleep 60", project=project)
    launch(lost, w3, "lost1", "sleep", "60", project=project, vast_instance=1002)
    launch(lost, w3, "lost2", "sleep", "60", project=project)
    record_launch(session="never1", host="127.0.0.1", port=one.port, user=one.user, key=one.key, workdir=str(w1),
                  known_hosts=one.known_hosts, complete_file="runs/.complete-never1", command=["true"],
                  root=project / SESSIONS_DIR)
    wait_for(w1 / "runs" / ".complete-done1")
    wait_for(w1 / ".ablate-remote" / "crash1" / "failed")
    wait_for(w2 / ".ablate-remote" / "run1" / "heartbeat")
    lost.kill_tmux()
    lost.stop()
    started = time.monotonic()
    result = cli("remote", "status", "--timeout", "3", cwd=project, env=vast_env)
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    rows = table(result.output)
    assert result.output.splitlines()[0].split()[:4] == ["SESSION", "BOX", "WORKDIR", "STATE"]
    assert set(rows) == {"done1", "crash1", "run1", "lost1", "lost2", "never1"}
    assert " completed " in rows["done1"] and rows["done1"].endswith("all-done")
    assert " crashed (exit 3) " in rows["crash1"] and rows["crash1"].endswith("boom-from-box-one")
    assert " running " in rows["run1"] and rows["run1"].endswith("started-working")
    heartbeat = rows["run1"].split(" running ")[1].split()[0]
    assert heartbeat.endswith("s") and int(heartbeat[:-1]) <= 5  # measured on the box's own clock
    assert " stopped by the provider (Vast: exited) " in rows["lost1"]
    assert " unreachable " in rows["lost2"] and "Vast" not in rows["lost2"]
    assert " never launched " in rows["never1"]
    assert f"{one.user}@127.0.0.1:{two.port}" in rows["run1"] and str(w2) in rows["run1"]
    assert KEY not in result.output and took < 15
    assert all(p.endswith("?owner=me") for p in VastAPI.requests)


def test_logs_and_stop(boxes, project, tmp_path):
    one, two = boxes
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    script = "for i in 1 2 3 4 5; do echo line-$i; done; printf 'bar 10%%\\rbar 99%%\\n'; sleep 60"
    launch(one, w1, "twin1", "sh", "-c", script, project=project)
    launch(two, w2, "twin1", "sh", "-c", "echo the-other-twin; sleep 60", project=project)
    wait_for(w1 / ".ablate-remote" / "twin1" / "heartbeat")
    time.sleep(0.5)

    both = cli("remote", "logs", "twin1", cwd=project)
    assert both.exit_code == 2 and both.stderr.count("\n") == 1
    assert "launched on several boxes" in both.stderr
    assert f"127.0.0.1:{one.port} ({w1})" in both.stderr and f"127.0.0.1:{two.port} ({w2})" in both.stderr
    logs = cli("remote", "logs", "twin1", "--port", one.port, "--lines", "3", cwd=project)
    assert logs.exit_code == 0, logs.output
    assert logs.output.splitlines() == ["line-4", "line-5", "bar 99%"]
    missing = cli("remote", "logs", "nope1", cwd=project)
    assert missing.exit_code == 2 and "no session nope1 recorded" in missing.stderr

    stopped = cli("remote", "stop", "twin1", "--port", one.port, cwd=project)
    assert stopped.exit_code == 0, stopped.output
    assert (w1 / ".ablate-remote" / "twin1" / "stopped").read_text().split()[1] == "by"
    gone = os.system(f"TMUX_TMPDIR={one.tmux_dir} tmux has-session -t =twin1 2>/dev/null")
    assert gone != 0
    status = cli("remote", "status", cwd=project).output
    lines = [line for line in status.splitlines() if line.startswith("twin1")]
    assert any(f":{one.port} " in line and " stopped by you " in line for line in lines), status
    assert any(f":{two.port} " in line and " running " in line for line in lines), status
    again = cli("remote", "stop", "twin1", "--port", one.port, cwd=project)
    assert again.exit_code == 2 and "is not running (stopped by you); nothing to stop" in again.stderr


def test_a_lost_vast_box_says_why(boxes, project, tmp_path, vast_env):
    lost = Server(tmp_path / "sshd-gone", hostname="box-gone")
    launch(lost, tmp_path / "w", "gone1", "sleep", "60", project=project, vast_instance=1002)
    lost.kill_tmux()
    lost.stop()
    for command in ("logs", "stop"):
        result = cli("remote", command, "gone1", "--timeout", "2", cwd=project, env=vast_env)
        assert result.exit_code == 3, result.output
        assert "unreachable" in result.stderr
        assert ("ablate: Vast says instance 1002 is exited (stopped or outbid), meant to be running; "
                "status: Instance stopped: outbid\n") in result.stderr
        assert KEY not in result.output


def test_ssh_address_as_the_connect_button_shows(vast_env):
    assert vast.ssh_address(1001) == ("ssh4.vast.ai", 31234)  # Vast's SSH proxy
    assert vast.ssh_address("1007") == ("ssh4.vast.ai", 31235)  # a Jupyter image: its SSH is one port up
    assert vast.ssh_address(1008) == ("203.0.113.7", 40022)  # no proxy: the direct port mapping
    with pytest.raises(BadInput, match="no SSH address for instance 1009 yet"):
        vast.ssh_address(1009)


@pytest.mark.parametrize("number, expected", [
    (1001, "Vast says instance 1001 is running (so the box itself is not answering: its network or sshd); "
           "status: success, running pytorch/pytorch_2.5.1-cuda12.4/ssh"),
    (1002, "Vast says instance 1002 is exited (stopped or outbid), meant to be running; "
           "status: Instance stopped: outbid"),
    (1003, "Vast says instance 1003 is offline (its host machine lost contact with Vast)"),
    (1004, "Vast says instance 1004 is loading (starting, or pulling its image); status: Pulling image: 3.1GB/8.2GB"),
    (1005, "Vast says instance 1005 is exited (stopped or outbid), meant to be stopped"),
    (1006, "Vast says instance 1006 is unknown; status: [31mscheduling [0m"),
    (999, "Vast could not tell why: Vast has no instance 999 on this account"),
])
def test_triage_names_the_instance_state(vast_env, number, expected):
    assert vast.triage(number) == expected


@pytest.mark.parametrize("args, env, message", [
    (["1001"], {"VAST_API_KEY": "wrong-key"}, "refused the API key (HTTP 401); check VAST_API_KEY"),
    (["1001"], {"VAST_API_KEY": ""}, "no Vast API key: set VAST_API_KEY"),
    (["999"], {}, "Vast has no instance 999 on this account"),
    (["404404"], {}, "Vast has no instance 404404 on this account (HTTP 404)"),
    (["12ab"], {}, "a Vast instance id is a positive number, got '12ab'"),
    (["1001"], {"VAST_URL": "server-down"}, "cannot reach the Vast API at http://127.0.0.1:{port} (connection failed)"),
    (["1009"], {}, "Vast says instance 1009 is loading (starting, or pulling its image); it has no SSH address yet"),
])
def test_vast_errors_are_one_line(vast_env, tmp_path, args, env, message):
    env = {**vast_env, **env}
    if env["VAST_URL"] == "server-down":
        port = free_port()  # nothing listens there
        env["VAST_URL"], message = f"http://127.0.0.1:{port}", message.format(port=port)
    result = cli("remote", "vast", *args, cwd=tmp_path, env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("ablate: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert KEY not in result.output + result.stderr


def test_vast_prints_the_address(vast_env, tmp_path):
    result = cli("remote", "vast", "1001", cwd=tmp_path, env=vast_env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["VAST_HOST=ssh4.vast.ai", "VAST_PORT=31234"]
    assert KEY not in result.output


def test_watch_finds_sessions_on_several_boxes_through_the_record(boxes, project, tmp_path, vast_env):
    """The record is what `ablate remote watch --session A --session B` (no --host) reads: the lead's caller."""
    one, two = boxes
    lost = Server(tmp_path / "sshd-away", hostname="box-away")
    launch(one, tmp_path / "w1", "pair1", "sh", "-c", "sleep 1; echo one-done", project=project)
    launch(two, tmp_path / "w2", "pair2", "sh", "-c", "sleep 1; echo two-done", project=project)
    watched = cli("remote", "watch", "--session", "pair1", "--session", "pair2", "--poll-seconds", "1", "--no-sync",
                  cwd=project)
    assert watched.exit_code == 0, watched.output
    assert f"pair1 on 127.0.0.1:{one.port}: completed" in watched.output
    assert f"pair2 on 127.0.0.1:{two.port}: completed" in watched.output
    launch(lost, tmp_path / "w3", "away1", "sleep", "60", project=project, vast_instance=1002)
    lost.kill_tmux()
    lost.stop()
    gone = cli("remote", "watch", "--session", "away1", "--poll-seconds", "1", "--grace-seconds", "1", "--no-sync",
               cwd=project, env=vast_env)
    assert gone.exit_code == 3, gone.output
    assert "Vast says instance 1002 is exited (stopped or outbid), meant to be running" in gone.output
    assert KEY not in gone.output


def test_nothing_recorded_yet(project):
    result = cli("remote", "status", cwd=project)
    assert result.exit_code == 0 and result.output == f"no sessions recorded in {SESSIONS_DIR} " \
                                                      "(`ablate remote launch` records them)\n"
    for args in (["logs", "any1"], ["stop", "any1"]):
        refused = cli("remote", *args, cwd=project)
        assert refused.exit_code == 2 and "no session any1 recorded" in refused.stderr
    bad = cli("remote", "logs", "any1", "--lines", "0", cwd=project)
    assert bad.exit_code == 2 and bad.stderr == "ablate: error: --lines must be in 1..100000, got 0\n"
