"""`ablate remote sync` against an untrusted box, at real sizes, across boxes: python -m pytest tests/test_remote_sync.py -q

A stand-in connection plays a hostile box (a listing and files no honest sshd
would send); everything else runs against a real OpenSSH server on loopback
(tests/sshbox.py), with real rsync, or over SFTP on a box whose PATH has no rsync.
"""

import getpass
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ablate.remote.confine import problem
from ablate.remote.ssh import Box, Connection, Unreachable
from ablate.remote.sync import sync
from ablate.results.lineage import compare

from sshbox import AVAILABLE, WHY_NOT, Server, hashes, make_run

PY = sys.executable
LOCAL_RUN = "stage1_baseline_eval/20250101-120000"
MANIFESTS = ".ablate/synced/"  # sync's own record of what it saw, beside the runs folder


# ---------------------------------------------------------------- a hostile box (stand-in connection)

class _File:
    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def readv(self, chunks, max_concurrent_prefetch_requests=None):
        for offset, size in chunks:
            yield self.data[offset:offset + size]


class _SFTP:
    def __init__(self, box):
        self.box = box

    def open(self, path, mode="rb"):
        assert mode == "rb", "sync never writes to the box"
        return _File(self.box.files[path[len(self.box.root) + 1:]])

    def close(self):
        pass


class HostileBox:
    """Answers sync's commands with a crafted listing; serves the bytes it lists. No rsync, so SFTP is used."""

    MTIME = "1700000000.5000000000"

    def __init__(self, files: dict, extra_records=(), cut_last=False):
        self.box = Box(host="evil.example", workdir="/box", known_hosts="/nonexistent", timeout=5)
        self.root = "/box/runs"
        self.files = {rel: data if isinstance(data, bytes) else data.encode() for rel, data in files.items()}
        self.extra, self.cut_last = list(extra_records), cut_last

    def run(self, command, timeout=None):
        if "find . -mindepth 1" in command:
            records = ["evil-box", "1700000100"] + [f"{len(d)} {self.MTIME} {r}" for r, d in self.files.items()]
            return 0, "\0".join(records + self.extra) + ("" if self.cut_last else "\0"), ""
        if command.startswith("command -v rsync"):
            return 1, "", ""
        if "sha256sum" in command or "-printf '%s %T@'" in command:
            tokens = shlex.split(command)
            start = tokens.index("in") + 1
            lines = []
            for f in tokens[start:tokens.index(";", start)]:
                data = self.files.get(f[2:])
                lines.append("- - " if data is None else f"{len(data)} {self.MTIME} {hashlib.sha256(data).hexdigest()}")
            return 0, "".join(line + "\n" for line in lines), ""
        if "/proc/stat" in command:
            return 0, "", ""
        raise AssertionError(f"unexpected command: {command}")

    def sftp(self):
        return _SFTP(self)


def _outside(tmp_path: Path) -> str:
    return str(tmp_path / "outside" / "pwned.json")


