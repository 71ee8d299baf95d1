"""The study on a real pretrained model, end to end at a test-sized budget: python -m pytest tests/test_real_demo.py -q

SmolLM2-135M-Instruct and the GSM8K test split come from the package registry (``ablate fetch``, cached);
the evaluated task is the demo's ``gsm8k_next_step`` (ablate/demo/gsm8k_tasks.py): GSM8K next-step rows
scored with lm-eval's hellaswag processing, a task YAML of its own. The fixture runs ``run_real_demo``
once with the demo's evaluated documents and a two-step stage 3 (a study file run by ``run_study``); the
tests read what it wrote. About five minutes on a 2-core CPU (most of the suite's time).
"""

import json
from pathlib import Path

import pytest

from ablate.core.assets import gsm8k, smollm2
from ablate.demo.real import REAL_PRESETS, TASK, RealPreset, run_real_demo
from ablate.errors import BadInput

# The demo's split and evaluated documents (n_eval, seed), a short stage 3.
PRESET = RealPreset(n_eval=REAL_PRESETS["real"].n_eval, n_train=16, n_heldout=8, finetune_steps=2, batch_size=8,
                    learning_rate=2e-4, lora_r=None, max_length=128, max_steps_shown=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    try:
        smollm2(), gsm8k()
    except BadInput as exc:  # the package index is unreachable: nothing to test against
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp("real-demo")
    out = run_real_demo(workdir, seed=0, device="cpu", echo=lambda *_: None, preset=PRESET)
    return workdir, out


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_stage1_is_well_above_chance_and_stage2_drops_with_an_interval_excluding_0(study):
    _, out = study
    m1, m2 = metrics(out["stage1"]), metrics(out["stage2"])
    t1 = m1["tasks"][TASK]
    assert t1["n"] == PRESET.n_eval and t1["chance"] == 0.25
    assert t1["acc"] > 0.6  # measured 0.767 (docs/demo.md)
    paired = m2["baseline"]["paired"]["tasks"][TASK]
    assert paired["delta"] == pytest.approx(m2["tasks"][TASK]["acc"] - t1["acc"])
    assert paired["delta"] < 0 and paired["delta_ci95"][1] < 0, paired  # measured -0.093 [-0.147, -0.040]


def test_a_short_stage3_lowers_held_out_loss_under_its_mask(study):
    _, out = study
    for mask in ("causal", "prefill_bidir"):
        summary = json.loads((out[f"stage3_{mask}"] / "summary.json").read_text())
        probe = summary["probe"]
        assert probe["after"]["loss_mask"] < probe["before"]["loss_mask"], (mask, probe)
        assert summary["status"] == "completed" and not summary.get("leaky")
    bidir = json.loads((out["stage3_prefill_bidir"] / "summary.json").read_text())["probe"]["before"]
    assert bidir["loss_mask"] > bidir["loss_causal"]  # reading the prompt bidirectionally costs the base model


def test_every_file_of_the_study_is_written(study):
    workdir, out = study
    split = json.loads(out["split"].read_text())
    assert split["shared_problems"] == 0 and split["evaluated_answers_in_training"] == 0
    for stage in ("stage1", "stage2"):
        assert (out[stage] / f"samples_{TASK}.jsonl").is_file() and (out[stage] / "env.json").is_file()
    for mask in ("causal", "prefill_bidir"):
        assert (out[f"stage3_{mask}"] / "final" / "config.json").is_file()
    m4 = metrics(out["stage4"])
    assert {e["train_mask"] for e in m4["checkpoints"]} == {"causal", "prefill_bidir"}
    assert m4["head_to_head"]["tasks"][TASK]["n"] == PRESET.n_eval
    report = out["report"].read_text()
    assert "Stage 1 vs Stage 2" in report and "vs finetuned with `causal`, both under `prefill_bidir`" in report
    assert out["plot"].stat().st_size > 10_000
    status = out["status"].read_text()
    assert "6 of 6 study steps are complete" in status and status == (workdir / "STATUS.md").read_text()
    assert out["report"] == workdir / "docs" / "RESULTS.md"
    assert set(out["stage_seconds"]) >= {"stage 1 (causal)", "stage 2 (prefill_bidir)", "stage 4 (prefill_bidir)"}
    assert json.loads((workdir / "demo-real-seed0.json").read_text())["seconds"] == out["seconds"]


def test_every_artifact_names_the_task_it_measured(study):
    """gsm8k_next_step, never hellaswag: metrics, samples, the report, STATUS.md, the study file."""
    from ablate.stages import study_file
    from ablate.stages.config import SECTIONS

    workdir, out = study
    values, _ = study_file.read(out["study"], SECTIONS)
    assert values["tasks"] == [TASK] == ["gsm8k_next_step"]
    assert values["include_path"] == str(out["split"].parent / "tasks")
    for stage in ("stage1", "stage2", "stage4"):
        m = metrics(out[stage])
        assert list(m.get("tasks") or m["checkpoints"][0]["tasks"]) == [TASK]
    for stage in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4"):
        assert json.loads((out[stage] / "config.json").read_text())["config_file"]["path"] == str(out["study"])
    texts = {"report": out["report"].read_text(), "status": out["status"].read_text()}
    for name, text in texts.items():
        assert TASK in text and "hellaswag" not in text.lower(), name


def test_a_second_demo_on_the_same_workdir_reuses_every_stage(study):
    workdir, out = study
    lines = []
    again = run_real_demo(workdir, seed=0, device="cpu", echo=lines.append, preset=PRESET)
    assert set(again["how"].values()) == {"reused"}, again["how"]
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "study"):
        assert again[key] == out[key]
    assert sum(": reusing " in line for line in lines) == 5


