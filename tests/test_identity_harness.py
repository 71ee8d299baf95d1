"""Identity and samples harnesses: python -m pytest tests/test_identity_harness.py -q

One tiny stage 1 run (the bundled ablate_tiny task and an --include-path task with its own data file) and one
stage 2 run against it; every variant below is derived from them by editing files, not by rerunning:
- every key of the recorded comparison record, changed: refused as stage 2's --baseline naming that key, and
  never chosen as the latest baseline; dtype and attention being what transformers resolved (a load that
  resolves otherwise than asked is refused before the run folder);
- every EvalConfig field outside the known non-identity ones, changed: the record changes in that key;
- the include-path task's data relabelled, its prompt template edited after stage 1: refused (exit 2, one line);
- every samples corruption (edited accuracy, a duplicated line, truncated, swapped): refused (exit 2, one line);
  clean: stage 2's baseline numbers are the ones its samples give.
"""

import dataclasses
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.core.identity import mismatch, model_identity
from ablate.core.tasks import BUNDLED_DATA
from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.rundir import STAGE1, STAGE2
from ablate.stages.config import EvalConfig, load_eval_config
from ablate.results.samples import verified_samples
from ablate.stages.evaluation import check_inputs, comparison_key
from ablate.stages.stage1_baseline_eval import run_stage1
from ablate.stages.stage2_ablation_eval import find_baseline, run_stage2

TASKS = "ablate_tiny,mytask"
LIMIT = 6
TEMPLATE = 'task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n' \
           'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{text}"\ndoc_to_target: label\n' \
           'doc_to_choice: choices\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n' \
           'metadata:\n  version: 1.0\n'
PROMPT = "{{question}}\\nAnswer:"


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    include = root / "tasks"
    include.mkdir()
    data = include / "my.jsonl"
    data.write_text("".join(BUNDLED_DATA["ablate_tiny"].read_text().splitlines(keepends=True)[:8]))
    (include / "mytask.yaml").write_text(TEMPLATE.format(data=data, text=PROMPT))
    runs = root / "runs"
    flags = dict(model=str(tiny_models("llama")), tasks=TASKS, include_path=str(include), limit=LIMIT,
                 device="cpu", runs_dir=str(runs), batch_size=8)
    s1 = run_stage1(load_eval_config(STAGE1, flags))
    s2 = run_stage2(load_eval_config(STAGE2, {**flags, "mask": "prefill_bidir"}))
    return dict(root=root, include=include, data=data, runs=runs, flags=flags, s1=s1, s2=s2)


def cli_args(study, *extra):
    f = study["flags"]
    return ["stage2", "--model", f["model"], "--tasks", TASKS, "--include-path", f["include_path"], "--limit",
            str(LIMIT), "--device", "cpu", "--runs-dir", str(study["runs"]), "--mask", "prefill_bidir", *extra]


def refused(study, capsys, baseline) -> str:
    """stage 2 with ``--baseline``: exit 2, one line, nothing written; returns the line."""
    before = sorted(p.name for p in (study["runs"] / STAGE2).iterdir())
    capsys.readouterr()
    assert main(cli_args(study, "--baseline", str(baseline))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (study["runs"] / STAGE2).iterdir()) == before
    return err


def variant(study, tag: str, edit) -> Path:
    """A copy of the stage 1 run as another, newer run (own uid, name and start), ``edit(path)`` applied."""
    s1 = study["s1"]
    path = s1.parent / f"{s1.name[:15]}-{tag}"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(s1, path)
    info = json.loads((path / "run.json").read_text())
    info.update(uid=uuid.uuid4().hex, name=path.name, created=info["created"] + 3600)
    (path / "run.json").write_text(json.dumps(info))
    edit(path)
    return path


def edit_metrics(path: Path, change) -> None:
    m = json.loads((path / "metrics.json").read_text())
    change(m)
    (path / "metrics.json").write_text(json.dumps(m))


def leaves(record, prefix=()):
    if isinstance(record, dict) and record:
        for k, v in record.items():
            yield from leaves(v, (*prefix, k))
    else:
        yield prefix