# Every spelling in the class of paths that must not be written: one box entry each.
HOSTILE = {
    "absolute": lambda t: _outside(t),
    "absolute, doubled slash": lambda t: "/" + _outside(t),
    "'..' as the stage": lambda t: "../outside/pwned.json",
    "'..' after the stage": lambda t: "stage1_baseline_eval/../../outside/pwned.json",
    "'..' after the run": lambda t: f"{LOCAL_RUN}/../../../outside/pwned.json",
    "'..' inside the run": lambda t: f"{LOCAL_RUN}/x/../../../../outside/pwned.json",
    "'..' last": lambda t: f"{LOCAL_RUN}/..",
    "a stage named '..' holding a run": lambda t: "../20250101-120000/metrics.json",
    "'.' first": lambda t: f"./{LOCAL_RUN}/metrics.json",
    "'.' inside": lambda t: f"stage1_baseline_eval/./20250101-120000/metrics.json",
    "'//' aimed at a local completed run": lambda t: f"stage1_baseline_eval//20250101-120000/metrics.json",
    "'//' first": lambda t: f"//{LOCAL_RUN}/metrics.json",
    "trailing '/'": lambda t: f"{LOCAL_RUN}/metrics.json/",
    "empty": lambda t: "",
    "newline forging a second entry": lambda t: f"stage1_baseline_eval/x\n5 1.0 /{_outside(t)}",
    "carriage return": lambda t: "stage1_baseline_eval/a\rb/metrics.json",
    "tab": lambda t: "stage1_baseline_eval/a\tb/metrics.json",
    "escape sequence": lambda t: "stage1_baseline_eval/\x1b[2Jx/metrics.json",
    "C0 control": lambda t: "stage1_baseline_eval/a\x01b/metrics.json",
    "DEL": lambda t: "stage1_baseline_eval/a\x7fb/metrics.json",
    "C1 control (NEL)": lambda t: "stage1_baseline_eval/a\x85b/metrics.json",
    "line separator": lambda t: "stage1_baseline_eval/a\u2028b/metrics.json",
    "bidi override": lambda t: "stage1_baseline_eval/a\u202eb/metrics.json",
    "zero-width space in a run name": lambda t: "stage1_baseline_eval/20250101-120000\u200b/metrics.json",
    "non-UTF-8 (as the SSH channel decodes it)": lambda t: b"stage1_baseline_eval/\xff\xfe/metrics.json".decode(
        errors="replace"),
    "non-UTF-8 (surrogate escape)": lambda t: "stage1_baseline_eval/\udcff/metrics.json",
    "hidden stage (sync's staging)": lambda t: ".sync-x/metrics.json",
    "hidden file in a run": lambda t: f"{LOCAL_RUN}/.remote.json",
    "overlong name": lambda t: "stage1_baseline_eval/" + "a" * 300 + "/metrics.json",
    "too deep": lambda t: "/".join(["d"] * 20) + "/metrics.json",
    "a file where a run folder belongs": lambda t: "stage1_baseline_eval/20250101-130000",
}


@pytest.fixture
def project(tmp_path):
    """A laptop's project: a completed local run whose results must survive, and files outside runs/."""
    make_run(tmp_path / "project" / "runs" / LOCAL_RUN, "local-uid", files={"metrics.json": '{"acc": 0.81}'})
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("mine")
    return tmp_path / "project" / "runs"


def _harmless(tmp_path: Path, before: dict, runs_rel: str = "project/runs/") -> None:
    after = hashes(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k.startswith(runs_rel) or k.startswith("project/" + MANIFESTS) for k in changed), changed
    assert not any(k.startswith(runs_rel + LOCAL_RUN + "/") for k in changed), "a local completed run changed"
    assert not list(tmp_path.rglob("pwned.json"))


@pytest.mark.parametrize("spelling", sorted(HOSTILE))
def test_a_hostile_path_is_refused_and_nothing_is_written_for_it(project, tmp_path, spelling):
    rel = HOSTILE[spelling](tmp_path)
    assert problem(rel) or rel.count("/") == 1, spelling  # the rule itself names what is wrong
    honest = "stage1_baseline_eval/20250105-000000"
    box = HostileBox({rel: b'{"acc": 0.11}', f"{honest}/run.json": json.dumps({"uid": "honest"}),
                      f"{honest}/metrics.json": b'{"acc": 0.5}'})
    before = hashes(tmp_path)
    result = sync(box, project)
    _harmless(tmp_path, before)
    assert repr(rel) in result.refused, (spelling, result.refused)
    assert result.copied == [f"{honest}/run.json", f"{honest}/metrics.json"]  # an honest run still arrives


