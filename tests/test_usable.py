"""A stage 3 run is completed only if usable, and stage 4 checks what it scores: python -m pytest tests/test_usable.py -q

Each way to get a useless or changed finetune (nothing supervised, destroyed weights, final/ or a LoRA
base replaced after training, --resume on edited data, a leaky mask) is refused or marked, and stage 4
never scores it by default.
"""

import json
import shutil
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState
from typer.testing import CliRunner

from ablate.cli import app
from ablate.core.tiny import build_tiny_model
from ablate.results import rundir
from ablate.stages.config import Stage4Config, load_finetune_config
from ablate.stages.stage3_finetune import TrainLog, loss_ceiling, run_stage3
from ablate.stages.stage4_post_ft_eval import choose_finetunes

DATA = Path(__file__).parent / "data" / "sft.jsonl"
runner = CliRunner()


def stage3(model, runs, **overrides):
    flags = dict(model=str(model), data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=2,
                 learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, logging_steps=1, save_steps=100,
                 probe_samples=2)
    return run_stage3(load_finetune_config({**flags, **overrides}))


def stage4(runs, *extra):
    return runner.invoke(app, ["stage4", "--device", "cpu", "--runs-dir", str(runs), *extra])


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


def test_data_without_supervised_tokens_is_refused_with_the_counts(tiny_llama, tmp_path):
    result = runner.invoke(app, ["stage3", "--model", str(tiny_llama), "--data", str(DATA), "--device", "cpu",
                                 "--runs-dir", str(tmp_path / "runs"), "--max-length", "1", "--truncate-prompts"])
    assert result.exit_code == 2, result.output
    assert "40 row(s) give 40 example(s) with 0 supervised (response) tokens at --max-length 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("learning_rate,steps,reason", [
    (1e39, 1, "final weights are not finite"),  # one step to inf
    (1e30, 1, "eval loss is nan"),  # one step to 1e30 weights: finite, but every loss is NaN
    (1e3, 2, "rose over 18.71 (10x the first logged loss 6.188"),  # the loss to millions
])
def test_a_destroyed_model_ends_diverged_and_stage4_never_scores_it(tiny_llama, tmp_path, learning_rate, steps,
                                                                    reason):
    run = stage3(tiny_llama, tmp_path, learning_rate=learning_rate, max_steps=steps)
    summary = summary_of(run)
    assert summary["status"] == "diverged" and reason in summary["diverged_reason"]
    assert (run / "status.txt").read_text().splitlines() == ["diverged", summary["diverged_reason"]]
    assert summary["save"] is None and not (run / "final").exists()
    result = stage4(tmp_path)  # by default: never picked
    assert result.exit_code == 2 and "no completed stage 3 run" in result.stderr
    result = stage4(tmp_path, "--checkpoint", str(run))  # named: refused, pointing at its checkpoints
    assert result.exit_code == 2 and f"is diverged ({summary['diverged_reason']})" in result.stderr
    assert "Name one of its checkpoints" in result.stderr
    assert not (tmp_path / "stage4_post_ft_eval").exists()


@pytest.mark.parametrize("logs,reason", [
    ({"loss": 6.19, "grad_norm": 0.0}, "grad norm collapsed to 0 at step 2 while the loss stays at 6.19"),
    ({"loss": 6.19, "grad_norm": float("nan")}, "non-finite grad norm at step 2"),
    ({"loss": float("inf"), "grad_norm": 1.0}, "non-finite loss inf at step 2"),
    ({"loss": 62.0, "grad_norm": 1.0}, "loss 62 at step 2 rose over 18.71"),
    ({"loss": 6.0, "grad_norm": 1.0}, None),
    ({"loss": 0.0, "grad_norm": 0.0}, None),  # nothing left to learn: converged, not saturated
])
def test_the_divergence_rules_on_a_logged_step(tmp_path, logs, reason):
    train_log = TrainLog(tmp_path / "train_log.jsonl", 10.0, 20, True, vocab_size=512,
                         history=[{"step": 1, "loss": 6.188, "grad_norm": 3.1}])
    control = train_log.on_log(None, TrainerState(global_step=2, max_steps=4), TrainerControl(), logs=logs)
    assert train_log.diverged == reason or reason in (train_log.diverged or "")
    assert control.should_training_stop is (reason is not None)


