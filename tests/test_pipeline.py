"""The whole study through the CLI on a tiny local model: python -m pytest tests/test_pipeline.py -q

stage 1 -> stage 2 -> stage 3 (both masks) -> stage 4 -> report -> status.
"""

import json
from pathlib import Path

from typer.testing import CliRunner

from ablate.cli import app
from ablate.core.tasks import FIXTURE_DATA

DATA = Path(__file__).parent / "data" / "sft.jsonl"
runner = CliRunner()


def ablate(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_the_study_end_to_end(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    evals = ["--model", tiny_llama, "--tasks", "ablate_tiny,arc_easy", "--task-data",
             f"arc_easy={FIXTURE_DATA['arc_easy']}", "--device", "cpu", "--runs-dir", runs]
    ablate("stage1", *evals)
    ablate("stage2", "--mask", "prefill_bidir", *evals)
    for mask in ("causal", "prefill_bidir"):
        ablate("stage3", "--mask", mask, "--model", tiny_llama, "--data", DATA, "--device", "cpu", "--runs-dir", runs,
               "--max-steps", "4", "--save-steps", "2", "--warmup-steps", "0", "--learning-rate", "1e-3")
    out = ablate("stage4", "--device", "cpu", "--runs-dir", runs).output
    assert "causal-" in out and "prefill_bidir-" in out and "retention" in out
    ablate("report", "--runs-dir", runs, "--out", tmp_path / "docs" / "RESULTS.md")
    ablate("status", "--runs-dir", runs)

    status = (tmp_path / "STATUS.md").read_text()
    assert status.count("- [x]") == 6 and "The study is complete." in status
    s4 = next((runs / "stage4_post_ft_eval").iterdir())
    metrics = json.loads((s4 / "metrics.json").read_text())
    assert str(s4) in status and metrics["stage1_run"] in status
    report = (tmp_path / "docs" / "RESULTS.md").read_text()
    for entry in metrics["checkpoints"]:
        assert entry["checkpoint"] in report
        macro = entry["recovery"]["macro"]
        assert f"| macro | {macro['acc_stage1']:.4f}".rstrip("0").rstrip(".") in report
    assert (tmp_path / "docs" / "RESULTS_accuracy.png").stat().st_size > 1000
