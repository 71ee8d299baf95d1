"""Ctrl-C and faults during a run end in one line: python -m pytest tests/test_interrupt.py -q

A real SIGINT reaches a running ``python -m ablate stage1`` (while lm-eval scores) and ``stage3`` (in the
Trainer's loop): one line ``ablate: interrupted by SIGINT (Ctrl-C)``, exit 130, no traceback, and the run
marked failed with that reason. A save error (``final/`` cannot be created) ends the same way, exit 1.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.core.tasks import FIXTURE_DATA

REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = "interrupted by SIGINT (Ctrl-C)"


def _runs(runs: Path) -> list[Path]:
    return [p for p in runs.glob("*/*") if (p / "status.txt").is_file()]


def _status(run: Path) -> list[str]:
    return (run / "status.txt").read_text().splitlines()


def _wait(condition, proc=None, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _eval_argv(model: str) -> list[str]:
    # 112 requests one at a time: a second or more of scoring after the run folder says running
    return ["stage1", "--model", model, "--tasks", "ablate_tiny,piqa", "--task-data", f"piqa={FIXTURE_DATA['piqa']}",
            "--batch-size", "1", "--device", "cpu"]


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_ctrl_c_mid_run_is_one_line_exit_130_and_a_failed_run(stage, tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    argv = _eval_argv(tiny_llama) if stage == "stage1" else [
        "stage3", "--model", tiny_llama, "--data", "tests/data/sft.jsonl", "--device", "cpu", "--max-steps", "2000",
        "--max-length", "64", "--logging-steps", "1", "--save-steps", "1000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; a suite started in the background
    # (`cmd &` in a script) hands its children SIGINT ignored, and Python then installs no handler.
    proc = subprocess.Popen([sys.executable, "-m", "ablate", *argv, "--runs-dir", str(runs)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait(lambda: any(_status(r)[:1] == ["running"] for r in _runs(runs)), proc)
        if stage == "stage3":  # inside the Trainer's loop: a step has been logged
            _wait(lambda: any((r / "train_log.jsonl").is_file() for r in _runs(runs)), proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("ablate:")]
    assert said == [f"ablate: {INTERRUPTED}"], err
    assert "Traceback" not in out + err
    (run,) = _runs(runs)
    assert _status(run) == ["failed", INTERRUPTED]


def test_a_save_error_is_one_line_and_a_failed_run(tiny_llama, tmp_path, capsys):
    """``final/`` is taken by a file once the run has begun: the final save fails, and says so once."""
    runs = tmp_path / "runs"
    stop = threading.Event()

    def block_final():
        while not stop.is_set():
            for run in _runs(runs):
                (run / "final").write_text("in the way\n")
                return
            time.sleep(0.01)

    blocker = threading.Thread(target=block_final, daemon=True)
    blocker.start()
    try:
        code = main(["stage3", "--model", tiny_llama, "--data", "tests/data/sft.jsonl", "--device", "cpu",
                     "--max-steps", "1", "--max-length", "64", "--runs-dir", str(runs)])
    finally:
        stop.set()
        blocker.join()
    err = capsys.readouterr().err
    assert code == 1, err
    said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("ablate:")]
    assert len(said) == 1 and said[0].startswith("ablate: error: ") and "final" in said[0], err
    assert "Traceback" not in err and "Logging error" not in err
    (run,) = _runs(runs)
    status = _status(run)
    assert status[0] == "failed" and "final" in status[1]
