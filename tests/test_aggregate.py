"""`ablate aggregate`: seeds pooled with the paired comparisons, and `--across-data` (each seed its own documents).

    python -m pytest tests/test_aggregate.py -q

Hand-made runs with real samples (tests/handmade.py), verified as every consumer verifies them.
"""

import json

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.results import rundir
from ablate.results.aggregate import aggregate, render
from ablate.results.rundir import STAGE1, STAGE2, STAGE4
from handmade import eval_run

runner = CliRunner()
TASK = {"config_sha256": "c0", "config": {"doc_to_text": "t0"}}


def drawn(seed: int, **changes) -> dict:
    """A comparison record whose task documents were drawn with ``seed``; ``changes`` edit it."""
    task = {**TASK, "files": {"dataset_kwargs.data_files.validation": f"sha-of-seed-{seed}"},
            "docs_sha256": f"docs-of-seed-{seed}"}
    record = {"dtype": "float32", "attn_implementation": "sdpa", "max_length": 2048, "limit": None,
              "num_fewshot": None, "tasks": {"t": task}}
    for key, value in changes.items():
        if key.startswith("task_"):
            task[key.removeprefix("task_")] = value
        else:
            record[key] = value
    return record


def study(runs, seed: int, s1_right: int, s2_right: int, n: int = 50, layers: str | None = None, **changes):
    s1 = eval_run(runs, STAGE1, f"2026010{seed}-000000", {"t": (s1_right, n, 4)}, seed=seed, created=seed,
                  comparison=drawn(seed, **changes))
    record = layers and {"layers": layers, "num_layers": 30}  # stage 2 under --mask-layers, as its check records it
    extra = {"mask_layers": record, "mask_check": {"passed": True, "layers": record}} if layers else None
    s2 = eval_run(runs, STAGE2, f"2026010{seed}-000001", {"t": (s2_right, n, 4)}, mask="prefill_bidir", seed=seed,
                  created=seed + 0.5, baseline=s1, comparison=drawn(seed, **changes), extra=extra)
    return s1, s2


def groups(runs, **kw) -> dict:
    return {g["stage"]: g for g in aggregate(runs, **kw) if g["stage"] == STAGE2}