def label(path: tuple) -> str:
    """The name a refusal gives the changed leaf ``path`` of the record."""
    if path[0] != "tasks":
        return path[0]
    task, part = path[1], path[2]
    if part in ("config", "files"):
        return f"tasks.{task}.{part} ({path[3]})"
    return f"tasks.{task}.{part.removesuffix('_sha256')}"


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return 7
    return str(value) + "x"


def setting(record, path, value):
    for key in path[:-1]:
        record = record[key]
    record[path[-1]] = value


def test_every_key_of_the_record_refused_as_baseline_and_never_latest(study, capsys):
    s1 = study["s1"]
    record = json.loads((s1 / "metrics.json").read_text())["comparison"]
    paths = list(leaves(record))
    assert {p[0] for p in paths} >= {"model", "dtype", "attn_implementation", "max_length", "limit", "num_fewshot",
                                     "seed", "tasks"}
    assert {p[2] for p in paths if p[0] == "tasks"} == {"config", "config_sha256", "files", "docs_sha256"}
    config = load_eval_config(STAGE2, {**study["flags"], "mask": "prefill_bidir"})
    manager, task_data, tasks = check_inputs(config)
    key = comparison_key(config, task_data, model_identity(config.model), tasks, manager, "cpu")
    assert key == record  # stage 2 resolves what stage 1 did; the mask is not part of it
    made = []
    for i, path in enumerate(paths):
        v = variant(study, f"k{i}", lambda p: edit_metrics(p, lambda m: setting(
            m["comparison"], path, changed(get(m["comparison"], path)))))
        made.append(v)
        with pytest.raises(BadInput) as exc:
            find_baseline(dataclasses.replace(config, baseline=str(v)), key)
        assert f"differs from this run in {label(path)}" in str(exc.value), (path, str(exc.value))
    dropped = variant(study, "drop", lambda p: edit_metrics(p, lambda m: m["comparison"]["tasks"].pop("mytask")))
    with pytest.raises(BadInput, match=r"tasks\.mytask \(not in the other run\)"):
        find_baseline(dataclasses.replace(config, baseline=str(dropped)), key)
    assert find_baseline(config, key)["run"].path == s1  # every variant is newer, none matches
    assert "differs from this run in dtype" in refused(study, capsys, made[[p[0] for p in paths].index("dtype")])
    for v in [*made, dropped]:
        shutil.rmtree(v)


def get(record, path):
    for key in path:
        record = record[key]
    return record


# EvalConfig fields that do not decide a number (where, how fast, or what stage 2 changes), or are compared by
# what they resolve to (the model by identity, tasks and data by lm-eval's resolved tasks and file digests).
NOT_IDENTITY = {"stage", "mask", "batch_size", "device", "runs_dir", "baseline", "gate", "ignore_gate",
                "model", "tasks", "include_path", "task_data",
                "config_file",  # where the values came from; the values themselves are the fields above
                "allow_label_leakage",  # permits a leaking mask; the mask is what stage 2 changes, and leaky is recorded
                "mask_layers",  # where the mask applies: part of what stage 2 changes, recorded resolved (mask_layers)
                "mask_file"}  # a mask from a file: its digest is in the mask's name (name@sha8), what stage 2 changes
CHANGED = {"dtype": "bfloat16", "attn_implementation": "eager", "max_length": 64, "limit": 5, "num_fewshot": 1,
           "seed": 7}


def test_every_setting_that_decides_a_number_is_in_the_record(study, tiny_models):
    config = load_eval_config(STAGE1, study["flags"])
    manager, task_data, tasks = check_inputs(config)
    base = comparison_key(config, task_data, model_identity(config.model), tasks, manager, "cpu")
    fields = {f.name for f in dataclasses.fields(EvalConfig)} - NOT_IDENTITY
    assert fields == set(CHANGED), "classify the new EvalConfig field: identity (CHANGED) or NOT_IDENTITY"
    for name, value in CHANGED.items():
        other = comparison_key(dataclasses.replace(config, **{name: value}), task_data,
                               model_identity(config.model), tasks, manager, "cpu")
        assert mismatch(other, base) == [name]
    other_model = model_identity(str(tiny_models("llama", num_hidden_layers=1)))
    assert mismatch(comparison_key(config, task_data, other_model, tasks, manager, "cpu"), base) == ["model"]


