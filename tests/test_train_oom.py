"""Out of memory in stage 3 training, and every run's peak memory: python -m pytest tests/test_train_oom.py -q

``ABLATE_FAULT_TRAIN_OOM_ROWS=R@K`` (ablate.faults) makes every training micro-batch of more than R rows raise
torch.OutOfMemoryError from optimizer step K on, so the halving runs on CPU: the run must end where an
uninterrupted run with the same rows a step ends (float32, within 1e-5), each halving recorded; a micro-batch of
one row that does not fit fails the run with one line.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ablate.cli import main
from ablate.core.oom import smaller_micro_batch
from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.verified import verified_summary
from ablate.stages.stage3_finetune import run_stage3
from test_finetune import config, summary_of  # its run: 6 steps of 4 rows, a checkpoint every 2, constant lr

DATA = Path(__file__).parent / "data" / "sft.jsonl"
FAULT = "ABLATE_FAULT_TRAIN_OOM_ROWS"




def weights(run, name="model.safetensors"):
    return load_file(str(run / "final" / name))


def assert_close(run, expected, name="model.safetensors"):
    got, want = weights(run, name), weights(expected, name)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


def loss_steps(run):
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def straight(tiny_models, tmp_path_factory):
    """Uninterrupted runs: 4 rows a step as one micro-batch and as two of 2, full and LoRA."""
    runs = tmp_path_factory.mktemp("straight")
    model = tiny_models("llama")
    return {(b, g, lora): run_stage3(config(model, runs / f"{b}x{g}{lora}", batch_size=b,
                                            gradient_accumulation_steps=g, lora_r=lora or None))
            for b, g, lora in ((4, 1, 0), (2, 2, 0), (4, 1, 4))}


def test_the_retry_micro_batch_divides_the_old_one():
    assert [smaller_micro_batch(n) for n in (1, 2, 3, 4, 6, 7, 9, 12)] == [None, 1, 1, 2, 3, 1, 3, 6]


def test_out_of_memory_at_a_step_goes_on_from_the_checkpoint_with_half_the_micro_batch(
        tiny_llama, tmp_path, straight, monkeypatch):
    monkeypatch.setenv(FAULT, "2@3")  # step 3's 4-row micro-batch runs out of memory; checkpoint-2 is intact
    run = run_stage3(config(tiny_llama, tmp_path))
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["global_step"] == 6
    (retry,) = summary["oom_retries"]
    assert retry == {"step": 3, "rows": 4, "tokens": retry["tokens"], "micro_batch": 2,
                     "gradient_accumulation_steps": 2, "resumed_from": str(run / "checkpoints" / "checkpoint-2")}
    assert summary["train_batch"] == {"micro_batch": 2, "gradient_accumulation_steps": 2}
    assert loss_steps(run) == [1, 2, 3, 4, 5, 6]  # the lost attempt's steps are not in the log twice
    # The same rows a step, the same objective: the uninterrupted run's weights, however the step was split.
    assert_close(run, straight[4, 1, 0])
    assert_close(run, straight[2, 2, 0])
    assert summary["train_loss"] == pytest.approx(summary_of(straight[4, 1, 0])["train_loss"], abs=1e-5)
    log = (run / "run.log").read_text()
    assert (f"WARNING ablate.core.oom: out of memory in training step 3 on 4 rows of {retry['tokens']} tokens: "
            "micro-batch 4 -> 2, gradient accumulation 2 (the same 4 rows a step)") in log
    assert f"going on from {run / 'checkpoints' / 'checkpoint-2'} (step 2)" in log
    verified_summary(rundir.load_run(run))  # the recorded retries and memory pass verification


def test_an_odd_micro_batch_past_an_epoch_end_keeps_every_step_s_rows(tiny_llama, tmp_path, monkeypatch):
    # 38 training rows, 6 a step: 7 steps an epoch, the 7th of 2 rows. Micro-batch 3 -> 1 (accumulation 2 -> 6) at
    # step 9 of the second epoch, from checkpoint-8: the Trainer's skip and its short last step must still line up.
    settings = dict(max_steps=9, batch_size=3, gradient_accumulation_steps=2, save_steps=4)
    expected = run_stage3(config(tiny_llama, tmp_path / "straight", **settings))
    monkeypatch.setenv(FAULT, "2@9")
    run = run_stage3(config(tiny_llama, tmp_path / "oom", **settings))
    summary = summary_of(run)
    assert [(r["micro_batch"], r["gradient_accumulation_steps"], Path(r["resumed_from"]).name)
            for r in summary["oom_retries"]] == [(1, 6, "checkpoint-8")]
    assert summary["n_train"] == 38 and summary["global_step"] == 9
    assert_close(run, expected)


def test_out_of_memory_before_any_checkpoint_starts_again_with_the_starting_weights(
        tiny_llama, tmp_path, straight, monkeypatch):
    monkeypatch.setenv(FAULT, "1")  # every micro-batch of more than 1 row, from step 1: 4 -> 2 -> 1
    run = run_stage3(config(tiny_llama, tmp_path))
    summary = summary_of(run)
    assert [(r["step"], r["micro_batch"], r["gradient_accumulation_steps"], r["resumed_from"])
            for r in summary["oom_retries"]] == [(1, 2, 2, None), (1, 1, 4, None)]
    assert loss_steps(run) == [1, 2, 3, 4, 5, 6]
    assert_close(run, straight[4, 1, 0])
    assert "going on from the start" in (run / "run.log").read_text()


def test_a_lora_run_starts_again_with_the_adapter_it_started_from(tiny_llama, tmp_path, straight, monkeypatch):
    monkeypatch.setenv(FAULT, "2")
    run = run_stage3(config(tiny_llama, tmp_path, lora_r=4))
    assert [r["resumed_from"] for r in summary_of(run)["oom_retries"]] == [None]
    assert_close(run, straight[4, 1, 4], "adapter_model.safetensors")


def test_one_row_that_does_not_fit_fails_the_run_with_one_line(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT, "0@2")
    code = main(["stage3", "--model", str(tiny_llama), "--data", str(DATA), "--device", "cpu", "--runs-dir",
                 str(tmp_path), "--max-steps", "4", "--warmup-steps", "0", "--batch-size", "4", "--save-steps", "2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ablate: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("ablate: error: out of memory in training step 2 on 1 row of ")
    assert "even at micro-batch 1" in errors[0]
    (run,) = (tmp_path / "stage3_finetune_prefill_bidir").iterdir()
    status, reason = rundir.read_status(run)
    assert status == rundir.FAILED and "out of memory in training step 2 on 1 row" in reason
    log = (run / "run.log").read_text()
    assert "micro-batch 4 -> 2" in log and "micro-batch 2 -> 1" in log and not (run / "final").exists()


def test_a_micro_batch_of_one_row_is_not_halved(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT, "0")
    with pytest.raises(BadInput, match="out of memory in training step 1 on 1 row of .* even at micro-batch 1"):
        run_stage3(config(tiny_llama, tmp_path, batch_size=1, max_steps=2))


def test_other_errors_in_a_step_are_not_retried(tiny_llama, tmp_path, monkeypatch):
    from transformers import Trainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("an unrelated failure")

    monkeypatch.setattr(Trainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="an unrelated failure"):
        run_stage3(config(tiny_llama, tmp_path, max_steps=2))


def test_every_stage3_run_records_its_peak_memory(straight, tiny_llama):
    summary = summary_of(straight[4, 1, 0])
    memory = summary["peak_memory"]
    parameter_bytes = sum(t.numel() * t.element_size() for t in load_file(str(tiny_llama / "model.safetensors"))
                          .values())
    assert memory["measure"] == "cpu_peak_rss" and memory["bytes"] == memory["cpu_peak_rss_bytes"]
    assert memory["cpu_peak_rss_bytes"] > parameter_bytes > 0
    assert memory["cuda_max_allocated_bytes"] is None and memory["cpu_peak_rss_since"] == "run start"
    assert summary["oom_retries"] == [] and summary["train_batch"] == {"micro_batch": 4,
                                                                       "gradient_accumulation_steps": 1}


def test_memory_is_not_verified_but_verified_numbers_still_are(straight, tmp_path):
    run = tmp_path / straight[4, 1, 0].parent.name / straight[4, 1, 0].name
    shutil.copytree(straight[4, 1, 0], run)
    summary = summary_of(run)
    summary["peak_memory"]["bytes"] += 1  # a measurement: passes through as recorded
    (run / "summary.json").write_text(json.dumps(summary))
    assert verified_summary(rundir.load_run(run))["peak_memory"]["bytes"] == summary["peak_memory"]["bytes"]
    summary["train_loss"] += 0.5
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(BadInput, match="train_loss"):
        verified_summary(rundir.load_run(run))


def test_resume_after_an_out_of_memory_retry_goes_on_at_the_micro_batch_it_reached(tiny_llama, tmp_path):
    """Killed after a retry halved the micro-batch: --resume goes on from the checkpoint at that micro-batch
    (its trainer_state.json's), not config.json's, which would run out of memory again."""
    from test_finetune import _stage3_cli

    killed = _stage3_cli(tiny_llama, tmp_path / "runs", "--batch-size", "4", "--gradient-accumulation-steps", "1",
                         env={FAULT: "2@3", "ABLATE_FAULT_KILL_AT": "step:5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "stage3_finetune_prefill_bidir").iterdir()
    assert "micro-batch 4 -> 2" in (run / "run.log").read_text()
    assert main(["stage3", "--resume", "--runs-dir", str(tmp_path / "runs")]) == 0
    summary = summary_of(run)
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_step"] == 8
    assert summary["train_batch"] == {"micro_batch": 2, "gradient_accumulation_steps": 2}
    assert summary["oom_retries"] == []  # none in the resumed process
    assert "going on at micro-batch 2 x 2 accumulation" in (run / "run.log").read_text()
    straight = run_stage3(config(tiny_llama, tmp_path / "straight", max_steps=8, lr_scheduler="cosine",
                                 warmup_steps=2, batch_size=2, gradient_accumulation_steps=2))
    assert_close(run, straight)


def test_out_of_memory_before_a_checkpoint_refuses_a_base_model_changed_since_the_start(
        tiny_llama, tmp_path, monkeypatch):
    """Starting again reads the base model again: if its folder changed since the run started, the run fails with
    one line rather than train another model under this run's recorded identity."""
    import ablate.stages.stage3_finetune as stage3

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    real_fault = stage3.train_oom_fault

    def swap_then_fault(rows, step):  # the folder is rewritten while step 1 runs, then step 1 runs out of memory
        (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "note": 1}', 1)
                                           if '"note"' not in (model / "config.json").read_text()
                                           else (model / "config.json").read_text())
        real_fault(rows, step)

    monkeypatch.setattr(stage3, "train_oom_fault", swap_then_fault)
    monkeypatch.setenv(FAULT, "2")
    with pytest.raises(BadInput, match="no longer the model the run started from"):
        run_stage3(config(model, tmp_path / "runs"))


