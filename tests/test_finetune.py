"""Stage 3 on a tiny model: python -m pytest tests/test_finetune.py -q"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ablate.checkpoints import RAW, save_final
from ablate.cli import app
from ablate.config import load_finetune_config
from ablate.finetune import run_stage3
from ablate.models import load_model

DATA = Path(__file__).parent / "data" / "sft.jsonl"
runner = CliRunner()


def config(model, runs, **overrides):
    flags = dict(model=str(model), data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=6,
                 learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, logging_steps=1,
                 save_steps=2, batch_size=4, gradient_accumulation_steps=1, probe_samples=4)
    return load_finetune_config({**flags, **overrides})


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("mask", ["prefill_bidir", "causal"])
def test_every_parameter_changes_and_the_run_is_complete(tiny_llama, tmp_path, mask):
    run = run_stage3(config(tiny_llama, tmp_path, mask=mask))
    assert run.parent.name == f"stage3_finetune_{mask}"
    before, after = weights(tiny_llama), weights(run / "final")
    assert set(after) == set(before)
    for name in before:
        assert not torch.equal(before[name], after[name]), name
    summary = summary_of(run)
    assert summary["status"] == "completed" and (run / "status.txt").read_text().startswith("completed")
    assert summary["global_step"] == 6 and summary["leaky"] is False
    for key in ("train_loss", "eval_loss", "train_steps_per_second", "train_runtime"):
        assert summary[key] > 0, key
    assert summary["grad_norm"]["max"] >= summary["grad_norm"]["last"] > 0
    assert summary["save"]["format"] == "hf_save_pretrained"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "grad_norm" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["mask"] == mask


def test_prefill_bidir_loss_differs_from_causal_and_the_guard_passes(tiny_llama, tmp_path):
    run = run_stage3(config(tiny_llama, tmp_path, max_steps=1))
    summary = summary_of(run)
    assert summary["leakage_guard"] == {"passed": True, "first_leak": None, "allowed_by_flag": False}
    before = summary["probe"]["before"]
    assert before["loss_mask"] != pytest.approx(before["loss_causal"], abs=1e-6)
    assert before["n_samples"] == 2  # 5% of 40 rows held out


def test_full_bidir_is_refused_with_the_first_offending_position(tiny_llama, tmp_path):
    result = runner.invoke(app, ["stage3", "--mask", "full_bidir", "--model", str(tiny_llama), "--data", str(DATA),
                                 "--device", "cpu", "--runs-dir", str(tmp_path), "--max-steps", "1"])
    assert result.exit_code == 2
    assert "mask 'full_bidir' leaks labels (example 0: supervised position" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_allow_label_leakage_trains_and_marks_the_run_leaky(tiny_llama, tmp_path):
    run = run_stage3(config(tiny_llama, tmp_path, mask="full_bidir", allow_label_leakage=True, max_steps=2))
    summary = summary_of(run)
    assert summary["leaky"] is True and summary["leakage_guard"]["passed"] is False
    assert "leak" in (run / "status.txt").read_text()


def test_save_fallback_round_trip(tiny_llama, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def broken(self, *args, **kwargs):
        raise RuntimeError("conversion error while saving")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    info = save_final(model, tokenizer, tmp_path / "final")
    assert info["format"] == RAW and "conversion error" in info["save_error"]
    meta = json.loads((tmp_path / "final" / "checkpoint_meta.json").read_text())
    assert meta["format"] == "raw_state_dict" and meta["config"]["model_type"] == "llama"
    monkeypatch.undo()
    reloaded, _ = load_model(str(tmp_path / "final"), "cpu", "float32")
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_stage3_records_the_fallback(tiny_llama, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken(self, *args, **kwargs):
        raise RuntimeError("HF save conversion error")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    run = run_stage3(config(tiny_llama, tmp_path, max_steps=2))
    save = summary_of(run)["save"]
    assert save["format"] == "raw_state_dict" and "conversion error" in save["save_error"]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    run = run_stage3(config(tiny_llama, tmp_path, max_steps=40, learning_rate=0.5, spike_factor=1.05,
                            spike_window=3))
    summary = summary_of(run)
    assert summary["status"] == "diverged" and summary["diverged_reason"]
    assert (run / "status.txt").read_text().startswith("diverged")
    assert summary["global_step"] < 40 and summary["save"] is None and not (run / "final").exists()


def _stage3_cli(model, runs, *extra, env=None):
    args = [sys.executable, "-m", "ablate", "stage3", "--model", str(model), "--data", str(DATA), "--device", "cpu",
            "--runs-dir", str(runs), "--max-steps", "8", "--save-steps", "2", "--logging-steps", "1",
            "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--warmup-steps", "2", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_resume_after_kill_9_gives_the_uninterrupted_weights(tiny_llama, tmp_path):
    straight = _stage3_cli(tiny_llama, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _stage3_cli(tiny_llama, tmp_path / "b", env={"ABLATE_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    (run,) = (tmp_path / "b" / "stage3_finetune_prefill_bidir").iterdir()
    assert (run / "status.txt").read_text().startswith("running") and not (run / "final").exists()
    resumed = subprocess.run([sys.executable, "-m", "ablate", "stage3", "--resume", "--runs-dir", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert summary_of(run)["resumed_from"].endswith("checkpoint-4")
    (expected_run,) = (tmp_path / "a" / "stage3_finetune_prefill_bidir").iterdir()
    expected, got = weights(expected_run / "final"), weights(run / "final")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_resume_with_nothing_to_resume(tmp_path):
    result = runner.invoke(app, ["stage3", "--resume", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to resume" in result.stderr


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "answer": "b"}], "lacks field(s) response"),
    ([], "has no rows"),
    ([{"prompt": "word " * 400, "response": " x"}] * 3, "do not fit --max-length 64"),
])
def test_bad_training_data(tiny_llama, tmp_path, rows, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["stage3", "--model", str(tiny_llama), "--data", str(data), "--device", "cpu",
                                 "--runs-dir", str(tmp_path / "runs"), "--max-length", "64"])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "runs").exists()


def test_truncate_prompts_keeps_their_end(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} " + "word " * 100, "response": " x"}) + "\n" for i in range(4)))
    run = run_stage3(config(tiny_llama, tmp_path, data=str(data), max_length=32, truncate_prompts=True, max_steps=1))
    assert summary_of(run)["status"] == "completed"


@pytest.mark.parametrize("flag,value,message", [
    ("--mask", "bidir", "unknown mask 'bidir'"),
    ("--lr-scheduler", "bogus", "unknown --lr-scheduler 'bogus'"),
    ("--device", "gpu", "unknown device 'gpu'"),
])
def test_stage3_bad_flags(tiny_llama, tmp_path, flag, value, message):
    result = runner.invoke(app, ["stage3", flag, value, "--model", str(tiny_llama), "--data", str(DATA),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_accelerate_launch_with_two_cpu_processes(tiny_llama, tmp_path):
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "ablate",
            "stage3", "--model", str(tiny_llama), "--data", str(DATA), "--device", "cpu", "--runs-dir", str(tmp_path),
            "--max-steps", "3", "--save-steps", "2", "--logging-steps", "1", "--batch-size", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "stage3_finetune_prefill_bidir").iterdir()
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["global_step"] == 3
    assert (run / "final" / "model.safetensors").is_file()


def test_lora_trains_the_adapter_only_and_loads_merged(tiny_llama, tmp_path):
    from peft import PeftModel

    run = run_stage3(config(tiny_llama, tmp_path, lora_r=4, max_steps=3))
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["lora"] == {"r": 4, "alpha": 16}
    final = run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    merged, _ = load_model(str(final), "cpu", "float32")
    base, _ = load_model(str(tiny_llama), "cpu", "float32")
    reference = PeftModel.from_pretrained(base, str(final)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_lora_save_fallback_is_still_a_loadable_adapter(tiny_llama, tmp_path, monkeypatch):
    from peft import PeftModel

    def broken(self, *args, **kwargs):
        raise RuntimeError("adapter save failed")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken)
    run = run_stage3(config(tiny_llama, tmp_path, lora_r=4, max_steps=2, save_steps=10))
    save = summary_of(run)["save"]
    assert save["format"] == "raw_state_dict" and save["adapter"] is True
    monkeypatch.undo()
    merged, _ = load_model(str(run / "final"), "cpu", "float32")
    base, _ = load_model(str(tiny_llama), "cpu", "float32")
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)


def test_stage3_gate_marks_the_run_gated(tiny_llama, tmp_path):
    from ablate.errors import BadInput
    from ablate.post_finetune import Stage4Config, stage3_runs

    run = run_stage3(config(tiny_llama, tmp_path, max_steps=1, gate={"metric": "eval_loss", "max": 0.1}))
    summary = summary_of(run)
    assert summary["status"] == "gated" and (run / "status.txt").read_text().startswith("gated")
    assert "eval_loss" in (run / "status.txt").read_text()
    with pytest.raises(BadInput, match="is gated"):
        stage3_runs(Stage4Config(checkpoints=(str(run),), runs_dir=str(tmp_path)))
    assert stage3_runs(Stage4Config(checkpoints=(str(run),), runs_dir=str(tmp_path), ignore_gate=True))
