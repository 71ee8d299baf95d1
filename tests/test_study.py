"""``ablate study --config``: one file, stage 1 to the report, resuming where it stopped: python -m pytest tests/test_study.py -q"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablate.cli import main
from ablate.results.rundir import STAGE1, STAGE2, STAGE4

DATA = str(Path(__file__).parent / "data" / "sft.jsonl")
STAGES = (STAGE1, STAGE2, "stage3_finetune_causal", "stage3_finetune_prefill_bidir", STAGE4)


def _study(tmp_path, model, **stage3) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model), "tasks": ["ablate_tiny"], "device": "cpu", "limit": 8,
        "runs_dir": str(tmp_path / "runs"),
        "stage3": {"data": DATA, "max_steps": 4, "save_steps": 2, "max_length": 64, "warmup_steps": 0,
                   "learning_rate": 1e-3, **stage3},
    }))
    return path


def _runs(tmp_path) -> dict[str, list[str]]:
    return {s: sorted(p.name for p in (tmp_path / "runs" / s).iterdir()) if (tmp_path / "runs" / s).is_dir() else []
            for s in STAGES}


def test_a_killed_study_resumes_and_a_finished_one_reruns_nothing(tiny_llama, tmp_path, capsys):
    path = _study(tmp_path, tiny_llama)
    # Killed (SIGKILL) after stage 3's third optimizer step, as a lost box would leave it.
    env = {**os.environ, "ABLATE_FAULT_KILL_AT": "step:3"}
    killed = subprocess.run([sys.executable, "-m", "ablate", "study", "--config", str(path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _runs(tmp_path)
    assert [len(before[s]) for s in STAGES] == [1, 1, 1, 0, 0]

    assert main(["study", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{STAGE1}: reusing" in out and f"{STAGE2}: reusing" in out
    assert "stage3_finetune_causal: resuming" in out and "stage3_finetune_prefill_bidir: ran" in out
    after = _runs(tmp_path)
    assert after["stage3_finetune_causal"] == before["stage3_finetune_causal"]  # resumed in place, not rerun
    causal = tmp_path / "runs" / "stage3_finetune_causal" / after["stage3_finetune_causal"][0]
    attempts = [json.loads(line) for line in (causal / "history.jsonl").read_text().splitlines()]
    assert [a.get("from_step") for a in attempts] == [0, 2]
    assert (causal / "status.txt").read_text().startswith("completed")
    s4 = json.loads(next((tmp_path / "runs" / STAGE4).iterdir()).joinpath("metrics.json").read_text())
    assert sorted(Path(c["checkpoint"]).parent.name for c in s4["checkpoints"]) == list(STAGES[2:4])
    assert (tmp_path / "RESULTS.md").is_file() and (tmp_path / "STATUS.md").is_file()

    assert main(["study", "--config", str(path)]) == 0  # everything is there: nothing runs again
    assert _runs(tmp_path) == after
    assert capsys.readouterr().out.count(": reusing") == 5

    # Another learning rate is another finetune: stages 1 and 2 are reused, 3 and 4 run again.
    path = _study(tmp_path, tiny_llama, learning_rate=2e-3)
    assert main(["study", "--config", str(path)]) == 0
    again = _runs(tmp_path)
    assert [len(again[s]) for s in STAGES] == [1, 1, 2, 2, 2]


def test_a_gated_stage_stops_the_study_in_one_line(tiny_llama, tmp_path, capsys):
    path = _study(tmp_path, tiny_llama)
    study = yaml.safe_load(path.read_text())
    study["stage1"] = {"gate": {"metric": "macro.acc", "min": 1.01}}  # no model passes this
    path.write_text(yaml.safe_dump(study))
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("ablate:")]  # the rest is stage 1's own log
    assert "study stopped" in line and "gated" in line and "Traceback" not in err
    assert [len(v) for v in _runs(tmp_path).values()] == [1, 0, 0, 0, 0]


@pytest.mark.parametrize("study,says", [
    ({"study": {"masks": ["full_bidir"]}}, "study.masks must list"),
    ({"stage4": {"runs_dir": "elsewhere"}}, "one runs folder"),
    ({"stage3": {"data": ""}}, "no training data"),
])
def test_the_whole_file_is_checked_before_any_stage_runs(tiny_llama, tmp_path, capsys, study, says):
    path = _study(tmp_path, tiny_llama)
    data = yaml.safe_load(path.read_text())
    for key, value in study.items():
        data[key] = {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "runs").exists()


def test_each_evaluation_stage_builds_its_tasks_once(tiny_llama, tmp_path, monkeypatch):
    """The tasks the study builds to find a reusable run are the ones the stage it then runs evaluates."""
    import ablate.core.tasks
    from ablate.stages.study import run_study

    real, said = ablate.core.tasks.load_tasks, []

    def load_tasks(*args, **kwargs):  # the real build, counted in the order of the study's own lines
        said.append("built")
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate.core.tasks, "load_tasks", load_tasks)
    path = _study(tmp_path, tiny_llama, max_steps=2, save_steps=2)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "study": {"masks": ["prefill_bidir"]}}))
    stage3 = "stage3_finetune_prefill_bidir"

    run_study(path, say=said.append)
    assert [line.split(" ")[:2] for line in said] == [
        ["built"], [f"{STAGE1}:", "ran"], ["built"], [f"{STAGE2}:", "ran"], [f"{stage3}:", "ran"],
        ["built"], [f"{STAGE4}:", "ran"]]
    said.clear()
    run_study(path, say=said.append)  # all reused: an evaluation's record needs its tasks, stage 4's config does not
    assert [line.split(" ")[:2] for line in said] == [
        ["built"], [f"{STAGE1}:", "reusing"], ["built"], [f"{STAGE2}:", "reusing"], [f"{stage3}:", "reusing"],
        [f"{STAGE4}:", "reusing"]]
