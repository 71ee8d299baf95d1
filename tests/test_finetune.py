"""Stage 3 on a tiny model: python -m pytest tests/test_finetune.py -q"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ablate.results import rundir
from ablate.core.checkpoints import RAW, save_final
from ablate.cli import app
from ablate.stages.config import load_finetune_config
from ablate.stages.stage3_finetune import run_stage3
from ablate.core.models import load_model

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
                                 "--device", "cpu", "--runs-dir", str(tmp_path), "--max-steps", "1",
                                 "--warmup-steps", "0"])
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
    killed = _stage3_cli(tiny_llama, tmp_path / "b", env={"ABLATE_FAULT_KILL_AT": "step:5"})
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


# A constant learning rate after warm-up: one step too many would show in the weights (cosine ends at lr 0).
EXACT = ("--lr-scheduler", "constant_with_warmup")


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    runs = tmp_path_factory.mktemp("uninterrupted")
    proc = _stage3_cli(tiny_models("llama"), runs, *EXACT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (runs / "stage3_finetune_prefill_bidir").iterdir()
    return run


def _loss_steps(run):
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize("moment,resumed_from", [
    ("step:5", "checkpoint-4"),
    ("save:4", "checkpoint-2"),  # checkpoint-4 half-written: its weights, no optimizer or trainer_state.json
    ("eval", "checkpoint-8"),  # after the last step: nothing left to train
    ("final_save", "checkpoint-8"),
])
def test_resume_after_a_kill_at_any_moment_is_the_uninterrupted_run(tiny_llama, tmp_path, uninterrupted, moment,
                                                                      resumed_from):
    killed = _stage3_cli(tiny_llama, tmp_path, *EXACT, env={"ABLATE_FAULT_KILL_AT": moment})
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run,) = (tmp_path / "stage3_finetune_prefill_bidir").iterdir()
    assert rundir.load_run(run).status == rundir.CRASHED
    resumed = subprocess.run([sys.executable, "-m", "ablate", "stage3", "--resume", "--runs-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = summary_of(run)
    assert summary["global_step"] == 8 and summary["status"] == "completed"
    assert summary["resumed_from"].endswith(resumed_from)
    expected, got = weights(uninterrupted / "final"), weights(run / "final")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert summary["train_loss"] == summary_of(uninterrupted)["train_loss"]
    assert _loss_steps(run) == list(range(1, 9))  # each step once
    log = (run / "run.log").read_text()
    assert f"resuming from {run / 'checkpoints' / resumed_from}" in log and "completed at step 8" in log
    if moment.startswith("save"):
        assert "checkpoint-4 is not intact (missing trainer_state.json" in resumed.stderr


def test_a_lora_run_killed_after_its_last_step_resumes_to_the_uninterrupted_adapter(tiny_llama, tmp_path):
    # Resumed at max_steps, stage 3 loads the checkpoint's adapter itself (stage3_resume.load_weights).
    lora = ("--lora-r", "4", *EXACT)
    straight = _stage3_cli(tiny_llama, tmp_path / "a", *lora)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _stage3_cli(tiny_llama, tmp_path / "b", *lora, env={"ABLATE_FAULT_KILL_AT": "eval"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "ablate", "stage3", "--resume", "--runs-dir", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (expected_run,) = (tmp_path / "a" / "stage3_finetune_prefill_bidir").iterdir()
    (run,) = (tmp_path / "b" / "stage3_finetune_prefill_bidir").iterdir()
    assert summary_of(run)["resumed_from"].endswith("checkpoint-8") and summary_of(run)["global_step"] == 8
    expected = load_file(str(expected_run / "final" / "adapter_model.safetensors"))
    got = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_run_log_holds_the_stage(tiny_llama, tmp_path):
    run = run_stage3(config(tiny_llama, tmp_path, max_steps=2))
    log = (run / "run.log").read_text()
    for line in ("stage 3 starting", "data: 38 training, 2 held-out examples", "step 2: loss=", "grad_norm=",
                 "eval_loss=", "saved the final model as hf_save_pretrained", "completed at step 2"):
        assert line in log, line


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """A completed 4-step run with checkpoints 2 and 4, run in this process."""
    runs = tmp_path_factory.mktemp("reference")
    return run_stage3(config(tiny_models("llama"), runs, max_steps=4, save_steps=2, lr_scheduler="constant"))


def _copy_run(run, runs, stage="stage3_finetune_prefill_bidir", status=None):
    copy = runs / stage / run.name
    shutil.copytree(run, copy)
    if status:
        rundir.set_status(copy, status, "set by the test")
    return copy


def _failed_copy(run, runs):
    """``run`` as if its process had failed during the final eval: no final/, no summary, status failed."""
    copy = _copy_run(run, runs, status="failed")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    return copy


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _resume(*args):
    return runner.invoke(app, ["stage3", "--resume", *args])


@pytest.mark.parametrize("status", ["completed", "gated", "diverged"])
def test_resume_refuses_a_finished_run_and_touches_nothing(reference, tmp_path, status):
    run = _copy_run(reference, tmp_path, status=status if status != "completed" else None)
    before = _hashes(run)
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"is {status}" in result.stderr and "only a failed or crashed run can be resumed" in result.stderr
    result = _resume("--runs-dir", str(tmp_path))
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    assert _hashes(run) == before


@pytest.mark.parametrize("where,flags,message", [
    ("stage1_baseline_eval", [], "is a stage1_baseline_eval run, not stage3_finetune_*"),
    ("stage3_finetune_causal", ["--mask", "prefill_bidir"], "is a stage3_finetune_causal run, not stage3_finetune_pre"),
    ("not-a-run", [], "is not a run directory"),
])
def test_resume_refuses_a_run_dir_of_another_stage_or_mask(reference, tmp_path, where, flags, message):
    if where == "not-a-run":
        run = tmp_path / where
        shutil.copytree(reference, run)
    else:
        run = _copy_run(reference, tmp_path, stage=where, status="failed")
    before = _hashes(run)
    result = _resume("--run-dir", str(run), *flags)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _hashes(run) == before


@pytest.mark.parametrize("damage", ["truncate model.safetensors", "truncate optimizer.pt",
                                    "remove trainer_state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(reference, tmp_path, damage):
    run = _failed_copy(reference, tmp_path)
    action, name = damage.split()
    target = run / "checkpoints" / "checkpoint-4" / name
    if action == "remove":
        target.unlink()
    else:
        os.truncate(target, target.stat().st_size - 100)
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 0, result.output
    summary = summary_of(run)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert "checkpoint-4 is not intact" in (run / "run.log").read_text()
    expected, got = weights(reference / "final"), weights(run / "final")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _loss_steps(run) == [1, 2, 3, 4]


def test_a_second_resume_of_a_run_is_refused_by_its_lock(reference, tmp_path):
    run = _failed_copy(reference, tmp_path)
    before = _hashes(run)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('locked', flush=True); time.sleep(120)", str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _resume("--run-dir", str(run))
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is being written by another ablate process" in result.stderr
    assert _hashes(run) == before
    assert rundir.load_run(run).status == rundir.FAILED


def test_resume_refuses_another_base_model_than_the_run_started_from(reference, tmp_path):
    run = _failed_copy(reference, tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["model_identity"] == summary_of(reference)["model_identity"]
    rundir.write_json(run / "run.json", {**info, "model_identity": {"local": "0" * 64}})  # weights replaced since
    before = _hashes(run)
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 2 and "was started from local model 000000000000" in result.stderr
    assert _hashes(run) == before


def test_a_failed_resume_leaves_the_run_resumable(reference, tmp_path):
    run = _failed_copy(reference, tmp_path)
    saved = (run / "config.json").read_text()
    (run / "config.json").write_text(saved.replace(str(DATA), str(tmp_path / "gone.jsonl")))
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 2 and "gone.jsonl" in result.stderr
    assert rundir.load_run(run).status == rundir.FAILED
    (run / "config.json").write_text(saved)
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 0, result.output
    assert summary_of(run)["resumed_from"].endswith("checkpoint-4") and summary_of(run)["global_step"] == 4
    expected, got = weights(reference / "final"), weights(run / "final")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_lora_runs_repeat_and_resume_exactly(tiny_llama, tmp_path):
    flags = dict(lora_r=4, max_steps=4, save_steps=2, lr_scheduler="constant")
    first = run_stage3(config(tiny_llama, tmp_path / "a", **flags))
    torch.manual_seed(99)  # the adapter's initialisation must not depend on the RNG state the run starts in
    second = run_stage3(config(tiny_llama, tmp_path / "b", **flags))
    expected = load_file(str(first / "final" / "adapter_model.safetensors"))
    for name, tensor in load_file(str(second / "final" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name
    run = _failed_copy(first, tmp_path / "c")
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    result = _resume("--run-dir", str(run))
    assert result.exit_code == 0, result.output
    assert summary_of(run)["resumed_from"].endswith("checkpoint-2")
    for name, tensor in load_file(str(run / "final" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name


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


def test_two_cpu_processes(tiny_llama, tmp_path):
    # torchrun, not `accelerate launch --cpu --num_processes 2`: on CPU accelerate's launcher starts one process.
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ablate",
            "stage3", "--model", str(tiny_llama), "--data", str(DATA), "--device", "cpu", "--runs-dir", str(tmp_path),
            "--max-steps", "3", "--save-steps", "2", "--logging-steps", "1", "--batch-size", "2", "--warmup-steps", "0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("stage 3 starting") == 2  # both processes trained, into one run
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
    from ablate.stages.stage4_post_ft_eval import Stage4Config, stage3_runs

    run = run_stage3(config(tiny_llama, tmp_path, max_steps=1, gate={"metric": "eval_loss", "max": 0.1}))
    summary = summary_of(run)
    assert summary["status"] == "gated" and (run / "status.txt").read_text().startswith("gated")
    assert "eval_loss" in (run / "status.txt").read_text()
    with pytest.raises(BadInput, match="is gated"):
        stage3_runs(Stage4Config(checkpoints=(str(run),), runs_dir=str(tmp_path)))
    assert stage3_runs(Stage4Config(checkpoints=(str(run),), runs_dir=str(tmp_path), ignore_gate=True))