def test_seeds_with_their_own_documents_pool_only_across_data(tmp_path):
    for seed, (r1, r2) in zip((1, 2, 3), [(40, 34), (42, 35), (41, 37)]):  # of 50: drops 0.12, 0.14, 0.08
        study(tmp_path, seed, r1, r2)
    assert sorted(len(g["seeds"]) for g in aggregate(tmp_path) if g["stage"] == STAGE2) == [1, 1, 1]
    g = groups(tmp_path, across_data=True)[STAGE2]
    assert g["seeds"] == [1, 2, 3] and g["across_data"] is True
    assert g["paired"]["macro"]["mean"] == pytest.approx(-(0.12 + 0.14 + 0.08) / 3)
    assert g["paired"]["macro"]["std"] == pytest.approx(0.0305505, abs=1e-6) and g["paired"]["macro"]["n"] == 3
    per_seed = g["paired"]["per_seed"]
    assert [round(per_seed[s]["delta"], 2) for s in (1, 2, 3)] == [-0.12, -0.14, -0.08]
    assert all(per_seed[s]["delta_excludes_0"] for s in (1, 2, 3))  # 6, 7, 4 documents lost and none gained
    assert per_seed[1]["mcnemar_p"] == pytest.approx(2 / 2 ** 6)
    text = render(aggregate(tmp_path, across_data=True))
    assert "pooled across data draws" in text and "stage 2 minus stage 1" in text
    assert "seed 1: -0.120 [" in text and "(excludes 0, McNemar p 0.031)" in text
    result = runner.invoke(app, ["aggregate", "--runs-dir", str(tmp_path), "--across-data", "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 0 and "seeds=[1, 2, 3]  (documents differ by seed" in result.output
    (s2,) = [g for g in json.loads((tmp_path / "a.json").read_text()) if g["stage"] == STAGE2]
    assert s2["paired"]["per_seed"]["2"]["delta"] == pytest.approx(-0.14)


# Everything but the seed and the documents' files decides a result: across data draws, each still splits groups.
NOT_POOLED = {
    "the model": {"model": {"local": "other"}},
    "the dtype": {"dtype": "bfloat16"},
    "the attention implementation": {"attn_implementation": "eager"},
    "max_length": {"max_length": 1024},
    "limit": {"limit": 10},
    "num_fewshot": {"num_fewshot": 5},
    "the task's resolved config": {"task_config_sha256": "c1", "task_config": {"doc_to_text": "t1"}},
}


@pytest.mark.parametrize("case", sorted(NOT_POOLED))
def test_across_data_never_pools_what_decides_a_result(tmp_path, case):
    study(tmp_path, 1, 40, 34)
    study(tmp_path, 2, 42, 35, **NOT_POOLED[case])
    for stage in (STAGE1, STAGE2):
        assert sorted(g["seeds"] for g in aggregate(tmp_path, across_data=True) if g["stage"] == stage) == [[1], [2]]


@pytest.mark.parametrize("layers", [("0-9", None), ("0-9", "20-29")])
def test_stage2_runs_under_other_layers_never_pool(tmp_path, layers):
    study(tmp_path, 1, 40, 34, layers=layers[0])
    study(tmp_path, 2, 42, 35, layers=layers[1])
    assert sorted(g["seeds"] for g in groups_of(tmp_path, STAGE2)) == [[1], [2]]
    assert sorted(g["seeds"] for g in groups_of(tmp_path, STAGE1)) == [[1, 2]]  # stage 1 has no layers


def groups_of(runs, stage):
    return [g for g in aggregate(runs, across_data=True) if g["stage"] == stage]


def test_across_data_never_pools_another_number_of_documents(tmp_path):
    study(tmp_path, 1, 40, 34)
    study(tmp_path, 2, 42, 35, n=60)
    assert sorted(g["seeds"] for g in aggregate(tmp_path, across_data=True) if g["stage"] == STAGE2) == [[1], [2]]


def test_head_to_heads_pool_across_seeds(tmp_path):
    """Stage 4's head-to-head, of finetunes that differ by seed (and data draw) alone."""
    stages = {STAGE1: [], STAGE2: [], STAGE4: []}
    for seed, delta in ((0, 0.06), (1, 0.02), (2, -0.01)):
        entries = []
        for mask, acc in (("causal", 0.75), ("prefill_bidir", 0.75 + delta)):
            path = tmp_path / f"stage3_finetune_{mask}" / f"2026010{seed}-00000{mask == 'causal' and 1 or 2}"
            path.mkdir(parents=True)
            (path / "status.txt").write_text("completed\n")
            (path / "config.json").write_text(json.dumps({"seed": seed, "mask": mask, "learning_rate": 2e-4,
                                                          "data": f"/w/seed{seed}/finetune.jsonl"}))
            (path / "summary.json").write_text(json.dumps({"status": "completed", "model_identity": {"local": "m"}}))
            entries.append({"checkpoint": str(path), "label": f"{mask}-{seed}", "train_mask": mask,
                            "train_seed": seed, "tasks": {"t": {"acc": acc}}, "macro": {"acc": acc}})
        block = {"delta": delta, "delta_ci95": [delta - 0.04, delta + 0.04], "delta_excludes_0": abs(delta) > 0.04,
                 "mcnemar": {"lost": 1, "gained": 4, "p_value": 0.375}}
        s4 = tmp_path / STAGE4 / f"2026010{seed}-000003"
        s4.mkdir(parents=True)
        (s4 / "status.txt").write_text("completed\n")
        (s4 / "metrics.json").write_text(json.dumps({
            "stage": STAGE4, "status": "completed", "mask": "prefill_bidir", "comparison": drawn(seed),
            "checkpoints": entries, "head_to_head": {"before": f"causal-{seed}", "after": f"prefill_bidir-{seed}",
                                                    "tasks": {"t": block}, "macro": block}}))
        # The grouping alone: hand-made stage 4 runs have no samples to verify, so they are passed as verified.
        stages[STAGE4].append(rundir.load_run(s4))
    strict = [g for g in aggregate(tmp_path, stages=stages) if g.get("head_to_head")]
    assert sorted(g["seeds"] for g in strict) == [[0], [1], [2]]  # other documents, other finetuning data
    (h,) = [g for g in aggregate(tmp_path, stages=stages, across_data=True) if g.get("head_to_head")]
    assert h["seeds"] == [0, 1, 2] and h["paired"]["macro"]["mean"] == pytest.approx(0.07 / 3)
    assert [h["paired"]["per_seed"][s]["delta_excludes_0"] for s in (0, 1, 2)] == [True, False, False]
    text = render([h])
    assert "head-to-head" in text and "seed 0: +0.060 [+0.020, +0.100] (excludes 0" in text
    assert "seed 2: -0.010 [-0.050, +0.030] (includes 0" in text
