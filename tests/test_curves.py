"""Stage 3 curves: --report-to passes the Trainer's integrations through; the report draws train_log.jsonl.

    python -m pytest tests/test_curves.py -q
"""

import json
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.results import rundir
from ablate.results.curves import PANELS, plot_curves, read_log

DATA = str(Path(__file__).parent / "data" / "sft.jsonl")


def _stage3(model, runs, *extra):
    return main(["stage3", "--mask", "prefill_bidir", "--model", str(model), "--data", DATA, "--device", "cpu",
                 "--max-steps", "4", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "4",
                 "--max-length", "64", "--runs-dir", str(runs), *extra])


def test_report_to_tensorboard_and_wandb_offline_write_into_the_run(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert _stage3(tiny_llama, tmp_path / "runs", "--report-to", "tensorboard,wandb") == 0
    (run,) = (tmp_path / "runs" / "stage3_finetune_prefill_bidir").iterdir()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file in the run"
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run in the run folder"
    assert json.loads((run / "config.json").read_text())["report_to"] == ["tensorboard", "wandb"]
    # TensorBoard holds the same train loss as train_log.jsonl (the report's source).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    log = read_log(rundir.load_run(run))["loss"]
    assert [s for s, _ in tb] == [s for s, _ in log]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(tb, log))


@pytest.mark.parametrize("names,says", [("tensorbored", "name integrations among"), ("all", "name integrations"),
                                        ("mlflow", "not installed here")])
def test_bad_report_to_is_one_line(tiny_llama, tmp_path, capsys, names, says):
    if names == "mlflow":
        from transformers.integrations.integration_utils import get_available_reporting_integrations
        if "mlflow" in get_available_reporting_integrations():
            pytest.skip("mlflow is installed here")
    assert _stage3(tiny_llama, tmp_path / "runs", "--report-to", names) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not (tmp_path / "runs").exists()


def test_curves_of_every_stage3_run(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    assert _stage3(tiny_llama, runs) == 0
    assert main(["stage3", "--mask", "causal", "--model", str(tiny_llama), "--data", DATA, "--device", "cpu",
                 "--max-steps", "3", "--logging-steps", "1", "--save-steps", "3", "--max-length", "64",
                 "--runs-dir", str(runs)]) == 0
    (bidir,) = (runs / "stage3_finetune_prefill_bidir").iterdir()
    log = read_log(rundir.load_run(bidir))
    assert [s for s, _ in log["loss"]] == [1, 2, 3, 4] and [s for s, _ in log["eval_loss"]] == [2, 4]
    assert len(log["grad_norm"]) == 4 and {k for k, _ in PANELS} == set(log)
    labels = plot_curves(runs, tmp_path / "curves.png")
    assert sorted(label.split()[0] for label in labels) == ["causal", "prefill_bidir"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "docs" / "RESULTS.md")]) == 0
    assert "![training curves](RESULTS_curves.png)" in (tmp_path / "docs" / "RESULTS.md").read_text()
    assert (tmp_path / "docs" / "RESULTS_curves.png").read_bytes()[:4] == b"\x89PNG"
    # A damaged log line (a kill mid-write) is skipped, not fatal; a run with no log draws nothing.
    with open(bidir / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 1.0')
    assert read_log(rundir.load_run(bidir))["loss"][-1][0] == 4
    assert plot_curves(tmp_path / "empty", tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()
