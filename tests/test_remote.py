"""Remote runs against a real OpenSSH server and tmux on 127.0.0.1: python -m pytest tests/test_remote.py -q

The fixture starts sshd with a temporary host key and authorized key (root, as
in CI and on Vast boxes). `.ci/run` installs openssh-server, tmux and rsync.
"""

import fcntl
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.remote.ssh import Box, Connection
from ablate.results.rundir import RUN_NAME, load_run
from ablate.remote.sync import sync

from sshbox import AVAILABLE, WHY_NOT, Server, hashes, make_run

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT)
runner = CliRunner()
PY = sys.executable


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


@pytest.fixture
def box(server, tmp_path):
    return Box(host="127.0.0.1", port=server.port, user=getpass.getuser(), key=str(server.root / "client_key"),
               workdir=str(tmp_path / "box work"), known_hosts=str(server.root / "known_hosts"), timeout=5)


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "ablate").mkdir(parents=True)
    (root / "ablate" / "code.py").write_text("print('hello')\n")
    (root / "runs" / "old").mkdir(parents=True)
    (root / "runs" / "old" / "metrics.json").write_text("{}")
    (root / ".venv").mkdir()
    (root / ".venv" / "big").write_text("x")
    return root


def flags(box, *extra):
    return ["--host", box.host, "--port", str(box.port), "--user", box.user, "--key", box.key,
            "--workdir", box.workdir, "--timeout", "5", "--known-hosts", box.known_hosts, *extra]


def cli(*args, cwd=None, env=None):
    old = Path.cwd()
    os.chdir(cwd or old)
    try:
        return runner.invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(old)


def writer(path: str, content: dict) -> str:
    return (f"import json, pathlib; p = pathlib.Path({path!r}); p.parent.mkdir(parents=True, exist_ok=True); "
            f"p.write_text(json.dumps({content!r}))")


def test_completed_run_is_synced_byte_for_byte(box, project, tmp_path):
    script = writer("runs/stage1_baseline_eval/r1/metrics.json", {"macro": {"acc": 0.695057}})
    result = cli("remote", "launch", *flags(box, "--session", "ok1", "--heartbeat-seconds", "1"), "--",
                 PY, "-c", script, cwd=project)
    assert result.exit_code == 0, result.output
    remote = Path(box.workdir)
    assert (remote / "ablate" / "code.py").is_file()
    assert not (remote / "runs" / "old").exists() and not (remote / ".venv").exists()
    local_runs = tmp_path / "local_runs"
    watched = cli("remote", "watch", *flags(box, "--session", "ok1", "--poll-seconds", "1",
                                            "--runs-dir", local_runs))
    assert watched.exit_code == 0, watched.output
    assert "ok1: completed" in watched.output and "synced 1 file(s)" in watched.output
    got = (local_runs / "stage1_baseline_eval" / "r1" / "metrics.json").read_bytes()
    assert got == (remote / "runs" / "stage1_baseline_eval" / "r1" / "metrics.json").read_bytes()
    assert (remote / "runs" / ".complete-ok1").is_file()
    again = cli("remote", "sync", *flags(box, "--runs-dir", local_runs))
    assert again.exit_code == 0 and "synced 0 file(s)" in again.output and "1 unchanged" in again.output


def test_non_zero_exit_is_a_crash_with_its_code_and_log(box, project):
    result = cli("remote", "launch", *flags(box, "--session", "bad1"), "--",
                 "sh", "-c", "echo boom-from-the-box; exit 3", cwd=project)
    assert result.exit_code == 0, result.output
    watched = cli("remote", "watch", *flags(box, "--session", "bad1", "--poll-seconds", "1", "--no-sync"))
    assert watched.exit_code == 1
    assert "exited with code 3" in watched.output and "boom-from-the-box" in watched.output