def test_a_hostile_listing_and_identity_are_refused_together(project, tmp_path):
    """All spellings at once, malformed records, a cut-off last record and run.json uids that are not words."""
    files = {HOSTILE[s](tmp_path): b'{"acc": 0.11}' for s in HOSTILE}
    for n, uid in enumerate(["../../outside", "x" * 5000, 7, None, "a b", "\n"]):
        files[f"stage1_baseline_eval/2025020{n}-000000/run.json"] = json.dumps({"uid": uid})
        files[f"stage1_baseline_eval/2025020{n}-000000/metrics.json"] = b'{"acc": 0.11}'
    # the same uid as the local run, the same moment, other numbers: a box cannot rewrite a local result
    files[f"{LOCAL_RUN}/run.json"] = json.dumps({"uid": "local-uid"})
    files[f"{LOCAL_RUN}/status.txt"] = "completed\n"
    files[f"{LOCAL_RUN}/metrics.json"] = b'{"acc": 0.11}'
    box = HostileBox(files, ["garbage", "12 notanumber x.json", "-1 1.0 y.json", "5 1.0 cut"], cut_last=True)
    before = hashes(tmp_path)
    result = sync(box, project)
    _harmless(tmp_path, before)
    for s in HOSTILE:
        assert repr(HOSTILE[s](tmp_path)) in result.refused, s
    for n in range(6):
        assert "uid" in result.refused[repr(f"stage1_baseline_eval/2025020{n}-000000")]
    assert {repr("garbage"), repr("12 notanumber x.json"), repr("-1 1.0 y.json"), repr("5 1.0 cut")} <= set(
        result.refused)
    assert json.loads((project / LOCAL_RUN / "metrics.json").read_text()) == {"acc": 0.81}
    assert not result.copied


# ---------------------------------------------------------------- a real box on loopback

needs_sshd = pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


def box_at(server, workdir) -> Box:
    return Box(host="127.0.0.1", port=server.port, user=getpass.getuser(), key=server.key, workdir=str(workdir),
               known_hosts=server.known_hosts, timeout=5)


def synced(box: Box, local_runs: Path, **kw):
    conn = Connection(box).connect()
    try:
        return sync(conn, local_runs, **kw)
    finally:
        conn.close()


@needs_sshd
def test_a_newline_in_a_box_folder_name_cannot_forge_an_entry(server, tmp_path):
    remote = tmp_path / "box" / "runs"
    make_run(remote / "s" / "20250101-000000", "u1", files={"metrics.json": "{}"})
    # What an older sync's line-based listing read as a second entry: size, mtime, digest, an absolute path.
    forged = remote / "s" / "a\n1 1 h " / str(tmp_path / "outside").lstrip("/")
    forged.mkdir(parents=True)
    (forged / "metrics.json").write_text('{"acc": 0.11}')
    before = hashes(tmp_path / "outside") if (tmp_path / "outside").exists() else {}
    result = synced(box_at(server, tmp_path / "box"), tmp_path / "runs")
    assert (hashes(tmp_path / "outside") if (tmp_path / "outside").exists() else {}) == before
    refused = [k for k in result.refused if "\\n1 1 h " in k]
    assert len(refused) == 1 and "U+000A" in result.refused[refused[0]]
    assert sorted(result.copied) == ["s/20250101-000000/metrics.json", "s/20250101-000000/run.json",
                                     "s/20250101-000000/status.txt"]
    assert sorted(p.name for p in (tmp_path / "runs" / "s").iterdir()) == ["20250101-000000"]


