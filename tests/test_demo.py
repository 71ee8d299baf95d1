"""The offline demo's small preset, through the CLI: python -m pytest tests/test_demo.py -q"""

import json

from typer.testing import CliRunner

from ablate.cli import app
from ablate.demo.world import FAMILIES, write_world

runner = CliRunner()


def test_world_is_seeded_and_keeps_recall_out_of_the_corpus(tmp_path):
    a = write_world(tmp_path / "a", seed=3, n_eval=20, n_corpus=400, n_finetune=40)
    b = write_world(tmp_path / "b", seed=3, n_eval=20, n_corpus=400, n_finetune=40)
    for name in FAMILIES:
        assert a["task_data"][name].read_text() == b["task_data"][name].read_text()
        assert (a["tasks_dir"] / f"{name}.yaml").is_file()
    assert a["corpus"].read_text() == b["corpus"].read_text()
    corpus = a["corpus"].read_text()
    for row in map(json.loads, a["task_data"]["world_recall"].read_text().splitlines()):
        assert row["prompt"] not in corpus
        assert row["choices"][row["label"]] in row["prompt"]  # the answer is in the prompt


STAGES = ("stage1_baseline_eval", "stage2_ablation_eval", "stage3_finetune_causal", "stage3_finetune_prefill_bidir",
          "stage4_post_ft_eval")


def _runs(workdir):
    return {s: sorted(p.name for p in (workdir / "runs" / s).iterdir()) for s in STAGES}