@pytest.mark.parametrize("case", ["relabelled data file", "edited prompt template"])
def test_include_path_task_edited_after_stage1_is_refused(study, capsys, case):
    yaml_path, data = study["include"] / "mytask.yaml", study["data"]
    saved = {p: p.read_bytes() for p in (yaml_path, data)}
    try:
        if case == "relabelled data file":
            rows = [json.loads(line) for line in data.read_text().splitlines()]
            rows[0]["label"] = (rows[0]["label"] + 1) % len(rows[0]["choices"])
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            expected = ("tasks.mytask.docs", "tasks.mytask.files (dataset_kwargs.data_files.test)")
        else:
            yaml_path.write_text(TEMPLATE.format(data=data, text="Q: {{question}}\\nA:"))
            expected = ("tasks.mytask.config (doc_to_text, fewshot_config)", "tasks.mytask.files (yaml)")
        err = refused(study, capsys, study["s1"])
        assert all(e in err for e in expected) and "ablate_tiny" not in err, err
    finally:
        for p, content in saved.items():
            p.write_bytes(content)


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


CORRUPTIONS = {
    "edited accuracy in metrics.json": (lambda p, s2: edit_metrics(p, lambda m: m["tasks"]["mytask"].update(acc=0.99)),
                                        "metrics.json gives mytask acc 0.99"),
    "duplicated samples line": (lambda p, s2: (p / "samples_mytask.jsonl").write_text(
        "".join(_rows(p / "samples_mytask.jsonl") + _rows(p / "samples_mytask.jsonl")[:1])), "does not match the sha256"),
    "truncated samples file": (lambda p, s2: (p / "samples_mytask.jsonl").write_text(
        "".join(_rows(p / "samples_mytask.jsonl")[:-1])), "does not match the sha256"),
    "swapped samples file": (lambda p, s2: shutil.copy(s2 / "samples_mytask.jsonl", p / "samples_mytask.jsonl"),
                             "does not match the sha256"),
    "no samples digests": (lambda p, s2: edit_metrics(p, lambda m: m.pop("samples")), "records no samples digests"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupted_baseline_is_refused_in_one_line(study, capsys, case):
    corrupt, message = CORRUPTIONS[case]
    v = variant(study, "bad", lambda p: corrupt(p, study["s2"]))
    try:
        assert message in refused(study, capsys, v)
    finally:
        shutil.rmtree(v)


def test_duplicated_doc_id_refused_even_with_a_matching_digest(study):
    def both(p):  # someone edited the samples and the digest to agree: one row per document still holds
        f = p / "samples_mytask.jsonl"
        f.write_text("".join(_rows(f) + _rows(f)[:1]))
        edit_metrics(p, lambda m: m["samples"]["mytask"].update(
            sha256=hashlib.sha256(f.read_bytes()).hexdigest(), rows=len(_rows(f))))

    v = variant(study, "dup", both)
    try:
        with pytest.raises(BadInput, match="holds doc_id 0 twice"):
            verified_samples(rundir.load_run(v))
    finally:
        shutil.rmtree(v)


def test_clean_baseline_numbers_are_the_samples(study):
    s1, s2 = study["s1"], study["s2"]
    m1 = json.loads((s1 / "metrics.json").read_text())
    m2 = json.loads((s2 / "metrics.json").read_text())
    assert m2["baseline"]["run_id"] == s1.name and m1["mask_check"] is None  # no mask check on a causal run
    for task in ("ablate_tiny", "mytask"):
        rows = [json.loads(line) for line in (s1 / f"samples_{task}.jsonl").read_text().splitlines()]
        assert m1["samples"][task] == {"file": f"samples_{task}.jsonl", "rows": LIMIT,
                                       "sha256": hashlib.sha256((s1 / f"samples_{task}.jsonl").read_bytes()).hexdigest()}
        assert m2["baseline"]["tasks"][task]["acc_baseline"] == sum(r["correct"] for r in rows) / len(rows)
        assert m2["baseline"]["tasks"][task]["acc_baseline"] == pytest.approx(m1["tasks"][task]["acc"])
    assert m2["baseline"]["macro"]["acc_baseline"] == pytest.approx(m1["macro"]["acc"])
    assert m2["comparison"] == m1["comparison"]


def test_aggregate_pools_only_runs_that_differ_by_seed(study):
    from ablate.results.aggregate import aggregate

    def reseed(m):
        m["seed"] = m["comparison"]["seed"] = 99

    seeded = variant(study, "seed", lambda p: edit_metrics(p, reseed))
    other = variant(study, "bf16", lambda p: edit_metrics(p, lambda m: m["comparison"].update(dtype="bfloat16")))
    try:
        groups = {(g["stage"], g["comparison"]["dtype"]): g["seeds"] for g in aggregate(study["runs"])}
        assert groups[(STAGE1, "float32")] == [99, 1234] and groups[(STAGE1, "bfloat16")] == [1234]
    finally:
        shutil.rmtree(seeded), shutil.rmtree(other)


def test_aggregate_never_pools_finetunes_of_other_settings_as_seeds(tmp_path):
    from ablate.results.aggregate import aggregate

    def stage3(name, seed, lr):
        path = tmp_path / "stage3_finetune_causal" / name
        path.mkdir(parents=True)
        (path / "status.txt").write_text("completed\n")
        (path / "config.json").write_text(json.dumps({"seed": seed, "learning_rate": lr, "max_steps": 6,
                                                      "runs_dir": str(tmp_path), "logging_steps": seed}))
        (path / "summary.json").write_text(json.dumps({"status": "completed", "model_identity": {"local": "m"}}))
        return path

    entries = [{"checkpoint": str(stage3(f"2026010{i}-000000", seed, lr)), "train_mask": "causal", "train_seed": seed,
                "tasks": {"t": {"acc": acc}}, "macro": {"acc": acc}}
               for i, (seed, lr, acc) in enumerate([(1, 1e-3, 0.5), (2, 1e-3, 0.7), (1, 1e-1, 0.1)])]
    s4 = tmp_path / "stage4_post_ft_eval" / "20260110-000000"
    s4.mkdir(parents=True)
    (s4 / "status.txt").write_text("completed\n")
    (s4 / "metrics.json").write_text(json.dumps({"stage": "stage4_post_ft_eval", "status": "completed",
                                                 "mask": "prefill_bidir", "comparison": {}, "checkpoints": entries}))
    # The grouping alone: the hand-made stage 4 run has no samples to verify, so it is passed as verified.
    stages = {STAGE1: [], STAGE2: [], "stage4_post_ft_eval": [rundir.load_run(s4)]}
    groups = sorted((g["training"]["learning_rate"], g["seeds"], g["macro"]["mean"])
                    for g in aggregate(tmp_path, stages=stages))
    assert groups == [(1e-3, [1, 2], pytest.approx(0.6)), (1e-1, [1], pytest.approx(0.1))]


def test_the_record_holds_what_transformers_resolved(study):
    from ablate.core.models import load_model, resolved

    record = json.loads((study["s1"] / "metrics.json").read_text())["comparison"]
    model, _ = load_model(study["flags"]["model"], "cpu", "auto", record["attn_implementation"])
    assert resolved(model) == {"dtype": record["dtype"], "attn_implementation": record["attn_implementation"]}


def test_a_model_resolved_to_other_attention_than_asked_is_refused_before_the_run_folder(study, capsys, monkeypatch):
    from transformers import PreTrainedModel

    # What transformers does when sdpa cannot dispatch and nothing was asked for: eager, silently.
    asked = PreTrainedModel.get_correct_attn_implementation
    monkeypatch.setattr(PreTrainedModel, "get_correct_attn_implementation",
                        lambda self, requested, is_init_check=False: "eager" if requested == "sdpa"
                        else asked(self, requested, is_init_check))
    before = sorted(p.name for p in (study["runs"] / STAGE1).iterdir())
    f = study["flags"]
    capsys.readouterr()
    assert main(["stage1", "--model", f["model"], "--tasks", TASKS, "--include-path", f["include_path"], "--limit",
                 str(LIMIT), "--device", "cpu", "--runs-dir", str(study["runs"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "with attn_implementation 'eager' where 'sdpa' was asked for" in err, err
    assert sorted(p.name for p in (study["runs"] / STAGE1).iterdir()) == before