def test_session_killed_mid_run(server, box, project):
    result = cli("remote", "launch", *flags(box, "--session", "kill1", "--no-copy"), "--",
                 "sh", "-c", "echo started-working; sleep 60", cwd=project)
    assert result.exit_code == 0, result.output

    def kill():
        time.sleep(1.0)
        subprocess.run(["tmux", "kill-session", "-t", "=kill1"], check=True, env=server.tmux_env)

    threading.Thread(target=kill).start()
    watched = cli("remote", "watch", *flags(box, "--session", "kill1", "--poll-seconds", "1", "--no-sync"))
    assert watched.exit_code == 1, watched.output
    assert "kill1: running" in watched.output  # it was watched while alive
    assert "tmux session is gone and there is no completion file" in watched.output
    assert "started-working" in watched.output


def test_ssh_server_restart_mid_watch(server, box, project, tmp_path):
    script = "import time; time.sleep(3); " + writer("runs/s/r/summary.json", {"status": "completed"})
    result = cli("remote", "launch", *flags(box, "--session", "restart1", "--no-copy"), "--", PY, "-c", script,
                 cwd=project)
    assert result.exit_code == 0, result.output

    def bounce():
        time.sleep(0.5)
        server.stop()
        time.sleep(1.5)
        server.start()

    thread = threading.Thread(target=bounce)
    thread.start()
    watched = cli("remote", "watch", *flags(box, "--session", "restart1", "--poll-seconds", "1",
                                            "--grace-seconds", "60", "--runs-dir", tmp_path / "runs"))
    thread.join()
    assert watched.exit_code == 0, watched.output
    assert "unreachable" in watched.output and "reconnected" in watched.output
    assert json.loads((tmp_path / "runs" / "s" / "r" / "summary.json").read_text()) == {"status": "completed"}


def test_unreachable_past_the_grace_window_exits_3(server, box):
    server.stop()
    try:
        watched = cli("remote", "watch", *flags(box, "--session", "gone1", "--poll-seconds", "1",
                                                "--grace-seconds", "1", "--no-sync"))
    finally:
        server.start()
    assert watched.exit_code == 3 and "unreachable for" in watched.output


def test_host_key_mismatch_is_refused(server, box, project):
    wrong = Box(**{**box.__dict__, "known_hosts": str(server.root / "wrong_known_hosts")})
    for tofu in ([], ["--trust-on-first-use"]):
        result = cli("remote", "launch", *flags(wrong, "--session", "hk1", *tofu), "--", "true", cwd=project)
        watched = cli("remote", "watch", *flags(wrong, "--session", "hk1", *tofu))
        assert result.exit_code == 2 and "does not match known_hosts" in result.stderr
        assert watched.exit_code == 2 and "does not match known_hosts" in watched.output


def test_unknown_host_needs_trust_on_first_use(server, box, tmp_path):
    pinned = tmp_path / "pinned_known_hosts"
    new = Box(**{**box.__dict__, "known_hosts": str(pinned)})
    (Path(box.workdir) / "runs").mkdir(parents=True)  # a box without one is an error of its own
    refused = cli("remote", "sync", *flags(new, "--runs-dir", tmp_path / "r"))
    assert refused.exit_code == 2 and "not in known_hosts" in refused.stderr
    pinned_ok = cli("remote", "sync", *flags(new, "--runs-dir", tmp_path / "r", "--trust-on-first-use"))
    assert pinned_ok.exit_code == 0, pinned_ok.output
    assert f"[127.0.0.1]:{server.port}" in pinned.read_text()


def test_a_file_being_written_is_never_stored_half(box, tmp_path):
    target = Path(box.workdir) / "runs" / "s" / "r" / "metrics.json"
    target.parent.mkdir(parents=True)
    slow = (f"import time; f = open({str(target)!r}, 'w'); f.write('{{\"acc\": '); f.flush(); "
            "time.sleep(3); f.write('0.5}'); f.close()")
    proc = subprocess.Popen([PY, "-c", slow])
    time.sleep(0.5)
    conn = Connection(box).connect()
    try:
        first = sync(conn, tmp_path / "runs")
        assert "s/r/metrics.json" in first.skipped and not (tmp_path / "runs" / "s" / "r" / "metrics.json").exists()
        proc.wait()
        second = sync(conn, tmp_path / "runs")
    finally:
        conn.close()
    assert second.copied == ["s/r/metrics.json"]
    assert (tmp_path / "runs" / "s" / "r" / "metrics.json").read_bytes() == target.read_bytes()
    assert not list((tmp_path / "runs" / "s" / "r").glob(".*"))  # no temporary leftovers