def test_demo_smoke_preset_is_a_study_file_run_by_ablate_study(tmp_path):
    result = runner.invoke(app, ["demo", "--preset", "smoke", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "report", "plot", "status",
                "study"):
        assert f"\n{key}" in result.output
    assert result.output.count(": ran ") == 5 and "wall time: stage 1 (causal)" in result.output
    status = (tmp_path / "STATUS.md").read_text()
    assert status.count("- [x]") == 6
    report = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## Stage 1 vs Stage 2" in report and "## Stage 4 recovery" in report
    assert (tmp_path / "docs" / "RESULTS_accuracy.png").is_file()
    runs = _runs(tmp_path)
    assert [len(v) for v in runs.values()] == [1] * 5

    # The study file holds every stage's settings: each run's config.json names it, and its values are what ran.
    study = tmp_path / "world-smoke-seed0" / "study.yaml"
    assert f"rerun the study: ablate study --config {study}" in result.output
    stage3 = next((tmp_path / "runs" / STAGES[2]).iterdir())
    config = json.loads((stage3 / "config.json").read_text())
    assert config["config_file"]["path"] == str(study)
    assert [config[k] for k in ("max_steps", "batch_size", "learning_rate", "max_length")] == [6, 16, 1e-3, 64]
    s4 = json.loads(next((tmp_path / "runs" / STAGES[4]).iterdir()).joinpath("config.json").read_text())
    assert s4["also_causal"] is True and s4["dtype"] == "float32"

    # Rerun by hand, and a second demo on the same workdir: every completed stage is reused, nothing reruns.
    again = runner.invoke(app, ["study", "--config", str(study)])
    assert again.exit_code == 0, (again.output, again.exception)
    assert again.output.count(": reusing ") == 5
    again = runner.invoke(app, ["demo", "--preset", "smoke", "--workdir", str(tmp_path)])
    assert again.exit_code == 0 and "skipping pretraining" in again.output
    assert again.output.count(": reusing ") == 5 and "stage 1 (causal), reused" in again.output
    assert _runs(tmp_path) == runs


def test_unknown_preset_is_bad_input(tmp_path):
    result = runner.invoke(app, ["demo", "--preset", "huge", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown preset 'huge'" in result.stderr
    (tmp_path / "file").write_text("keep me")
    for preset in ("smoke", "real"):  # the real preset refuses before fetching anything
        result = runner.invoke(app, ["demo", "--preset", preset, "--workdir", str(tmp_path / "file")])
        assert result.exit_code == 2 and "is not a folder" in result.stderr, preset
    assert (tmp_path / "file").read_text() == "keep me"
    result = runner.invoke(app, ["demo", "--device", "cuda:x", "--workdir", str(tmp_path / "new")])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


def test_same_seed_same_pretrained_model(tmp_path):
    from safetensors.torch import load_file

    from ablate.demo.run import PRESETS, pretrain

    paths = []
    for name in ("a", "b"):
        world = write_world(tmp_path / name / "world", seed=1, n_eval=4, n_corpus=300, n_finetune=8)
        paths.append(pretrain(world, tmp_path / name / "model", PRESETS["smoke"], seed=1, echo=lambda *_: None))
    a, b = (load_file(str(p / "model.safetensors")) for p in paths)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_real_demo_data_is_split_by_problem_and_rendered_by_its_own_task(tmp_path):
    import pytest
    import yaml

    from ablate.core.assets import gsm8k
    from ablate.core.lm_eval_model import task_entry
    from ablate.core.tasks import load_tasks, task_manager
    from ablate.demo.real import TASK, RealPreset, build, check_disjoint

    preset = RealPreset(n_eval=40, n_train=60, n_heldout=8, finetune_steps=1, batch_size=1, learning_rate=1e-4,
                        lora_r=None, max_length=64, max_steps_shown=2)
    data = gsm8k()
    paths = build(tmp_path, data, preset, seed=3)
    problems = [json.loads(line) for line in data.read_text().splitlines()]
    evaluated = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    docs = [json.loads(line) for line in paths["train_docs"].read_text().splitlines()]
    split = json.loads(paths["split"].read_text())
    assert len(evaluated) == 40 and split["evaluated_ids"] == sorted(r["ind"] for r in evaluated)
    assert not {r["ind"] for r in evaluated} & {r["ind"] for r in docs}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert (len(train), len(heldout)) == (60, 8)
    for doc, pair in zip(docs, train + heldout):
        assert pair["response"] == " " + doc["endings"][0]  # the task's target delimiter and the true step
        assert pair["prompt"].startswith("Math: " + " ".join(doc["ctx_a"].split()[:3]))
    for pair in train:  # no evaluated question reaches stage 3
        assert not any(problems[i]["question"].strip() in pair["prompt"] for i in split["evaluated_ids"])
    assert build(tmp_path / "b", data, preset, seed=3)["eval"].read_text() == paths["eval"].read_text()

    # The task has a name of its own and reads the demo's rows; its processing is the installed hellaswag's,
    # document for document (prompt, choices, gold).
    spec = yaml.safe_load(paths["task_yaml"].read_text())
    hellaswag = task_entry(task_manager(None, ["hellaswag"]), "hellaswag").yaml_path
    assert TASK == "gsm8k_next_step" and spec["task"] == TASK and spec["include"] == str(hellaswag.resolve())
    assert spec["dataset_kwargs"]["data_files"] == {"validation": str(paths["eval"].resolve())}
    ours = load_tasks(task_manager(str(paths["tasks"]), [TASK]), [TASK], {})[TASK]
    stock = load_tasks(task_manager(None, ["hellaswag"]), ["hellaswag"], {"hellaswag": paths["eval"]})["hellaswag"]

    def shown(task):
        return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.eval_docs]

    assert shown(ours) == shown(stock) and len(shown(ours)) == 40
    assert ours.config.target_delimiter == stock.config.target_delimiter == " "


    # The study file the demo runs: every stage resolves from it with the demo's settings.
    from ablate.core.assets import smollm2
    from ablate.demo.real import study_values
    from ablate.demo.study import write_study_file
    from ablate.stages.study import plan

    study = write_study_file(tmp_path / "study.yaml", study_values(smollm2(), paths, preset, 3, "cpu", tmp_path), [])
    p = plan(study)
    for s in (p.stage1, p.stage2):
        assert (s.tasks, s.include_path, s.task_data, s.batch_size) == ((TASK,), str(paths["tasks"]), (), "8")
        assert s.seed == 3
    assert (p.stage1.mask, p.stage2.mask, p.stage4.mask, p.stage4.also_causal) == ("causal", "prefill_bidir",
                                                                                 "prefill_bidir", False)
    assert sorted(p.stage3) == ["causal", "prefill_bidir"] and p.report == tmp_path / "docs" / "RESULTS.md"
    for s3 in p.stage3.values():
        assert (s3.data, s3.eval_data, s3.max_steps, s3.batch_size, s3.learning_rate, s3.lr_scheduler, s3.max_length,
                s3.truncate_prompts, s3.lora_r, s3.seed) == (str(paths["train"]), str(paths["heldout"]), 1, 1, 1e-4,
                                                             "constant", 64, True, None, 3)
    with pytest.raises(RuntimeError, match="overlap"):
        check_disjoint(problems, evaluated, evaluated)
