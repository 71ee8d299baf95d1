"""Stage 4 end to end on a tiny model's stage 3 output: python -m pytest tests/test_stage4.py -q"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.results.rundir import STAGE1, STAGE2
from ablate.stages.config import load_eval_config, load_finetune_config
from ablate.stages.stage1_baseline_eval import run_stage1
from ablate.stages.stage2_ablation_eval import run_stage2
from ablate.stages.stage3_finetune import run_stage3
from ablate.stages.stage4_post_ft_eval import Stage4Config, run_stage4
from ablate.core.tasks import FIXTURE_DATA

DATA = Path(__file__).parent / "data" / "sft.jsonl"
runner = CliRunner()


def eval_flags(model, runs):
    return dict(model=str(model), tasks="ablate_tiny,piqa", task_data=[f"piqa={FIXTURE_DATA['piqa']}"],
                device="cpu", runs_dir=str(runs), batch_size=8)


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    """stage 1, stage 2, and stage 3 for both masks, one of them saved through the raw fallback."""
    from transformers import PreTrainedModel

    runs = tmp_path_factory.mktemp("runs")
    model = tiny_models("llama")
    s1 = run_stage1(load_eval_config(STAGE1, eval_flags(model, runs)))
    s2 = run_stage2(load_eval_config(STAGE2, {**eval_flags(model, runs), "mask": "prefill_bidir"}))
    ft = dict(model=str(model), data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=6, learning_rate=3e-3,
              lr_scheduler="constant", warmup_steps=0, save_steps=100, logging_steps=2)
    s3_causal = run_stage3(load_finetune_config({**ft, "mask": "causal"}))
    original = PreTrainedModel.save_pretrained

    def broken(self, *args, **kwargs):
        raise RuntimeError("HF save conversion error")

    PreTrainedModel.save_pretrained = broken
    try:
        s3_bidir = run_stage3(load_finetune_config({**ft, "mask": "prefill_bidir"}))
    finally:
        PreTrainedModel.save_pretrained = original
    return runs, s1, s2, s3_causal, s3_bidir


def test_stage4_on_both_save_formats(study):
    runs, s1, s2, s3_causal, s3_bidir = study
    assert json.loads((s3_bidir / "summary.json").read_text())["save"]["format"] == "raw_state_dict"
    out = run_stage4(Stage4Config(device="cpu", runs_dir=str(runs), also_causal=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "stage4_post_ft_eval" and metrics["status"] == "completed"
    assert metrics["stage1_run"] == str(s1) and metrics["stage2_run"] == str(s2)
    entries = {e["train_mask"]: e for e in metrics["checkpoints"]}
    assert set(entries) == {"causal", "prefill_bidir"}
    assert entries["prefill_bidir"]["save_format"] == "raw_state_dict"
    m1 = json.loads((s1 / "metrics.json").read_text())
    m2 = json.loads((s2 / "metrics.json").read_text())
    paired = m2["baseline"]["paired"]["tasks"]["piqa"]  # stage 2 minus stage 1, document by document
    assert paired["n"] == 8 and paired["delta"] == pytest.approx(m2["tasks"]["piqa"]["acc"] - m1["tasks"]["piqa"]["acc"])
    assert paired["delta_ci95"][0] <= paired["delta"] <= paired["delta_ci95"][1]
    from ablate.results.status import number, render

    assert f"(delta `{number(paired['delta'])}` [95% CI {paired['delta_ci95'][0]:+.4f}" in render(runs)
    h2h = metrics["head_to_head"]  # the prefill_bidir-finetuned model against the causal-finetuned one
    assert (h2h["before"], h2h["after"]) == (entries["causal"]["label"], entries["prefill_bidir"]["label"])
    for task in ("ablate_tiny", "piqa"):
        r = h2h["tasks"][task]
        assert (r["before"], r["after"]) == (entries["causal"]["tasks"][task]["acc"],
                                             entries["prefill_bidir"]["tasks"][task]["acc"])
    for entry in entries.values():
        assert set(entry["tasks"]) == {"ablate_tiny", "piqa"} and entry["tasks"]["piqa"]["n"] == 8
        for task, r in entry["recovery"]["tasks"].items():
            s1_acc, s2_acc, s4_acc = m1["tasks"][task]["acc"], m2["tasks"][task]["acc"], entry["tasks"][task]["acc"]
            assert (r["acc_stage1"], r["acc_stage2"], r["acc_stage4"]) == pytest.approx((s1_acc, s2_acc, s4_acc))
            if s1_acc >= 0.01:
                assert r["retention"] == pytest.approx(s4_acc / s1_acc)
            if abs(s1_acc - s2_acc) < 0.01:
                assert r["gap_closed"] is None
            assert r["vs_stage2"]["p_value"] <= 1
        assert entry["causal"]["macro"]["acc"] is not None
        label = entry["label"]
        assert (out / f"samples_{label}_piqa.jsonl").is_file()
        assert (out / f"samples_{label}_causal_piqa.jsonl").is_file()


def test_finetuned_weights_are_what_stage4_scored(study):
    runs, _, _, s3_causal, _ = study
    out = run_stage4(Stage4Config(checkpoints=(str(s3_causal),), mask="causal", device="cpu", runs_dir=str(runs)))
    metrics = json.loads((out / "metrics.json").read_text())
    (entry,) = metrics["checkpoints"]
    rows = [json.loads(x) for x in (out / f"samples_{entry['label']}_piqa.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (Path(metrics["stage1_run"]) / "samples_piqa.jsonl").read_text().splitlines()]
    assert [r["logprobs"] for r in rows] != [r["logprobs"] for r in base]  # the finetuned model, not the base
    assert metrics["stage2_run"] is None and "no completed stage 2 run with mask causal" in metrics["stage2_reason"]


def test_stage4_refuses_without_stage1(study, tmp_path):
    _, _, _, s3_causal, _ = study
    result = runner.invoke(app, ["stage4", "--checkpoint", str(s3_causal), "--runs-dir", str(tmp_path),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "stage 4 needs a completed stage 1 run of" in result.stderr
    assert not (tmp_path / "stage4_post_ft_eval").exists()


def test_stage4_refuses_what_is_not_a_stage3_run(tmp_path):
    result = runner.invoke(app, ["stage4", "--checkpoint", str(tmp_path), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.stderr
    result = runner.invoke(app, ["stage4", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no completed stage 3 run" in result.stderr


def test_a_moved_runs_folder_still_reports(study, tmp_path, capsys):
    import shutil

    from ablate.cli import main

    runs = study[0]
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs)]) == 0
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, moved)
    capsys.readouterr()
    assert main(["aggregate", "--runs-dir", str(moved)]) == 0
    assert main(["report", "--runs-dir", str(moved), "--out", str(tmp_path / "RESULTS.md")]) == 0
    assert main(["status", "--runs-dir", str(moved)]) == 0
    out, err = capsys.readouterr()
    assert "stage4_post_ft_eval" in out and "Traceback" not in err and "error" not in err
    assert "finetuned with prefill_bidir" in out


def test_a_model_replaced_at_the_same_path_is_another_model(tiny_models, tmp_path, capsys):
    import shutil

    from ablate.cli import main
    from ablate.core.tiny import build_tiny_model

    model, runs = tmp_path / "model", tmp_path / "runs"
    shutil.copytree(tiny_models("llama"), model)
    common = ["--model", str(model), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0
    (s1,) = (runs / "stage1_baseline_eval").iterdir()
    other = build_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(Path(other) / "model.safetensors", model / "model.safetensors")  # new weights, same path
    capsys.readouterr()
    assert main(["stage2", *common, "--baseline", str(s1)]) == 2
    assert "differs from this run in model" in capsys.readouterr().err
    assert main(["stage2", *common]) == 0
    (s2,) = (runs / "stage2_ablation_eval").iterdir()
    baseline = json.loads((s2 / "metrics.json").read_text())["baseline"]
    assert baseline["run"] is None and "differs in model" in baseline["reason"]


def test_stage4_recovery_on_a_generative_task(tiny_llama, tmp_path):
    """gsm8k (exact match on generated text) through stages 1-4, the report and its plot.

    The tiny model cannot solve arithmetic, so stage 3 teaches it one answer: every row's answer is
    "#### 7". Stage 1 and 2 then score 0 and the finetuned models score what they learned, which makes
    the recovery block non-trivial: gains counted by McNemar, ratios over a zero baseline undefined.
    """
    from ablate.cli import main
    from ablate.results.report import write_report

    questions = [f"Tom has {n} apples and eats {n - 7}. How many are left?" for n in range(8, 14)]
    evaluated = tmp_path / "gsm8k.jsonl"
    evaluated.write_text("".join(json.dumps({"question": q, "answer": f"{q} 7\n#### 7"}) + "\n" for q in questions))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "response": " #### 7"}) + "\n"
                             for q in questions * 4))
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_llama), "--device", "cpu", "--runs-dir", str(runs)]
    evals = [*common, "--tasks", "gsm8k", "--task-data", f"gsm8k={evaluated}", "--num-fewshot", "0"]
    assert main(["stage1", *evals]) == 0 and main(["stage2", *evals]) == 0
    for mask in ("causal", "prefill_bidir"):
        assert main(["stage3", *common, "--mask", mask, "--data", str(train), "--max-steps", "60",
                     "--learning-rate", "1e-2", "--lr-scheduler", "constant", "--warmup-steps", "0",
                     "--batch-size", "8", "--gradient-accumulation-steps", "1", "--save-steps", "1000",
                     "--eval-fraction", "0.1", "--probe-samples", "2"]) == 0
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs)]) == 0
    (s4,) = (runs / "stage4_post_ft_eval").iterdir()
    metrics = json.loads((s4 / "metrics.json").read_text())
    (s1,) = (runs / "stage1_baseline_eval").iterdir()
    assert json.loads((s1 / "metrics.json").read_text())["tasks"]["gsm8k"]["acc"] == 0.0
    learned = 0
    for entry in metrics["checkpoints"]:
        task = entry["tasks"]["gsm8k"]
        assert task["metric"] == "exact_match,strict-match" and task["chance"] == 0.0 and task["n"] == 6
        rows = [json.loads(x) for x in (s4 / f"samples_{entry['label']}_gsm8k.jsonl").read_text().splitlines()]
        assert [r["pred"] == "7" for r in rows] == [r["correct"] for r in rows]
        r = entry["recovery"]["tasks"]["gsm8k"]
        correct = sum(row["correct"] for row in rows)
        assert (r["acc_stage1"], r["acc_stage2"], r["acc_stage4"]) == (0.0, 0.0, correct / 6)
        assert r["vs_stage2"]["gained"] == correct and r["vs_stage2"]["lost"] == 0
        assert r["retention"] is None and "under 0.01" in r["undefined"]["retention"]
        learned += correct
    assert learned > 0  # at least one finetune learned "#### 7" under the mask it is scored with
    report = write_report(runs, tmp_path / "RESULTS.md")
    assert "| gsm8k (exact_match,strict-match) |" in report.read_text()
    assert (tmp_path / "RESULTS_accuracy.png").stat().st_size > 0


def test_stage4_labels_are_unique_and_a_duplicate_is_refused_before_the_run_folder(study, tmp_path, capsys):
    import shutil

    from ablate.cli import main
    from ablate.stages.stage4_post_ft_eval import choose_finetunes

    runs, _, _, s3_causal, s3_bidir = study
    backup = s3_causal.parent / f"{s3_causal.name}-backup"  # a copy beside the run: a folder name of its own
    shutil.copytree(s3_causal, backup)
    elsewhere = tmp_path / "runs" / "stage3_finetune_causal" / s3_causal.name  # the same name in another runs folder
    shutil.copytree(s3_causal, elsewhere)
    try:
        chosen, _ = choose_finetunes(Stage4Config(runs_dir=str(runs), checkpoints=(str(s3_causal), str(backup),
                                                                                   str(s3_bidir))))
        assert [f.label for f in chosen] == [f"causal-{s3_causal.name}", f"causal-{backup.name}",
                                             f"prefill_bidir-{s3_bidir.name}"]
        before = sorted((runs / "stage4_post_ft_eval").iterdir()) if (runs / "stage4_post_ft_eval").exists() else []
        for pair, message in (((s3_causal, s3_causal), f"--checkpoint names {s3_causal / 'final'} twice"),
                              ((s3_causal, elsewhere), f"would both be scored as causal-{s3_causal.name}")):
            capsys.readouterr()
            assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--mask", "causal",
                         *[a for p in pair for a in ("--checkpoint", str(p))]]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err, err
        after = sorted((runs / "stage4_post_ft_eval").iterdir()) if (runs / "stage4_post_ft_eval").exists() else []
        assert after == before
    finally:
        shutil.rmtree(backup)


def test_stage4_refuses_a_model_resolved_otherwise_than_asked_before_the_run_folder(study, capsys, monkeypatch):
    from transformers import PreTrainedModel

    from ablate.cli import main

    runs, _, _, s3_causal, _ = study
    before = sorted((runs / "stage4_post_ft_eval").iterdir()) if (runs / "stage4_post_ft_eval").exists() else []
    asked = PreTrainedModel.get_correct_attn_implementation
    monkeypatch.setattr(PreTrainedModel, "get_correct_attn_implementation",
                        lambda self, requested, is_init_check=False: "eager" if requested == "sdpa"
                        else asked(self, requested, is_init_check))
    capsys.readouterr()
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--checkpoint", str(s3_causal)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attn_implementation 'eager' where 'sdpa' was asked for" in err, err
    after = sorted((runs / "stage4_post_ft_eval").iterdir()) if (runs / "stage4_post_ft_eval").exists() else []
    assert after == before


def ft_flags(model, runs, **overrides):
    return {**dict(model=str(model), data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=2, learning_rate=1e-3,
                   lr_scheduler="constant", warmup_steps=0, logging_steps=1, save_steps=1, probe_samples=2),
            **overrides}


def stage4_folders(runs):
    return sorted((runs / "stage4_post_ft_eval").iterdir()) if (runs / "stage4_post_ft_eval").exists() else []


def test_a_checkpoint_of_a_diverged_or_failed_run_is_scored_as_one_and_shown_as_one(tiny_llama, tmp_path,
                                                                                     monkeypatch, capsys):
    """A diverged run (no final/) and a failed one (no summary.json: its mask from config.json) are each scored at
    a named checkpoint, recorded as that checkpoint (step, the run's status and reason) and shown as one."""
    from ablate.cli import main
    from ablate.errors import BadInput
    from ablate.results.report import write_report
    from ablate.results.rundir import Terminated, load_run
    from ablate.results.status import render
    from ablate.stages.stage4_post_ft_eval import choose_finetunes

    runs = tmp_path / "runs"
    assert main(["stage1", "--model", str(tiny_llama), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4",
                 "--runs-dir", str(runs)]) == 0
    diverged = run_stage3(load_finetune_config(ft_flags(tiny_llama, runs, mask="prefill_bidir", learning_rate=1e3)))
    assert load_run(diverged).status == "diverged"
    monkeypatch.setenv("ABLATE_FAULT_KILL_AT", "step:2/TERM")  # after checkpoint 1 was saved
    with pytest.raises(Terminated):
        run_stage3(load_finetune_config(ft_flags(tiny_llama, runs, mask="causal", max_steps=3)))
    monkeypatch.delenv("ABLATE_FAULT_KILL_AT")
    (failed,) = (runs / "stage3_finetune_causal").iterdir()
    assert load_run(failed).status == "failed" and not (failed / "summary.json").exists()
    with pytest.raises(BadInput, match=f"skipped diverged stage 3 run {diverged} .*name one of its checkpoints"):
        choose_finetunes(Stage4Config(runs_dir=str(runs)))  # by default: never picked, and it says so
    capsys.readouterr()
    named = [str(diverged / "checkpoints" / "checkpoint-1"), str(failed / "checkpoints" / "checkpoint-1")]
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--mask", "causal",
                 *[a for n in named for a in ("--checkpoint", n)]]) == 0
    printed = capsys.readouterr().out
    assert "[checkpoint at step 1 of a diverged run, not its final model]" in printed
    (out,) = stage4_folders(runs)
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = metrics["checkpoints"]
    reason = load_run(diverged).reason
    assert (first["scored"], first["step"], first["run_status"], first["run_reason"]) == ("checkpoint", 1, "diverged",
                                                                                          reason)
    assert (second["scored"], second["step"], second["run_status"]) == ("checkpoint", 1, "failed")
    assert second["run_reason"] == "terminated by SIGTERM" and second["train_mask"] == "causal"
    assert second["label"] == f"causal-{failed.name}-checkpoint-1" and second["save_format"] is None
    assert metrics["head_to_head"]["after"] == first["label"]  # the two checkpoints, each named as one

    status = render(runs)
    assert (f"- **checkpoint** at step 1 of the `prefill_bidir` run `{diverged}` (a diverged run: {reason}), not its "
            "final model, evaluated with `causal`: macro") in status
    assert "(a failed run: terminated by SIGTERM), not its final model" in status
    assert f"- From `{out}` (checkpoints only: not the finetuned models' final results)." in status
    assert "- [ ] Stage 4 post-FT ablated eval" in status and "damaged" not in status
    report = write_report(runs, tmp_path / "RESULTS.md").read_text()
    assert "### Checkpoint at step 1 of a diverged `prefill_bidir` run" in report
    assert f"Checkpoint `{named[1]}` (step 1) of `{failed}`, a failed run: terminated by SIGTERM. Not the run's " \
           "final model." in report
    assert "### Checkpoint at step 1 of a diverged `prefill_bidir` run vs checkpoint at step 1 of a failed " in report
    assert "Finetuned with" not in report and "damaged" not in report

    config = json.loads((failed / "config.json").read_text())
    (failed / "config.json").write_text(json.dumps({**config, "learning_rate": 1.0}))  # not what it trained with
    capsys.readouterr()
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--checkpoint", named[1]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds other settings than stage 3 started with" in err, err
    assert "damaged" in render(runs)  # the scored run's stage 3 record no longer agrees: not shown as a result
    assert stage4_folders(runs) == [out]