def test_the_loss_ceiling_stays_between_uniform_guessing_and_three_times_it():
    import math

    assert loss_ceiling(6.188, 512) == pytest.approx(3 * math.log(512))  # 10x would be 62
    assert loss_ceiling(0.05, 512) == pytest.approx(math.log(512))  # 10x would be 0.5
    assert loss_ceiling(1.0, 512) == pytest.approx(10.0)


def test_final_replaced_by_the_base_weights_is_refused(tiny_llama, tmp_path):
    run = stage3(tiny_llama, tmp_path)
    assert summary_of(run)["save"]["fingerprint"]
    shutil.copy(Path(tiny_llama) / "model.safetensors", run / "final" / "model.safetensors")
    result = stage4(tmp_path)
    assert result.exit_code == 2 and f"{run / 'final'} changed after stage 3 saved it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "stage4_post_ft_eval").exists()


def test_a_lora_run_whose_base_model_was_replaced_is_refused(tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    run = stage3(base, tmp_path / "runs", lora_r=4)
    assert summary_of(run)["status"] == "completed"
    other = build_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(Path(other) / "model.safetensors", base / "model.safetensors")  # another model, same path
    result = stage4(tmp_path / "runs", "--checkpoint", str(run))
    assert result.exit_code == 2, result.output
    assert f"the LoRA adapter {run / 'final'} was trained on local model" in result.stderr
    assert "its base model path now holds local model" in result.stderr


def test_resume_refuses_an_edited_data_file(tiny_llama, tmp_path):
    data = tmp_path / "sft.jsonl"
    shutil.copy(DATA, data)
    run = stage3(tiny_llama, tmp_path / "runs", data=str(data), max_steps=2, save_steps=1)
    assert json.loads((run / "run.json").read_text())["data_identity"] == summary_of(run)["data_identity"]
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    rundir.set_status(run, "failed", "set by the test")
    data.write_text(data.read_text().replace(" red", " blue"))  # relabelled since the run started
    result = runner.invoke(app, ["stage3", "--resume", "--run-dir", str(run)])
    assert result.exit_code == 2, result.output
    assert f"was started on --data {data} with sha256" in result.stderr
    assert "resuming would train on other data" in result.stderr
    assert (run / "status.txt").read_text().startswith("failed")


def test_default_stage4_skips_a_leaky_run_and_says_so(tiny_llama, tmp_path):
    leaky = stage3(tiny_llama, tmp_path, mask="full_bidir", allow_label_leakage=True)
    assert summary_of(leaky)["leaky"] is True and summary_of(leaky)["status"] == "completed"
    result = stage4(tmp_path)
    assert result.exit_code == 2
    assert f"skipped leaky stage 3 run {leaky} (trained with the label-leaking mask full_bidir)" in result.stderr
    causal = stage3(tiny_llama, tmp_path, mask="causal")
    chosen, skipped = choose_finetunes(Stage4Config(runs_dir=str(tmp_path)))
    assert [f.run.path for f in chosen] == [causal] and len(skipped) == 1 and str(leaky) in skipped[0]
    assert runner.invoke(app, ["stage1", "--model", str(tiny_llama), "--tasks", "ablate_tiny", "--device", "cpu",
                               "--limit", "4", "--runs-dir", str(tmp_path)]).exit_code == 0
    result = stage4(tmp_path, "--mask", "causal")
    assert result.exit_code == 0, result.output
    assert f"skipped leaky stage 3 run {leaky}" in result.stderr
    (out,) = (tmp_path / "stage4_post_ft_eval").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["checkpoint"] for e in metrics["checkpoints"]] == [str(causal)] and metrics["skipped"] == skipped
    assert f"skipped leaky stage 3 run {leaky}" in (out / "run.log").read_text()
    named, skipped = choose_finetunes(Stage4Config(runs_dir=str(tmp_path), checkpoints=(str(leaky),)))
    assert [f.run.path for f in named] == [leaky] and skipped == []  # named explicitly: scored, marked leaky