def test_hostile_names_do_no_harm(box, project, tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"x; touch {marker}"
    result = cli("remote", "launch", *flags(box, "--session", hostile), "--", "true", cwd=project)
    assert result.exit_code == 2 and "session name" in result.stderr
    # metacharacters in paths are quoted, not run
    workdir = str(tmp_path / f"w $(touch {marker}) 'q' ;`touch {marker}`")
    complete = f"runs/.done $(touch {marker})"
    hostile_box = flags(Box(**{**box.__dict__, "workdir": workdir}), "--session", "safe1",
                        "--complete-file", complete, "--env", f"NOTE=$(touch {marker})")
    result = cli("remote", "launch", *hostile_box, "--", "sh", "-c", 'echo "$NOTE"', cwd=project)
    assert result.exit_code == 0, result.output
    watched = cli("remote", "watch", *flags(Box(**{**box.__dict__, "workdir": workdir}), "--session", "safe1",
                                            "--complete-file", complete, "--poll-seconds", "1", "--no-sync"))
    assert watched.exit_code == 0, watched.output
    assert not marker.exists()
    assert (Path(workdir) / complete).is_file()
    assert f"$(touch {marker})" in (Path(workdir) / ".ablate-remote" / "safe1" / "log").read_text()


def test_wait_or_crash_wrapper(box, project):
    result = cli("remote", "launch", *flags(box, "--session", "wrap1", "--no-copy"), "--", "true", cwd=project)
    assert result.exit_code == 0, result.output
    script = Path(__file__).resolve().parent.parent / "scripts" / "local" / "wait_or_crash.sh"
    env = {**os.environ, "VAST_HOST": box.host, "VAST_PORT": str(box.port), "REMOTE_SESSION": "wrap1",
           "COMPLETE_FILE": "runs/.complete-wrap1", "SSH_KEY": box.key, "POLL_SECONDS": "1"}
    env["ABLATE_KNOWN_HOSTS"] = box.known_hosts
    proc = subprocess.run(["bash", str(script), "--workdir", box.workdir, "--no-sync"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrap1: completed" in proc.stdout
    missing = subprocess.run(["bash", str(script)], env={k: v for k, v in env.items() if k != "VAST_HOST"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "VAST_HOST is not set" in missing.stderr


def test_hand_started_session_as_in_the_study(server, box, tmp_path):
    """A session the user started by hand (no wrapper): completion file and session state only."""
    Path(box.workdir).mkdir(parents=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", "byhand1",
                    f"sleep 1; mkdir -p '{box.workdir}/runs'; touch '{box.workdir}/runs/.complete-byhand1'"],
                   check=True, env=server.tmux_env)
    watched = cli("remote", "watch", *flags(box, "--session", "byhand1", "--poll-seconds", "1", "--no-sync"))
    assert watched.exit_code == 0, watched.output


def test_runs_sharing_a_folder_name_both_survive(box, tmp_path):
    name = "stage1_baseline_eval/20250101-120000"
    local_runs = tmp_path / "local runs"
    make_run(local_runs / name, "local-uid", files={"metrics.json": '{"acc": 0.1}'})
    before = hashes(local_runs)
    process = json.dumps({"host": "box", "pid": 1, "started": 0, "heartbeat": 0})
    make_run(Path(box.workdir) / "runs" / name, "box-uid", files={"metrics.json": '{"acc": 0.9}',
                                                                  "process.json": process})
    second_box = Box(**{**box.__dict__, "workdir": str(tmp_path / "second box")})
    make_run(Path(second_box.workdir) / "runs" / name, "second-uid", files={"metrics.json": '{"acc": 0.5}'})

    first = cli("remote", "sync", *flags(box, "--runs-dir", local_runs))
    assert first.exit_code == 0, first.output
    moved = local_runs / f"{name}-127.0.0.1"
    assert RUN_NAME.match(moved.name) and load_run(moved).uid == "box-uid"
    assert f"run {name} from 127.0.0.1 is kept in {moved}" in first.output and "synced 4 file(s)" in first.output
    assert hashes(moved) == hashes(Path(box.workdir) / "runs" / name)  # run.json and process.json too
    assert hashes(local_runs) == {**before, **{f"{name}-127.0.0.1/{k}": v for k, v in hashes(moved).items()}}

    again = cli("remote", "sync", *flags(box, "--runs-dir", local_runs))
    assert again.exit_code == 0 and "synced 0 file(s)" in again.output and "4 unchanged" in again.output
    assert f"kept in {moved}" in again.output and not (local_runs / f"{name}-127.0.0.1-2").exists()

    conn = Connection(second_box).connect()
    try:
        other = sync(conn, local_runs)
    finally:
        conn.close()
    assert other.relocated == {name: f"{name}-127.0.0.1-2"}
    assert other.copied[0] == f"{name}-127.0.0.1-2/run.json"  # a half-synced run is still recognisable
    uids = {load_run(p).uid for p in (local_runs / name).parent.iterdir()}
    assert uids == {"local-uid", "box-uid", "second-uid"}
    assert {k: v for k, v in hashes(local_runs).items() if k.startswith(name + "/")} == before


def test_a_run_without_run_json_is_refused_and_no_local_folder_is_written_into(box, tmp_path):
    local_runs, remote = tmp_path / "runs", Path(box.workdir) / "runs"
    bare, damaged, stray, held = (f"s/20250101-00000{i}" for i in range(4))
    # no run.json (every run writes it first), or one that is no JSON object: refused, nothing of it written here
    make_run(remote / bare, None, files={"metrics.json": '{"acc": 1}'})
    make_run(remote / damaged, None, files={"run.json": "[]", "metrics.json": '{"acc": 2}'})
    make_run(local_runs / damaged, None, files={"metrics.json": '{"acc": 3}'})
    # a local folder of the same name holds no run.json: another run's, so the box's run goes beside it
    make_run(remote / stray, "stray-uid", files={"metrics.json": '{"acc": 4}'})
    make_run(local_runs / stray, None, files={"metrics.json": '{"acc": 5}'})
    # a local process is writing the namesake right now -> relocated, even with nothing else against it
    make_run(remote / held, "box-uid")
    make_run(local_runs / held, None)
    lock = os.open(local_runs / held / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    kept = hashes(local_runs)
    try:
        first = cli("remote", "sync", *flags(box, "--runs-dir", local_runs))
        conn = Connection(box).connect()
        try:
            second = sync(conn, local_runs)
        finally:
            conn.close()
    finally:
        os.close(lock)
    assert first.exit_code == 0, first.output
    lines = [line for line in first.output.splitlines() if line.startswith("refused")]
    assert lines == [f"refused {bare!r} from 127.0.0.1: no run.json, which every ablate run writes first; not synced",
                     f"refused {damaged!r} from 127.0.0.1: run.json is not a JSON object; not synced"]
    assert not (local_runs / bare).exists()
    assert {k: v for k, v in hashes(local_runs).items() if k in kept} == kept  # every local file as it was
    assert second.refused.keys() == {repr(bare), repr(damaged)}  # the manifest does not let them in later
    assert second.relocated == {stray: f"{stray}-127.0.0.1", held: f"{held}-127.0.0.1"}
    for d, uid in ((stray, "stray-uid"), (held, "box-uid")):
        assert hashes(local_runs / f"{d}-127.0.0.1") == hashes(remote / d)
        assert load_run(local_runs / f"{d}-127.0.0.1").uid == uid
    assert second.copied == [] and not second.skipped
    assert sorted(p.name for p in (local_runs / "s").iterdir()) == sorted(
        [Path(d).name for d in (damaged, stray, held)] + [f"{Path(d).name}-127.0.0.1" for d in (stray, held)])


def test_sync_without_a_runs_folder_is_an_error(box, tmp_path):
    Path(box.workdir).mkdir(parents=True)
    wrong_workdir = flags(Box(**{**box.__dict__, "workdir": str(tmp_path / "no such dir")}))
    for args in (wrong_workdir, flags(box, "--remote-runs", "results")):
        result = cli("remote", "sync", *args, "--runs-dir", tmp_path / "runs")
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("ablate: error: ")
        assert "has no runs folder" in result.stderr and "synced" not in result.output


def test_watching_a_session_never_launched(box):
    Path(box.workdir).mkdir(parents=True)
    watched = cli("remote", "watch", *flags(box, "--session", "never1", "--poll-seconds", "1"))
    assert watched.exit_code == 2, watched.output
    assert f"no session never1 was ever launched in {box.workdir} on 127.0.0.1:{box.port}" in watched.output
    assert "CRASHED" not in watched.output and "synced" not in watched.output


@pytest.mark.parametrize("command, extra, message", [
    ("sync", ["--port", "0"], "--port must be in 1..65535, got 0"),
    ("sync", ["--port", "65536"], "--port must be in 1..65535, got 65536"),
    ("sync", ["--timeout", "0"], "--timeout must be at least 1 (seconds), got 0"),
    ("watch", ["--poll-seconds", "0"], "--poll-seconds must be at least 1 (seconds), got 0"),
    ("watch", ["--poll-seconds", "nan"], "--poll-seconds must be at least 1 (seconds), got nan"),
    ("watch", ["--max-poll-seconds", "0.5"], "--max-poll-seconds must be at least 1 (seconds), got 0.5"),
    ("watch", ["--poll-seconds", "60", "--max-poll-seconds", "30"],
     "--max-poll-seconds (30) must be at least --poll-seconds (60)"),
    ("watch", ["--grace-seconds", "-5"], "--grace-seconds must be at least 1 (seconds), got -5"),
    ("launch", ["--heartbeat-seconds", "0"], "--heartbeat-seconds must be at least 1 (seconds), got 0"),
    ("sync", ["--host", "second.box"], "--host given 2 times (192.0.2.1, second.box); one box per call, or watch "
                                       "sessions launched with ablate by their --session names alone"),
    ("watch", ["--host", "second.box"], "--host given 2 times (192.0.2.1, second.box); one box per call, or watch "
                                        "sessions launched with ablate by their --session names alone"),
])
def test_bad_numbers_are_refused_before_connecting(box, tmp_path, command, extra, message):
    unroutable = Box(**{**box.__dict__, "host": "192.0.2.1"})  # contacting it would take --timeout, then exit 3
    session = [] if command == "sync" else ["--session", "num1"]
    tail = ["--", "true"] if command == "launch" else []
    result = cli("remote", command, *flags(unroutable, *session, *extra), *tail, cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr == f"ablate: error: {message}\n"


def _printed(output: str, prefix: str) -> list[str]:
    """A command `launch` printed (``watch: ablate remote watch ...``), as the argv a user's shell would make."""
    import shlex

    line = next(line for line in output.splitlines() if line.startswith(prefix))
    return shlex.split(line[len(prefix):].strip())[1:]  # drop the program name


def test_printed_watch_command_works_as_typed_and_a_wrong_workdir_is_not_a_crash(box, project, tmp_path):
    result = cli("remote", "launch", *flags(box, "--session", "hint1", "--heartbeat-seconds", "1"), "--",
                 "sh", "-c", "echo hint-run; sleep 3", cwd=project)
    assert result.exit_code == 0, result.output
    typed = _printed(result.output, "watch:")
    assert typed[:2] == ["remote", "watch"] and "--workdir" in typed and "--key" in typed
    elsewhere = cli("remote", "watch", *flags(Box(**{**box.__dict__, "workdir": str(tmp_path / "elsewhere")}),
                                              "--session", "hint1", "--poll-seconds", "1", "--no-sync"))
    assert elsewhere.exit_code == 2, elsewhere.output
    assert f"not from {tmp_path / 'elsewhere'}" in elsewhere.output and "CRASHED" not in elsewhere.output
    watched = cli(*typed, "--poll-seconds", "1", "--no-sync", cwd=project)
    assert watched.exit_code == 0, watched.output


def test_a_relaunched_session_starts_a_fresh_log(box, project):
    for word in ("first-attempt-line", "second-attempt-line"):
        result = cli("remote", "launch", *flags(box, "--session", "again1", "--no-copy"), "--",
                     "sh", "-c", f"echo {word}", cwd=project)
        assert result.exit_code == 0, result.output
        watched = cli("remote", "watch", *flags(box, "--session", "again1", "--poll-seconds", "1", "--no-sync"))
        assert watched.exit_code == 0 and word in watched.output
    log = (Path(box.workdir) / ".ablate-remote" / "again1" / "log").read_text()
    assert log == "second-attempt-line\n" and "first-attempt-line" not in watched.output


def test_an_env_secret_is_never_in_a_readable_file_a_log_or_a_printed_line(server, box, project, tmp_path):
    secret = "hf_s3cr3t-Value-9f2"
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the command itself must not hold the secret
    script = (f"test \"$(printf %s \"$HF_TOKEN\" | sha256sum | cut -c1-64)\" = {digest} && echo token-arrived; "
              "python3 -c \"import os; open('runs/seen.txt', 'w').write(str(sorted(os.environ)))\"; sleep 2")
    result = cli("remote", "launch", *flags(box, "--session", "secret1", "--heartbeat-seconds", "1",
                                            "--env", f"HF_TOKEN={secret}"), "--", "sh", "-c", script, cwd=project)
    assert result.exit_code == 0, result.output
    state = Path(box.workdir) / ".ablate-remote" / "secret1"
    time.sleep(1.0)  # the command has started: the wrapper has read and removed the secret
    start = subprocess.run(["tmux", "display-message", "-p", "-t", "=secret1:", "#{pane_start_command}"],
                           env=server.tmux_env, capture_output=True, text=True).stdout
    watched = cli("remote", "watch", *flags(box, "--session", "secret1", "--poll-seconds", "1",
                                            "--runs-dir", tmp_path / "home-runs"))
    assert watched.exit_code == 0, watched.output
    assert "token-arrived" in (state / "log").read_text()
    assert oct(state.stat().st_mode & 0o777) == "0o700" and not (state / "secrets").exists()
    everywhere = [p for root in (Path(box.workdir), project, tmp_path / "home-runs", server.root)
                  for p in root.rglob("*") if p.is_file()]
    assert [p for p in everywhere if secret.encode() in p.read_bytes()] == []
    assert secret not in result.output + watched.output + start
    assert "HF_TOKEN" in (Path(box.workdir) / "runs" / "seen.txt").read_text()  # it did reach the command


def test_push_refuses_a_live_run_takes_a_lost_one_and_never_overwrites(box, project, tmp_path):
    from ablate.results import rundir

    runs = project / "runs"
    run = rundir.new_run_dir(runs, "stage3_finetune_prefill_bidir")
    rundir._unlock(run)
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(os.urandom(1 << 16))
    record = json.loads((run / "process.json").read_text())
    rundir.write_json(run / "process.json", {**record, "host": "box-gone"})
    seen = {"host": "box-gone", "pid": record["pid"], "attempt": record["attempt"], "synced_at": time.time(),
            "alive": True, "heartbeat_age": 3.0}
    rundir.write_json(run / rundir.REMOTE_FILE, seen)
    rel = f"runs/stage3_finetune_prefill_bidir/{run.name}"
    alive = cli("remote", "push", rel, *flags(box), cwd=project)
    assert alive.exit_code == 2 and "running on box-gone" in alive.stderr and "--lost" in alive.stderr
    assert not (Path(box.workdir) / rel).exists()
    lost = cli("remote", "push", rel, "--lost", *flags(box), cwd=project)
    assert lost.exit_code == 0, lost.output
    assert f"ablate stage3 --resume --run-dir {rel}" in lost.output
    there = Path(box.workdir) / rel
    assert hashes(there) == {k: v for k, v in hashes(run).items() if not k.startswith(".")} | {
        rundir.REMOTE_FILE: hashes(there)[rundir.REMOTE_FILE]}
    copy = rundir.load_run(there)  # read as the new box reads it: its writer on box-gone is declared lost
    assert copy.status == rundir.CRASHED and "declared lost" in copy.reason
    again = cli("remote", "push", rel, "--lost", *flags(box), cwd=project)
    assert again.exit_code == 2 and "already holds this run" in again.stderr


@pytest.mark.parametrize("offset", [-600, 600])  # the box's clock 10 minutes behind, then ahead of this machine's
def test_liveness_of_a_synced_run_does_not_depend_on_clocks_agreeing(tmp_path, offset):
    import psutil

    from ablate.results import rundir

    fake = tmp_path / "box-bin"
    fake.mkdir()
    (fake / "date").write_text(f'#!/bin/sh\nexec /bin/date -d "@$(( $(/bin/date +%s) + {offset} ))" "$@"\n')
    (fake / "date").chmod(0o755)
    srv = Server(tmp_path / "sshd-skew", hostname="box-skew", setenv={"PATH": f"{fake}:/usr/bin:/bin"})
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        box = Box(host="127.0.0.1", port=srv.port, user=srv.user, key=srv.key, workdir=str(tmp_path / "work"),
                  known_hosts=srv.known_hosts, timeout=5)
        box_now = time.time() + offset  # what a process on the box writes as its heartbeat
        started = psutil.Process(sleeper.pid).create_time()
        for name, heartbeat_age in (("20250101-000001", 5), ("20250101-000002", 600)):
            make_run(Path(box.workdir) / "runs" / "s" / name, f"skew{name[-1]}", status="running", files={
                "process.json": json.dumps({"host": "box-skew", "pid": sleeper.pid, "started": started,
                                            "attempt": "a" * 32, "heartbeat": box_now - heartbeat_age})})
        synced = cli("remote", "sync", *flags(box, "--runs-dir", tmp_path / "home"))
        assert synced.exit_code == 0, synced.output
        fresh = rundir.load_run(tmp_path / "home" / "s" / "20250101-000001")
        stale = rundir.load_run(tmp_path / "home" / "s" / "20250101-000002")
        assert fresh.status == rundir.RUNNING and "running on box-skew, heartbeat" in fresh.reason
        assert int(fresh.reason.split("heartbeat ")[1].split(" s")[0]) < 60, fresh.reason
        assert stale.status == rundir.CRASHED and "measured on the box's own clock" in stale.reason
        sleeper.kill()
        sleeper.wait()
        gone = cli("remote", "sync", *flags(box, "--runs-dir", tmp_path / "home"))
        assert gone.exit_code == 0, gone.output
        after = rundir.load_run(tmp_path / "home" / "s" / "20250101-000001")
        assert after.status == rundir.CRASHED and "is gone" in after.reason  # the box's word, not elapsed time
    finally:
        sleeper.kill()
        srv.stop()


def test_push_of_a_folder_that_is_not_a_run_is_one_line_before_connecting(box, tmp_path):
    (tmp_path / "not-a-run").mkdir()
    unroutable = Box(**{**box.__dict__, "host": "192.0.2.1"})  # contacting it would take --timeout, then exit 3
    for path in (tmp_path / "not-a-run", tmp_path / "missing"):
        result = cli("remote", "push", path, *flags(unroutable), cwd=tmp_path)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "is not a run directory" in result.stderr
