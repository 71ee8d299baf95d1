"""Order and names are recorded, not inferred; files go where they say: python -m pytest tests/test_run_store.py -q"""

import json
import os
import shutil
import time

import pytest
from ablate.cli import main
from ablate.results import rundir
from ablate.results.status import render, write_status


def finished(runs, stage, name, created, metrics=None):
    """A completed run as ablate writes it, with its start time recorded as ``created`` (UTC epoch)."""
    path = runs / stage / name
    path.mkdir(parents=True)
    rundir.write_json(path / "run.json", {"uid": f"uid-{name}", "stage": stage, "created": created, "name": name})
    rundir.write_json(path / "metrics.json", metrics or {"stage": stage, "macro": {"acc": 0.5}})
    rundir.set_status(path, rundir.COMPLETED)
    return path


def test_latest_is_the_recorded_start_time_not_the_folder_name(tmp_path):
    # a box an hour ahead of UTC names its run 10:00; this machine's later run is named 09:30
    boxed = finished(tmp_path, rundir.STAGE1, "20260101-100000", created=1_000.0)
    local = finished(tmp_path, rundir.STAGE1, "20260101-093000", created=2_000.0)
    assert [r.path for r in rundir.find_runs(tmp_path, rundir.STAGE1)] == [boxed, local]
    assert rundir.latest(tmp_path, rundir.STAGE1).path == local


def test_copies_and_renamed_stage_folders_are_never_runs(tmp_path):
    own = finished(tmp_path, rundir.STAGE3_PREFIX + "causal", "20260101-000000", created=1.0)
    for name in ("20260101-000000-backup", "20260101-000000-copy"):
        shutil.copytree(own, own.parent / name)
    shutil.copytree(own.parent, tmp_path / (rundir.STAGE3_PREFIX + "causal.bak"))
    runs = rundir.find_runs(tmp_path, rundir.STAGE3_PREFIX + "causal")
    assert [r.path for r in runs] == [own]
    assert len(rundir.find_runs(tmp_path, rundir.STAGE3_PREFIX + "causal", with_copies=True)) == 3
    assert rundir.stages_with_prefix(tmp_path, rundir.STAGE3_PREFIX) == [rundir.STAGE3_PREFIX + "causal"]
    blockers = render(tmp_path).split("## Blockers")[1]
    assert blockers.count("holds another copy of the run in") == 2


def test_a_new_run_records_its_name_and_utc_start(tmp_path):
    before = time.time()
    path = rundir.new_run_dir(tmp_path, rundir.STAGE1)
    rundir._unlock(path)
    info = json.loads((path / "run.json").read_text())
    assert info["name"] == path.name and before <= info["created"] <= time.time()


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_run_json_is_damage(tmp_path, text):
    path = finished(tmp_path, rundir.STAGE1, "20260101-000000", created=1.0)
    (path / "metrics.json").write_text('{"macro": {"acc": %s}}' % text)
    run = rundir.load_run(path)
    assert run.metrics is None and "unreadable" in run.error
    assert rundir.latest(tmp_path, rundir.STAGE1) is None


def test_status_headline_names_its_mask_and_prefers_the_ablation(tmp_path):
    from handmade import eval_run

    ablation = eval_run(tmp_path, rundir.STAGE2, "20260101-000000", {"t": (2, 5, 2)}, mask="prefill_bidir", created=1.0)
    eval_run(tmp_path, rundir.STAGE2, "20260101-000100", {"t": (3, 5, 2)}, mask="causal", created=2.0)
    text = render(tmp_path)
    assert "## Key Results (Stage 1 vs Stage 2, mask `prefill_bidir`)" in text and f"`{ablation}`" in text


def test_status_goes_beside_the_runs_folder_as_named_not_beside_a_symlinks_target(tmp_path):
    (tmp_path / "disk" / "runs").mkdir(parents=True)
    (tmp_path / "disk" / "STATUS.md").write_text("someone else's file\n")
    (tmp_path / "project").mkdir()
    os.symlink(tmp_path / "disk" / "runs", tmp_path / "project" / "runs")
    out = write_status(tmp_path / "project" / "runs")
    assert out == tmp_path / "project" / "STATUS.md" and out.is_file()
    assert (tmp_path / "disk" / "STATUS.md").read_text() == "someone else's file\n"


@pytest.mark.parametrize("command", ["status", "report"])
def test_out_through_a_symlink_or_onto_a_folder_is_refused(tmp_path, capsys, command):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere.md").write_text("keep\n")
    os.symlink(tmp_path / "elsewhere.md", tmp_path / "link.md")
    (tmp_path / "a-folder.md").mkdir()
    for out, why in ((tmp_path / "link.md", "is a symlink"), (tmp_path / "a-folder.md", "is not a regular file")):
        code = main([command, "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and why in err and err.count("\n") == 1, err
    assert (tmp_path / "elsewhere.md").read_text() == "keep\n" and (tmp_path / "link.md").is_symlink()


@pytest.mark.parametrize("args", [["status", "--runs-dir", ""], ["report", "--runs-dir", ""],
                                  ["stage1", "--model", "x", "--runs-dir", ""]])
def test_an_empty_runs_dir_is_refused(tmp_path, args, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "--runs-dir must name a folder" in err and not list(tmp_path.iterdir())


def test_a_diverged_run_summary_prints_without_a_type_error():
    from ablate.cli.stages import stage3_summary

    text = stage3_summary({"status": "diverged", "train_loss": None, "eval_loss": None, "global_step": 3,
                           "grad_norm": {"last": None, "max": 102.0}, "probe": {"before": None, "after": {}},
                           "mask": "prefill_bidir", "leaky": False, "save": None})
    assert "diverged" in text and "102.0000" in text and "n/a" in text


def test_a_leaky_evaluation_needs_the_flag_and_is_marked_everywhere(tiny_llama, tmp_path, capsys):
    runs = tmp_path / "runs"
    flags = ["--model", str(tiny_llama), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4",
             "--runs-dir", str(runs)]
    assert main(["stage1", *flags]) == 0
    assert main(["stage2", "--mask", "full_bidir", *flags]) == 2  # refused, nothing written
    assert "--allow-label-leakage" in capsys.readouterr().err and not (runs / rundir.STAGE2).exists()
    assert main(["stage2", "--mask", "full_bidir", "--allow-label-leakage", *flags]) == 0
    (run,) = rundir.find_runs(runs, rundir.STAGE2)
    assert run.metrics["leaky"] is True
    status = render(runs)
    assert "mask `full_bidir`) **LEAKY**" in status and f"`{run.path}` is **leaky**" in status
    assert main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "R.md")]) == 0
    assert "**LEAKY**" in (tmp_path / "R.md").read_text()