def test_every_model_is_loaded_and_checked_before_the_run_folder(study, monkeypatch, capsys):
    """The second model to score fails to load: one line, exit 2, and no stage 4 run folder."""
    import ablate.core.models as models
    from ablate.cli import main
    from ablate.errors import BadInput

    runs, _, _, s3_causal, s3_bidir = study
    before = stage4_folders(runs)
    real = models.load_model

    def load_model(model, *args, **kwargs):
        if model == str(s3_bidir / "final"):
            raise BadInput(f"cannot load model '{model}': no file named model.safetensors")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    capsys.readouterr()
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--checkpoint", str(s3_causal),
                 "--checkpoint", str(s3_bidir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no file named model.safetensors" in err, err
    assert stage4_folders(runs) == before


def test_a_finetune_whose_base_model_is_gone_is_refused_before_the_run_folder(tiny_llama, tmp_path, capsys):
    """A LoRA whose base folder is gone, and a full checkpoint whose base (its tokenizer) changed: one line each."""
    import shutil

    from ablate.cli import main

    base, runs = tmp_path / "base", tmp_path / "runs"
    shutil.copytree(tiny_llama, base)
    assert main(["stage1", "--model", str(base), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4",
                 "--runs-dir", str(runs)]) == 0
    full = run_stage3(load_finetune_config(ft_flags(base, runs, mask="causal", max_steps=1)))
    lora = run_stage3(load_finetune_config(ft_flags(base, runs, mask="prefill_bidir", max_steps=1, lora_r=4)))
    tokenizer = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "padding_side": "left"}))
    capsys.readouterr()  # a full checkpoint holds no tokenizer: its base's must be the one stage 3 trained with
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--mask", "causal",
                 "--checkpoint", str(full / "checkpoints" / "checkpoint-1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs its base model" in err, err
    shutil.rmtree(base)
    capsys.readouterr()
    assert main(["stage4", "--device", "cpu", "--runs-dir", str(runs), "--checkpoint", str(full),
                 "--checkpoint", str(lora)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model path '{base}' does not exist" in err, err
    assert stage4_folders(runs) == []


def test_stage4_under_two_processes_equals_one(study, tmp_path):
    """The shared evaluation life cycle under torchrun (what `accelerate launch` does): rank 0 claims and writes
    the one run, rank 1 scores its share of the documents and returns None."""
    import subprocess
    import sys

    runs, _, _, s3_causal, _ = study
    one = run_stage4(Stage4Config(checkpoints=(str(s3_causal),), device="cpu", runs_dir=str(runs), batch_size="4"))
    script = tmp_path / "stage4.py"
    script.write_text("import os\nfrom ablate.stages.stage4_post_ft_eval import Stage4Config, run_stage4\n"
                      f"out = run_stage4(Stage4Config(checkpoints=({str(s3_causal)!r},), device='cpu', "
                      f"runs_dir={str(runs)!r}, batch_size='4'))\nprint('rank', os.environ['RANK'], out)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 None" in proc.stdout
    two = Path(next(line for line in proc.stdout.splitlines() if line.startswith("rank 0 ")).split(" ", 2)[2])
    assert two != one and (two / "status.txt").read_text() == "completed\n"
    (a,), (b,) = (json.loads((d / "metrics.json").read_text())["checkpoints"] for d in (one, two))
    for task in ("ablate_tiny", "piqa"):
        rows = [[json.loads(x) for x in (d / f"samples_{a['label']}_{task}.jsonl").read_text().splitlines()]
                for d in (one, two)]
        assert [r["doc_id"] for r in rows[0]] == [r["doc_id"] for r in rows[1]]
        assert [r["correct"] for r in rows[0]] == [r["correct"] for r in rows[1]]
    assert a["recovery"] == b["recovery"]


def test_stage4_compares_every_two_trainings_and_verifies_the_comparisons(study, tmp_path):
    """Three trainings (causal, the mask in every layer, the mask in layer 0 only): no single head-to-head, every
    pair compared instead, q values adjusted over the pairs, recomputed by the reader (an edit is refused)."""
    import shutil

    from scipy.stats import false_discovery_control

    from ablate.errors import BadInput
    from ablate.results import rundir
    from ablate.results.report import render as render_report
    from ablate.results.verified import verified_metrics

    runs = tmp_path / "runs"
    shutil.copytree(study[0], runs)
    run_stage3(load_finetune_config(dict(model=str(json.loads((study[3] / "config.json").read_text())["model"]),
                                         data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=2,
                                         save_steps=100, mask="prefill_bidir", mask_layers="0")))
    out = run_stage4(Stage4Config(device="cpu", runs_dir=str(runs)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_to_head"] is None  # two trainings under prefill_bidir: no one pair is "the" comparison
    found = metrics["pairs"]["pairs"]
    trainings = [(p["before_training"], p["after_training"]) for p in found]
    assert trainings == [("causal", "prefill_bidir"), ("causal", "prefill_bidir in layers 0 of 2"),
                         ("prefill_bidir", "prefill_bidir in layers 0 of 2")]
    entries = {e["label"]: e for e in metrics["checkpoints"]}
    for pair in found:
        assert pair["macro"]["before"] == pytest.approx(entries[pair["before"]]["macro"]["acc"])
        assert pair["macro"]["after"] == pytest.approx(entries[pair["after"]]["macro"]["acc"])
    q = false_discovery_control([p["macro"]["mcnemar"]["p_value"] for p in found])
    assert [p["macro"]["mcnemar"]["q_value"] for p in found] == pytest.approx(list(q))
    assert metrics["pairs"]["left_out"] == []
    assert "Every two trainings" in render_report(runs, None)
    run = rundir.load_run(out)
    verified_metrics(run, runs)  # as written: accepted
    metrics["pairs"]["pairs"][1]["macro"]["delta"] += 0.25
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(BadInput, match="pairs"):
        verified_metrics(rundir.load_run(out), runs)