def test_causal_stage1_equals_stock_lm_eval_on_the_real_model(study):
    """Per document, every choice's loglikelihood within 1e-4 of stock lm-eval's HFLM, same predictions."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ablate.core.lm_eval_model import sample_rows
    from ablate.core.models import load_model

    _, out = study
    config = json.loads((out["stage1"] / "config.json").read_text())
    # lm-eval's own TaskManager reads the demo's task YAML (its include of hellaswag's, its rows) by itself.
    manager = TaskManager(include_path=config["include_path"], include_defaults=False)
    model, tokenizer = load_model(str(smollm2()), "cpu", "float32", "sdpa")
    stock = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=8, device="cpu")
    results = simple_evaluate(model=stock, tasks=[TASK], limit=24, log_samples=True, bootstrap_iters=0,
                              task_manager=manager, verbosity="ERROR")
    theirs = sample_rows(next(iter(results["samples"].values())))
    ours = {r["doc_id"]: r for r in map(json.loads, (out["stage1"] / f"samples_{TASK}.jsonl").read_text().splitlines())}
    assert len(theirs) == 24
    for row in theirs:
        mine = ours[row["doc_id"]]
        assert mine["pred"] == row["pred"] and mine["choices"] == row["choices"]
        assert max(abs(a - b) for a, b in zip(mine["logprobs"], row["logprobs"], strict=True)) < 1e-4


def test_the_closing_summary_gives_intervals_and_verdicts(study):
    from ablate.cli.tables import study_table

    _, out = study
    m1, m2, m4 = (metrics(out[s]) for s in ("stage1", "stage2", "stage4"))
    text = study_table(m1, m2, m4, out["stage_seconds"])
    paired = m2["baseline"]["paired"]["tasks"][TASK]
    assert f"{paired['delta']:+.3f} [{paired['delta_ci95'][0]:+.3f}, {paired['delta_ci95'][1]:+.3f}]" in text
    assert "the drop is established at 95%" in text
    assert "stage 4  finetuned prefill_bidir, read prefill_bidir" in text and "wall time: fetch" in text
    h2h = m4["head_to_head"]["tasks"][TASK]
    verdicts = ["finetuning with the mask beat causal finetuning", "causal finetuning beat finetuning with the mask",
                "no established difference between the two finetunes at this budget"]
    expected = 0 if h2h["delta"] > 0 and h2h["delta_excludes_0"] else 1 if h2h["delta_excludes_0"] else 2
    assert verdicts[expected] in text
