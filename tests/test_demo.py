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


def test_demo_smoke_preset_runs_every_stage_and_caches_the_model(tmp_path):
    result = runner.invoke(app, ["demo", "--preset", "smoke", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "report", "plot", "status"):
        assert f"\n{key}" in result.output
    status = (tmp_path / "STATUS.md").read_text()
    assert status.count("- [x]") == 6
    report = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "## Stage 1 vs Stage 2" in report and "## Stage 4 recovery" in report
    assert (tmp_path / "docs" / "RESULTS_accuracy.png").is_file()
    first = json.loads(next((tmp_path / "runs" / "stage1_baseline_eval").iterdir()).joinpath("metrics.json").read_text())

    again = runner.invoke(app, ["demo", "--preset", "smoke", "--workdir", str(tmp_path)])
    assert again.exit_code == 0 and "skipping pretraining" in again.output
    runs = sorted((tmp_path / "runs" / "stage1_baseline_eval").iterdir())
    second = json.loads((runs[-1] / "metrics.json").read_text())
    assert len(runs) == 2
    assert {t: m["acc"] for t, m in second["tasks"].items()} == {t: m["acc"] for t, m in first["tasks"].items()}


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


def test_real_demo_data_is_split_by_problem_and_rendered_by_lm_evals_task(tmp_path):
    import pytest

    from ablate.core.assets import gsm8k
    from ablate.demo.real import RealPreset, build, check_disjoint

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
        assert pair["response"] == " " + doc["endings"][0]  # HellaSwag's target delimiter and the true step
        assert pair["prompt"].startswith("Math: " + " ".join(doc["ctx_a"].split()[:3]))
    for pair in train:  # no evaluated question reaches stage 3
        assert not any(problems[i]["question"].strip() in pair["prompt"] for i in split["evaluated_ids"])
    assert build(tmp_path / "b", data, preset, seed=3)["eval"].read_text() == paths["eval"].read_text()
    with pytest.raises(RuntimeError, match="overlap"):
        check_disjoint(problems, evaluated, evaluated)