@needs_sshd
def test_a_local_stage_folder_that_is_a_symlink_out_of_runs_is_not_followed(server, tmp_path):
    remote = tmp_path / "box" / "runs"
    make_run(remote / "stage1_baseline_eval" / "20250101-000000", "u1", files={"metrics.json": "{}"})
    make_run(remote / "stage2_ablation_eval" / "20250101-000000", "u2", files={"metrics.json": "{}"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "stage1_baseline_eval").symlink_to(elsewhere)
    result = synced(box_at(server, tmp_path / "box"), tmp_path / "runs")
    assert list(elsewhere.iterdir()) == []
    assert all("symlink" in result.refused[repr(f"stage1_baseline_eval/20250101-000000/{f}")]
               for f in ("run.json", "status.txt", "metrics.json"))
    assert (tmp_path / "runs" / "stage2_ablation_eval" / "20250101-000000" / "metrics.json").is_file()


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


@needs_sshd
def test_a_1gib_checkpoint_comes_home_with_bounded_memory_then_a_second_sync_reads_nothing(server, tmp_path):
    run = "stage3_finetune_causal/20250101-000000"
    remote = tmp_path / "box" / "runs"
    make_run(remote / run, "big1", files={"train_log.jsonl": '{"step": 1}\n'})
    _sparse(remote / run / "checkpoints" / "checkpoint-1" / "model.safetensors", 1 << 30)
    box = box_at(server, tmp_path / "box")
    flags = server.flags(box.workdir, "--runs-dir", tmp_path / "runs", "--with-checkpoints")
    # peak RSS of the sync and everything it starts (rsync, ssh), measured by a wrapper that waits for it
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); code = subprocess.call(sys.argv[1:]); "
               "print('RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, code)")
    proc = subprocess.run([PY, "-c", wrapper, PY, "-m", "ablate", "remote", "sync", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    rss_kb, seconds, code = proc.stdout.split("RSS_KB")[-1].split()
    assert code == "0", proc.stdout + proc.stderr
    print(f"1 GiB checkpoint: {float(seconds):.1f} s, peak RSS {int(rss_kb) / 1024:.0f} MB")
    assert int(rss_kb) < 300 * 1024
    local = tmp_path / "runs" / run / "checkpoints" / "checkpoint-1" / "model.safetensors"
    assert local.stat().st_size == 1 << 30
    again = synced(box, tmp_path / "runs", with_checkpoints=True)
    assert again.copied == [] and not again.skipped and not again.refused
    assert again.bytes_read_locally == 0 and again.bytes_transferred == 0
    assert f"{run}/checkpoints/checkpoint-1/model.safetensors" in again.unchanged


@pytest.fixture
def rsyncless(tmp_path):
    """A box whose PATH holds the tools sync uses, but not rsync."""
    tools = tmp_path / "box-bin"
    tools.mkdir()
    for tool in ("find", "sha256sum", "hostname", "date", "cat", "getconf", "mkdir"):
        (tools / tool).symlink_to(shutil.which(tool))
    srv = Server(tmp_path / "sshd-no-rsync", setenv={"PATH": str(tools)})
    yield srv
    srv.stop()


@needs_sshd
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # paramiko's prefetch thread
def test_without_rsync_an_interrupted_download_resumes_from_its_partial(rsyncless, tmp_path):
    run = "stage3_finetune_causal/20250101-000000"
    remote = tmp_path / "box" / "runs"
    make_run(remote / run, "resume1")
    weights = remote / run / "final" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(os.urandom(48 << 20))
    box = box_at(rsyncless, tmp_path / "box")
    conn = Connection(box).connect()
    assert conn.run("command -v rsync")[0] != 0
    target = tmp_path / "runs" / run / "final"

    def cut_when_partial():
        for _ in range(2000):
            partial = next(target.glob(".model.safetensors.*.partial"), None) if target.is_dir() else None
            if partial is not None and partial.stat().st_size > (4 << 20):
                rsyncless.stop()  # the box is lost mid-file
                return
            time.sleep(0.005)

    cutter = threading.Thread(target=cut_when_partial)
    cutter.start()
    try:
        with pytest.raises(Unreachable):
            sync(conn, tmp_path / "runs", with_checkpoints=True)
    finally:
        cutter.join()
        conn.close()
        rsyncless.start()
    partial = next(target.glob(".model.safetensors.*.partial"))
    have = partial.stat().st_size
    assert 0 < have < weights.stat().st_size and not (target / "model.safetensors").exists()
    result = synced(box, tmp_path / "runs", with_checkpoints=True)
    assert result.transport == "sftp" and f"{run}/final/model.safetensors" in result.copied
    assert result.bytes_transferred == weights.stat().st_size - have  # only the rest crossed the wire
    assert (target / "model.safetensors").read_bytes() == weights.read_bytes()
    assert not list(target.glob(".*"))


# ---------------------------------------------------------------- one history per run, across boxes

def lineage_run(path: Path, attempts, status, steps, summary=None):
    """A stage 3 run folder as a box holds it: attempts are (id, from_step)."""
    make_run(path, "run-uid-1", status=status, files={
        "history.jsonl": "".join(json.dumps({"attempt": a, "host": "h", "pid": 1, "started": 0.0, "from_step": f})
                                 + "\n" for a, f in attempts),
        "train_log.jsonl": "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, steps + 1)),
        "process.json": json.dumps({"host": "h", "pid": 1, "started": 0.0, "attempt": attempts[-1][0],
                                    "heartbeat": 100.0}),
        "config.json": "{}", **({"summary.json": json.dumps(summary)} if summary else {})})


RUN = "stage3_finetune_causal/20250101-000000"
A1, A2 = "a" * 32, "b" * 32


@needs_sshd
@pytest.mark.parametrize("order", ["box1 first", "box2 first"])
def test_the_continued_history_wins_in_either_order(server, tmp_path, order):
    box1, box2 = (box_at(server, tmp_path / name) for name in ("box1", "box2"))
    lineage_run(tmp_path / "box1" / "runs" / RUN, [(A1, 0)], "failed", 47)
    lineage_run(tmp_path / "box2" / "runs" / RUN, [(A1, 0), (A2, 40)], "completed", 153, {"eval_loss": 0.5})
    local_runs = tmp_path / "runs"
    first, second = (box1, box2) if order == "box1 first" else (box2, box1)
    results = {id(b): synced(b, local_runs) for b in (first, second)}
    results[id(box1)] = synced(box1, local_runs)
    last = synced(box1, local_runs)  # nothing changed since: the verdict holds without reading anything
    expected = hashes(tmp_path / "box2" / "runs" / RUN)
    assert hashes(local_runs / RUN) == expected
    assert len((local_runs / RUN / "train_log.jsonl").read_text().splitlines()) == 153
    assert sorted(p.name for p in (local_runs / RUN).parent.iterdir()) == [Path(RUN).name]
    behind = results[id(box1)].behind
    assert list(behind) == [RUN] and "failed at step 47" in behind[RUN] and "completed at step 153" in behind[RUN]
    assert last.behind == behind and last.bytes_read_locally == 0 and last.bytes_transferred == 0
    assert compare(local_runs / RUN, tmp_path / "box1" / "runs" / RUN) == "behind"


@needs_sshd
@pytest.mark.parametrize("order", ["box1 first", "box2 first"])
def test_diverged_histories_are_both_kept_and_reported(server, tmp_path, order):
    box1, box2 = (box_at(server, tmp_path / name) for name in ("box1", "box2"))
    lineage_run(tmp_path / "box1" / "runs" / RUN, [(A1, 0)], "completed", 153, {"eval_loss": 0.7})
    lineage_run(tmp_path / "box2" / "runs" / RUN, [(A1, 0), (A2, 40)], "completed", 153, {"eval_loss": 0.5})
    local_runs = tmp_path / "runs"
    first, second = (box1, box2) if order == "box1 first" else (box2, box1)
    synced(first, local_runs)
    result = synced(second, local_runs)
    side = f"{RUN}-127.0.0.1"
    assert list(result.diverged) == [RUN] and side in result.diverged[RUN]
    assert hashes(local_runs / RUN) == hashes(Path(first.workdir) / "runs" / RUN)
    assert hashes(local_runs / side) == hashes(Path(second.workdir) / "runs" / RUN)
    again = synced(second, local_runs)
    assert list(again.diverged) == [RUN] and again.copied == [] and again.bytes_read_locally == 0
    assert not (local_runs / f"{side}-2").exists()


@needs_sshd
def test_a_running_run_records_what_the_box_says_about_its_writer(server, tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        remote = tmp_path / "box" / "runs"
        now = time.time()
        cases = {"20250101-000001": (sleeper.pid, started, True),  # alive, the same process
                 "20250101-000002": (sleeper.pid, started - 50, False),  # that pid is another process now
                 "20250101-000003": (2 ** 22 + 17, started, False)}  # no such pid
        for name, (pid, start, _) in cases.items():
            make_run(remote / "s" / name, f"uid{name[-1]}", status="running", files={"process.json": json.dumps(
                {"host": platform.node(), "pid": pid, "started": start, "attempt": A1, "heartbeat": now - 50})})
        result = synced(box_at(server, tmp_path / "box"), tmp_path / "runs")
    finally:
        sleeper.kill()
    for name, (pid, _, alive) in cases.items():
        seen = json.loads((tmp_path / "runs" / "s" / name / ".remote.json").read_text())
        assert seen["alive"] is alive and seen["pid"] == pid and seen["attempt"] == A1
        assert seen["host"] == platform.node() and 49 <= seen["heartbeat_age"] <= 120
        assert seen["box"] == f"{getpass.getuser()}@127.0.0.1:{server.port}"
        assert result.remote_state[f"s/{name}"] == seen


@needs_sshd
@pytest.mark.parametrize("how", ["rsync", "sftp"])
def test_push_files_copies_a_run_byte_for_byte(request, tmp_path, how):
    from ablate.remote.transfer import push_files

    server = request.getfixturevalue("server" if how == "rsync" else "rsyncless")
    local = tmp_path / "runs" / RUN
    lineage_run(local, [(A1, 0)], "failed", 3)
    (local / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (local / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(os.urandom(9 << 20))
    rels = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    conn = Connection(box_at(server, tmp_path / "box")).connect()
    try:
        how_moved = push_files(conn, local, rels, str(tmp_path / "box" / "runs" / RUN))
    finally:
        conn.close()
    assert how_moved.startswith(how)
    remote = tmp_path / "box" / "runs" / RUN
    assert hashes(remote) == hashes(local)
    assert all(int((remote / r).stat().st_mtime) == int((local / r).stat().st_mtime) for r in rels)


def _p(attempts=(A1,), status="running", step=10, heartbeat=100.0, writer=(A1,), from_steps=None):
    from ablate.results.lineage import Progress

    return Progress(tuple(attempts), tuple(from_steps or [0] * len(attempts)), status, step, heartbeat, writer)


@pytest.mark.parametrize("local, remote, expected", [
    (_p(), _p(), "same"),
    (_p(), _p(step=11), "ahead"),  # more steps
    (_p(step=11), _p(), "behind"),
    (_p(), _p(status="failed"), "ahead"),  # a terminal status over running, at the same step
    (_p(status="completed"), _p(), "behind"),
    (_p(), _p(heartbeat=130.0), "ahead"),  # a newer heartbeat of the same attempt
    (_p(heartbeat=130.0), _p(), "behind"),
    (_p(writer=("x",)), _p(heartbeat=130.0), "same"),  # heartbeats of two writers are not compared
    (_p(status="completed"), _p(status="gated"), "diverged"),  # two outcomes of one moment
    ((), (), "same"),  # older runs without history.jsonl
    (_p(), _p((A1, A2), from_steps=[0, 8], step=5), "ahead"),  # resumed from a checkpoint before the crash
    (_p(status="failed", step=47), _p((A1, A2), from_steps=[0, 40], status="completed", step=153), "ahead"),
    (_p(status="completed", step=47), _p((A1, A2), from_steps=[0, 40], step=41), "diverged"),  # a result skipped
    (_p(status="completed", step=40), _p((A1, A2), from_steps=[0, 40], step=41), "ahead"),
    (_p((A1, A2), from_steps=[0, 40], step=41), _p(status="completed", step=47), "diverged"),
    (_p((A1, A2), from_steps=[0, 40], step=41), _p(status="failed", step=47), "behind"),
    (_p((), writer=None), _p(), "ahead"),  # a copy from before history.jsonl existed, continued
    (_p((A1, A2)), _p((A1, "c" * 32)), "diverged"),  # two resumes of one run
    (_p((A2,)), _p((A1,)), "diverged"),
])
def test_lineage_verdicts(local, remote, expected):
    from ablate.results.lineage import verdict

    local = local if not isinstance(local, tuple) else _p(local, status="completed", writer=None)
    remote = remote if not isinstance(remote, tuple) else _p(remote, status="completed", writer=None)
    assert verdict(local, remote) == expected
