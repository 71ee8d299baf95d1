"""Killed runs tell the truth: python -m pytest tests/test_crash.py -q

SIGKILL leaves a run `running` on disk; every reader shows it `crashed` and
STATUS.md lists it under Blockers. SIGTERM ends a run `failed`, naming the
signal. Two processes never write one run.
"""

import json
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.results import rundir
from ablate.errors import BadInput
from ablate.results.status import render


def stage1(model, runs, fault=None, timeout=300):
    env = {**os.environ, **({"ABLATE_FAULT_KILL_AT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "ablate", "stage1", "--model", str(model), "--tasks", "ablate_tiny",
                           "--device", "cpu", "--limit", "4", "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def only_run(runs, stage="stage1_baseline_eval"):
    (path,) = [p for p in (Path(runs) / stage).iterdir() if p.is_dir()]
    return path


def test_sigkill_during_stage1_reads_crashed_and_is_a_blocker(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    proc = stage1(tiny_llama, runs, fault="eval")
    assert proc.returncode == -9, proc.stderr[-2000:]
    path = only_run(runs)
    assert (path / "status.txt").read_text().split()[0] == "running"  # what the dead process left
    run = rundir.load_run(path)
    assert run.status == rundir.CRASHED and "is gone" in run.reason
    assert rundir.latest(runs, "stage1_baseline_eval", statuses=rundir.USABLE) is None
    status = render(runs)
    blockers = status.split("## Blockers")[1]
    assert str(path) in blockers and "**crashed**" in blockers and "rerun the stage" in blockers
    assert "None active" not in blockers


def test_sigterm_during_stage1_ends_failed_naming_the_signal(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    proc = stage1(tiny_llama, runs, fault="eval/TERM")
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "ablate: terminated by SIGTERM"
    assert "Traceback" not in proc.stderr
    run = rundir.load_run(only_run(runs))
    assert run.status == rundir.FAILED and run.reason == "terminated by SIGTERM"


def test_a_running_run_of_another_host_is_judged_by_the_box_not_by_this_clock(tmp_path):
    path = rundir.new_run_dir(tmp_path, "stage1_baseline_eval")
    rundir._unlock(path)
    record = json.loads((path / "process.json").read_text())
    box = {**record, "host": "a-rented-box"}
    for heartbeat in (record["heartbeat"], record["heartbeat"] - 3600, record["heartbeat"] + 3600):
        # however far this machine's clock is from the box's, no evidence is no verdict
        rundir.write_json(path / "process.json", {**box, "heartbeat": heartbeat})
        run = rundir.load_run(path)
        assert run.status == rundir.RUNNING and "no sync has checked it" in run.reason
    seen = {"host": "a-rented-box", "pid": box["pid"], "attempt": box["attempt"], "synced_at": time.time(),
            "box": "root@box:22", "alive": True}
    verdicts = [({"heartbeat_age": 12.0}, rundir.RUNNING, "running on a-rented-box, heartbeat 12 s old at"),
                ({"heartbeat_age": 3600.0}, rundir.CRASHED, "no heartbeat on a-rented-box for 3600 s at the sync"),
                ({"alive": False}, rundir.CRASHED, "said at"),
                ({"alive": False, "why": "declared lost by push"}, rundir.CRASHED, "declared lost by push"),
                # a record about another writer (an earlier attempt, another pid or host) says nothing of this one
                ({"attempt": "0" * 32, "alive": False}, rundir.RUNNING, "no sync has checked it"),
                ({"pid": box["pid"] + 1, "alive": False}, rundir.RUNNING, "no sync has checked it"),
                ({"host": "another-box", "alive": False}, rundir.RUNNING, "no sync has checked it")]
    rundir.write_json(path / "process.json", box)
    for change, status, why in verdicts:
        rundir.write_json(path / rundir.REMOTE_FILE, {**seen, **change})
        run = rundir.load_run(path)
        assert (run.status, why in run.reason) == (status, True), (change, run.reason)


def test_every_attempt_is_in_the_run_lineage(tmp_path):
    path = rundir.new_run_dir(tmp_path, "stage3_finetune_causal")
    rundir._unlock(path)
    rundir.reopen(path, from_step=40)
    rundir._unlock(path)
    history = [json.loads(line) for line in (path / rundir.HISTORY_FILE).read_text().splitlines()]
    assert [h["from_step"] for h in history] == [0, 40] and len({h["attempt"] for h in history}) == 2
    assert json.loads((path / "process.json").read_text())["attempt"] == history[-1]["attempt"]


def test_a_second_writer_is_refused(tmp_path):
    path = rundir.new_run_dir(tmp_path, "stage3_finetune_causal")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(path / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        rundir._unlock(path)  # this process lets go; the other one takes it
        assert holder.stdout.readline().strip() == "locked"
        before = (path / "process.json").read_bytes()
        with pytest.raises(BadInput, match="is being written by another ablate process"):
            rundir.reopen(path)
        assert (path / "process.json").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_folders_that_are_not_runs_are_never_the_latest(tmp_path):
    stage = tmp_path / "stage1_baseline_eval"
    real = rundir.new_run_dir(tmp_path, "stage1_baseline_eval")
    rundir.write_json(real / "metrics.json", {"stage": "stage1_baseline_eval"})
    rundir.set_status(real, rundir.COMPLETED)
    rundir._unlock(real)
    for stray in ("old-backup", ".ipynb_checkpoints", "99999999-999999-copy-without-status"):
        (stage / stray).mkdir()
    (stage / "old-backup" / "status.txt").write_text("completed\n")
    (stage / "old-backup" / "metrics.json").write_text("{}")
    assert [r.path for r in rundir.find_runs(tmp_path, "stage1_baseline_eval")] == [real]
    assert rundir.latest(tmp_path, "stage1_baseline_eval").path == real


def test_sigkill_during_stage3_reads_crashed_with_the_resume_command(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "ablate", "stage3", "--mask", "prefill_bidir", "--model",
                           str(tiny_llama), "--data", "tests/data/sft.jsonl", "--device", "cpu", "--max-steps", "4",
                           "--save-steps", "2", "--warmup-steps", "0", "--max-length", "64", "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ABLATE_FAULT_KILL_AT": "step:3"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    path = only_run(runs, "stage3_finetune_prefill_bidir")
    run = rundir.load_run(path)
    assert run.status == rundir.CRASHED
    blockers = render(runs).split("## Blockers")[1]
    assert f"`{path}` is **crashed**" in blockers
    assert f"`ablate stage3 --resume --run-dir {path}`" in blockers