def test_a_named_checkpoint_of_a_diverged_run_is_scored(tiny_llama, tmp_path):
    from ablate.cli import main

    assert main(["stage1", "--model", str(tiny_llama), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4",
                 "--runs-dir", str(tmp_path)]) == 0
    run = stage3(tiny_llama, tmp_path, learning_rate=1e3, max_steps=2, save_steps=1)
    summary = summary_of(run)
    assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == str(run / "checkpoints" / "checkpoint-1")
    result = stage4(tmp_path, "--checkpoint", summary["last_good_checkpoint"], "--mask", "causal")
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "stage4_post_ft_eval").iterdir()
    (entry,) = json.loads((out / "metrics.json").read_text())["checkpoints"]
    assert entry["label"] == f"prefill_bidir-{run.name}-checkpoint-1"
    assert entry["model_dir"] == summary["last_good_checkpoint"]


def test_every_checkpoint_is_recorded_and_one_changed_after_saving_is_refused(tiny_llama, tmp_path):
    from ablate.stages import stage3_resume as resume

    run = stage3(tiny_llama, tmp_path, max_steps=2, save_steps=1)
    assert summary_of(run)["resolved"] == {"dtype": "float32", "attn_implementation": "sdpa", "autocast": None}
    digests = json.loads((run / "checkpoints" / "digests.json").read_text())
    assert sorted(digests) == ["checkpoint-1", "checkpoint-2"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth",
            "config.json"} <= set(digests["checkpoint-1"]["files"])
    one, two = run / "checkpoints" / "checkpoint-1", run / "checkpoints" / "checkpoint-2"
    assert resume.problem(one) is None and resume.problem(two) is None
    edits = {  # each keeps the folder structurally whole: only the recorded digests can tell
        "model.safetensors": lambda: shutil.copy(Path(tiny_llama) / "model.safetensors", one / "model.safetensors"),
        "optimizer.pt": lambda: shutil.copy(two / "optimizer.pt", one / "optimizer.pt"),
        "trainer_state.json": lambda: (one / "trainer_state.json").write_text(
            (one / "trainer_state.json").read_text().replace('"learning_rate"', '"learning_rate" ', 1)),
    }
    for name, edit in edits.items():
        saved = (one / name).read_bytes()
        edit()
        result = stage4(tmp_path, "--checkpoint", str(one), "--mask", "causal")
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert f"--checkpoint {one} is not an intact checkpoint ({name} changed after stage 3 saved it: sha256" in result.stderr
        (one / name).write_bytes(saved)
        assert resume.problem(one) is None  # the same bytes again: the same checkpoint
    (one / "extra.txt").write_bytes(b"x")
    assert resume.problem(one) == "extra.txt was added after stage 3 saved it"
    (one / "extra.txt").unlink()
    (run / "checkpoints" / "digests.json").unlink()
    result = stage4(tmp_path, "--checkpoint", str(one))
    assert result.exit_code == 2 and "is not an intact checkpoint (not recorded in digests.json" in result.stderr
    assert not (tmp_path / "stage4_post_ft_eval").exists()


def test_resume_uses_only_a_checkpoint_that_is_what_stage3_saved(tiny_llama, tmp_path):
    from ablate.stages import stage3_resume as resume

    run = stage3(tiny_llama, tmp_path, max_steps=2, save_steps=1)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    rundir.set_status(run, "failed", "set by the test")
    one, two = run / "checkpoints" / "checkpoint-1", run / "checkpoints" / "checkpoint-2"
    saved = (one / "optimizer.pt").read_bytes()
    shutil.copy(one / "model.safetensors", two / "model.safetensors")  # step 1's weights at step 2
    shutil.copy(two / "optimizer.pt", one / "optimizer.pt")
    result = runner.invoke(app, ["stage3", "--resume", "--run-dir", str(run)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert (f"nothing to resume: {run} has no intact checkpoint (checkpoint-2: model.safetensors changed after "
            "stage 3 saved it") in result.stderr
    assert (run / "status.txt").read_text().startswith("failed")
    (one / "optimizer.pt").write_bytes(saved)
    result = runner.invoke(app, ["stage3", "--resume", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert summary_of(run)["resumed_from"].endswith("checkpoint-1") and summary_of(run)["status"] == "completed"
    assert "checkpoint-2 is not intact (model.safetensors changed after stage 3 saved it" in (run / "run.log").read_text()
    assert resume.problem(two) is None  # saved again by the resumed run, and recorded again
