"""STATUS.md and the report from hand-made run directories: python -m pytest tests/test_status.py -q"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.results.report import write_report
from ablate.results.status import render
from handmade import edit_json, eval_run, stage3_run

runner = CliRunner()


def make_run(runs: Path, stage: str, run_id: str, status: str, reason: str = "", **files) -> Path:
    """A run folder with only what is given (a failed run, a damaged results file)."""
    path = runs / stage / run_id
    path.mkdir(parents=True)
    (path / "status.txt").write_text(status + (f"\n{reason}\n" if reason else "\n"))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (path / f"{name}.json").write_text(text)
    return path


PIQA, ARC = (394, 500, 2), (407, 500, 4)  # 0.788 and 0.814 over 500 documents, 2 and 4 choices


def study(runs: Path):
    s1 = eval_run(runs, "stage1_baseline_eval", "20260214-145148", {"piqa": PIQA, "arc_easy": ARC})
    s2 = eval_run(runs, "stage2_ablation_eval", "20260214-145456", {"piqa": (267, 500, 2), "arc_easy": (119, 500, 4)},
                  mask="prefill_bidir", baseline=s1)
    stage3_run(runs, "causal", "20260214-201019", losses=(1.35, 1.3254), eval_loss=1.3752)
    stage3_run(runs, "prefill_bidir", "20260214-201019", status="diverged",
               reason="grad norm 102 at step 50 is over 10x its recent median 1.2", losses=(1.2, 9.6486),
               norms=(1.2, 102.0), eval_loss=None, probe=(0.07, 1.023), steps_per_second=2.07, save=None)
    make_run(runs, "stage1_baseline_eval", "20260215-000000", "failed", "OutOfMemoryError: CUDA out of memory")
    make_run(runs, "stage1_baseline_eval", "20260215-010000", "completed", metrics='{"stage": "stage1", "tas')
    return s1, s2


def test_status_from_hand_made_runs(tmp_path):
    study(tmp_path)
    text = render(tmp_path)
    assert "- [x] Stage 1 baseline eval" in text and "- [x] Stage 2 ablated eval" in text
    assert "- [x] Stage 3A causal finetune" in text
    assert "- [ ] Stage 3B prefill_bidir finetune (leakage-safe)" in text
    assert "- [ ] Stage 4 post-FT ablated eval" in text
    assert "Macro accuracy: `0.801 -> 0.386` (delta `-0.415` [95% CI " in text and "retention `0.482x`)" in text
    assert "- piqa: `0.788 -> 0.534` (delta `-0.254` [95% CI " in text
    assert "`eval_loss=1.3752`" in text and "`train_loss=1.3377`" in text and "saved as `raw_state_dict`" in text
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
    assert "| piqa | 0.788 | 0.534 | -0.254 [" in text and "| 0.678 | 0.5 | 500 |" in text
    assert "20260214-145148" in text and "20260214-145456" in text
    assert "| prefill_bidir |" in text and "diverged" in text
    assert "No stage 4 run yet." in text and "![per-task accuracy](RESULTS_accuracy.png)" in text


def test_aggregate_across_seeds(tmp_path):
    from ablate.results.aggregate import aggregate

    for i, (seed, piqa, arc) in enumerate([(1, 35, 40), (2, 37, 42), (3, 36, 41)]):  # of 50: 0.70, 0.74, 0.72
        eval_run(tmp_path, "stage1_baseline_eval", f"2026010{i}-000000", {"piqa": (piqa, 50, 2), "arc_easy": (arc, 50, 4)},
                 seed=seed, created=i)
    eval_run(tmp_path, "stage1_baseline_eval", "20260109-000000", {"piqa": (5, 50, 2)}, status="failed", created=9)
    damaged = eval_run(tmp_path, "stage1_baseline_eval", "20260110-000000", {"piqa": (5, 50, 2)}, seed=4, created=10)
    edit_json(damaged / "metrics.json", lambda m: m["tasks"]["piqa"].update(acc=0.9))
    (row,) = aggregate(tmp_path)
    assert row["seeds"] == [1, 2, 3]
    assert row["tasks"]["piqa"]["mean"] == pytest.approx(0.72) and row["tasks"]["piqa"]["n"] == 3
    assert row["tasks"]["piqa"]["std"] == pytest.approx(0.02)
    assert row["macro"]["mean"] == pytest.approx(0.77) and row["macro"]["std"] == pytest.approx(0.02)
    text = write_report(tmp_path, tmp_path / "out" / "RESULTS.md").read_text()
    assert "## Across seeds" in text and "0.72 ± 0.02 (3)" in text
    result = runner.invoke(app, ["aggregate", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "agg.json")])
    assert result.exit_code == 0 and "piqa" in result.output and "n 3" in result.output
    assert f"not pooled: `{damaged}` has damaged results" in result.output and "tasks.piqa.acc is 0.9" in result.output
    assert json.loads((tmp_path / "agg.json").read_text())[0]["seeds"] == [1, 2, 3]


def test_p_values_under_a_ten_thousandth_are_not_printed_as_zero():
    from ablate.results.report import p_value

    assert p_value(3e-7) == "< 0.0001" and p_value(0.0117) == "0.0117" and p_value(1.0) == "1" and p_value(None) == "n/a"


def test_a_number_that_disagrees_with_its_samples_is_never_shown(tmp_path):
    s1, s2 = study(tmp_path)
    edit_json(s2 / "metrics.json", lambda m: m["baseline"]["macro"].update(delta=-0.575))  # issue 18, finding 5
    text = render(tmp_path)
    assert "-0.575" not in text.split("## Blockers")[0] and "- Not yet" in text
    (line,) = [x for x in text.split("## Blockers")[1].splitlines() if str(s2) in x]
    assert f"{s2 / 'metrics.json'}: baseline.macro.delta is -0.575, recomputed from its samples -0.415" in line
    report = write_report(tmp_path, tmp_path / "docs" / "RESULTS.md").read_text()
    assert "-0.575" not in report.split("## Not shown")[0] and f"- `{s2}`: damaged results, not shown" in report

    edit_json(s1 / "metrics.json", lambda m: m["tasks"]["piqa"].update(n=499))  # stage 1 itself, so stage 2 too
    blockers = render(tmp_path).split("## Blockers")[1]
    assert f"{s1 / 'metrics.json'}: tasks.piqa.n is 499, recomputed from its samples 500" in blockers


def test_a_stage3_summary_is_checked_against_its_train_log(tmp_path):
    run = stage3_run(tmp_path, "causal", "20260214-201019")
    assert "`eval_loss=1.3752`" in render(tmp_path)
    edit_json(run / "summary.json", lambda s: s.update(eval_loss=0.5))
    text = render(tmp_path)
    assert f"- causal: `{run}`: status `completed`, damaged results, not shown (see Blockers)" in text
    assert "eval_loss is 0.5, recomputed from train_log.jsonl 1.3752" in text.split("## Blockers")[1]


def test_the_plot_and_the_report_mark_a_leaky_run(tmp_path):
    from ablate.results.report import LEAKY, plot
    from ablate.results.rundir import load_run

    s1, _ = study(tmp_path)
    leaky = eval_run(tmp_path, "stage2_ablation_eval", "20260216-000000", {"piqa": (490, 500, 2), "arc_easy": ARC},
                     mask="full_bidir", baseline=s1, created=1.0)
    labels = plot(tmp_path / "plot.png", load_run(s1), load_run(leaky), None)
    assert labels == ["stage 1: causal", "stage 2: full_bidir (LEAKY)"]
    report = write_report(tmp_path, tmp_path / "docs" / "RESULTS.md").read_text()
    assert f"{LEAKY}." in report and "**LEAKY**: stage 2 ran under a mask" in report
    assert "**LEAKY**" in render(tmp_path).split("## Key Results")[1].splitlines()[0]
