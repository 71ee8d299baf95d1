"""STATUS.md and the report from hand-made run directories: python -m pytest tests/test_status.py -q"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.results.report import write_report
from ablate.results.status import render

runner = CliRunner()


def make_run(runs: Path, stage: str, run_id: str, status: str, reason: str = "", **files) -> Path:
    path = runs / stage / run_id
    path.mkdir(parents=True)
    (path / "status.txt").write_text(status + (f"\n{reason}\n" if reason else "\n"))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (path / f"{name}.json").write_text(text)
    return path


def stage_metrics(acc_piqa, acc_arc, stage="stage1_baseline_eval", mask="causal", baseline=None):
    m = {"stage": stage, "status": "completed", "model": "m", "mask": mask,
         "tasks": {"piqa": {"acc": acc_piqa, "acc_stderr": 0.02, "chance": 0.5, "n": 500},
                   "arc_easy": {"acc": acc_arc, "acc_stderr": 0.02, "chance": 0.25, "n": 500}},
         "macro": {"acc": (acc_piqa + acc_arc) / 2, "chance": 0.375}}
    if baseline:
        m["baseline"] = baseline
    return m


def study(runs: Path):
    s1 = make_run(runs, "stage1_baseline_eval", "20260214-145148", "completed", metrics=stage_metrics(0.788, 0.814))
    base = {"run": str(s1), "run_id": s1.name,
            "tasks": {"piqa": {"acc_baseline": 0.788, "delta": 0.534 - 0.788, "retention": 0.534 / 0.788},
                      "arc_easy": {"acc_baseline": 0.814, "delta": 0.238 - 0.814, "retention": 0.238 / 0.814}},
            "macro": {"acc_baseline": 0.801, "delta": 0.386 - 0.801, "retention": 0.386 / 0.801}}
    make_run(runs, "stage2_ablation_eval", "20260214-145456", "completed",
             metrics=stage_metrics(0.534, 0.238, "stage2_ablation_eval", "prefill_bidir", base))
    make_run(runs, "stage3_finetune_causal", "20260214-201019", "completed", summary={
        "status": "completed", "leaky": False, "eval_loss": 1.3752, "train_loss": 1.3377,
        "train_steps_per_second": 2.425, "grad_norm": {"last": 0.9, "max": 3.1},
        "probe": {"after": {"loss_mask": 1.1, "loss_causal": 1.1}}, "save": {"format": "raw_state_dict"}})
    make_run(runs, "stage3_finetune_prefill_bidir", "20260214-201019", "diverged",
             "grad norm 102 at step 50 is over 10x its recent median 1.2",
             summary={"status": "diverged", "leaky": False, "eval_loss": None, "train_loss": 5.4243,
                      "train_steps_per_second": 2.07, "grad_norm": {"last": 102.0, "max": 102.0},
                      "probe": {"after": {"loss_mask": 0.07, "loss_causal": 1.023}}, "save": None})
    make_run(runs, "stage1_baseline_eval", "20260215-000000", "failed", "OutOfMemoryError: CUDA out of memory")
    make_run(runs, "stage1_baseline_eval", "20260215-010000", "completed", metrics='{"stage": "stage1", "tas')


def test_status_from_hand_made_runs(tmp_path):
    study(tmp_path)
    text = render(tmp_path)
    assert "- [x] Stage 1 baseline eval" in text and "- [x] Stage 2 ablated eval" in text
    assert "- [x] Stage 3A causal finetune" in text
    assert "- [ ] Stage 3B prefill_bidir finetune (leakage-safe)" in text
    assert "- [ ] Stage 4 post-FT ablated eval" in text
    assert "Macro accuracy: `0.801 -> 0.386` (delta `-0.415`, retention `0.482x`)" in text
    assert "- piqa: `0.788 -> 0.534` (delta `-0.254`)" in text
    assert "`eval_loss=1.3752`" in text and "saved as `raw_state_dict`" in text
    assert "is **diverged**: grad norm 102 at step 50" in text
    assert "is **failed**: OutOfMemoryError" in text
    assert "20260215-010000/metrics.json: unreadable" in text  # the corrupted file, by path
    assert "Next: Stage 3B prefill_bidir finetune (leakage-safe)." in text
    assert "1. Stage 3B prefill_bidir finetune (leakage-safe): `ablate stage3 --mask prefill_bidir" in text


def test_status_of_an_empty_study(tmp_path):
    text = render(tmp_path)
    assert "0 of 6 study steps are complete" in text and "- None active." in text


def test_status_command_writes_beside_the_runs(tmp_path):
    study(tmp_path / "runs")
    result = runner.invoke(app, ["status", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "STATUS.md").read_text() == render(tmp_path / "runs")
    result = runner.invoke(app, ["status", "--runs-dir", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_report_is_reproducible_and_names_its_runs(tmp_path):
    study(tmp_path / "runs")
    out = write_report(tmp_path / "runs", tmp_path / "docs" / "RESULTS.md")
    first = out.read_bytes(), (tmp_path / "docs" / "RESULTS_accuracy.png").read_bytes()
    write_report(tmp_path / "runs", out)
    assert (out.read_bytes(), (tmp_path / "docs" / "RESULTS_accuracy.png").read_bytes()) == first
    text = out.read_text()
    assert "| piqa | 0.788 | 0.534 | -0.254 | n/a | 0.678 |" in text  # no per-document pairing in this fixture
    assert "20260214-145148" in text and "20260214-145456" in text
    assert "| prefill_bidir |" in text and "diverged" in text
    assert "No stage 4 run yet." in text and "![per-task accuracy](RESULTS_accuracy.png)" in text


def test_aggregate_across_seeds(tmp_path):
    from ablate.results.aggregate import aggregate

    for i, (seed, piqa, arc) in enumerate([(1, 0.70, 0.80), (2, 0.74, 0.84), (3, 0.72, 0.82)]):
        m = stage_metrics(piqa, arc)
        m.update(seed=seed, comparison={"tasks": ["arc_easy", "piqa"]})
        make_run(tmp_path, "stage1_baseline_eval", f"2026010{i}-000000", "completed", metrics=m)
    make_run(tmp_path, "stage1_baseline_eval", "20260109-000000", "failed", metrics=stage_metrics(0.1, 0.1))
    (row,) = aggregate(tmp_path)
    assert row["seeds"] == [1, 2, 3]
    assert row["tasks"]["piqa"]["mean"] == pytest.approx(0.72) and row["tasks"]["piqa"]["n"] == 3
    assert row["tasks"]["piqa"]["std"] == pytest.approx(0.02)
    assert row["macro"]["mean"] == pytest.approx(0.77) and row["macro"]["std"] == pytest.approx(0.02)
    text = write_report(tmp_path, tmp_path / "out" / "RESULTS.md").read_text()
    assert "## Across seeds" in text and "0.72 ± 0.02 (3)" in text
    result = runner.invoke(app, ["aggregate", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "agg.json")])
    assert result.exit_code == 0 and "piqa" in result.output and "n 3" in result.output
    assert json.loads((tmp_path / "agg.json").read_text())[0]["seeds"] == [1, 2, 3]


def test_p_values_under_a_ten_thousandth_are_not_printed_as_zero():
    from ablate.results.report import p_value

    assert p_value(3e-7) == "< 0.0001" and p_value(0.0117) == "0.0117" and p_value(1.0) == "1" and p_value(None) == "n/a"