@pytest.mark.parametrize("recorded,expected", [
    ({"micro_batch": 2, "gradient_accumulation_steps": 2}, (2, 2)),  # after a retry: the rows a step kept
    ({"micro_batch": 1, "gradient_accumulation_steps": 4}, (1, 4)),
    ({"micro_batch": 4, "gradient_accumulation_steps": 1}, (4, 1)),  # config.json's own
    ({"micro_batch": 3, "gradient_accumulation_steps": 2}, (4, 1)),  # another number of rows a step
    ({"micro_batch": 8, "gradient_accumulation_steps": 1}, (4, 1)),  # larger than config.json's
    ({"micro_batch": 2, "gradient_accumulation_steps": 2.0}, (4, 1)),  # not integers
    ({"micro_batch": True, "gradient_accumulation_steps": 4}, (4, 1)),
    ({"micro_batch": 0, "gradient_accumulation_steps": 4}, (4, 1)),
    ({"micro_batch": 2}, (4, 1)),  # a key missing
    ({"micro_batch": 2, "gradient_accumulation_steps": 2, "extra": 1}, (4, 1)),
    ("2x2", (4, 1)),
    (None, (4, 1)),  # checkpoints recorded before the field existed
])
def test_resume_takes_a_checkpoint_s_recorded_micro_batch_only_when_it_keeps_the_rows_a_step(
        tmp_path, recorded, expected):
    from ablate.stages.stage3_resume import checkpoint_batch

    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    entry = {"step": 4, "files": {}, **({} if recorded is None else {"train_batch": recorded})}
    (checkpoint.parent / "digests.json").write_text(json.dumps({"checkpoint-4": entry}))
    assert checkpoint_batch(checkpoint, config("m", tmp_path, batch_size=4, gradient_accumulation_steps=1)) == expected
