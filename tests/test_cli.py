"""The CLI end to end on a tiny local model: python -m pytest tests/test_cli.py -q"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.core.tasks import FIXTURE_DATA

runner = CliRunner()
PIQA = f"piqa={FIXTURE_DATA['piqa']}"


def ablate(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run_dirs(runs, stage="*"):
    return sorted(p for p in Path(runs).glob(f"{stage}/*") if p.is_dir())


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    """stage 1 then stage 2 through the real console entry point, in a subprocess."""
    runs = tmp_path_factory.mktemp("runs")
    model = tiny_models("llama")
    common = ["--model", model, "--tasks", "ablate_tiny,piqa", "--task-data", PIQA,
              "--device", "cpu", "--batch-size", "4", "--runs-dir", runs]
    outputs = []
    outside_git = tmp_path_factory.mktemp("cwd")  # lm-eval asks git for a hash of the working directory
    for stage, extra in (("stage1", []), ("stage2", ["--mask", "prefill_bidir"])):
        proc = subprocess.run([sys.executable, "-m", "ablate", stage, *map(str, common + extra)],
                              capture_output=True, text=True, timeout=600, env={**os.environ}, cwd=outside_git)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "not a git repository" not in proc.stderr
        outputs.append(proc.stdout)
    s1 = run_dirs(runs, "stage1_baseline_eval")[0]
    s2 = run_dirs(runs, "stage2_ablation_eval")[0]
    return runs, s1, s2, outputs


def test_stage1_writes_the_run_directory(study):
    _, s1, _, outputs = study
    assert (s1 / "status.txt").read_text().split()[0] == "completed"
    for name in ("metrics.json", "config.json", "env.json", "run.log", "samples_ablate_tiny.jsonl", "samples_piqa.jsonl"):
        assert (s1 / name).is_file(), name
    metrics = json.loads((s1 / "metrics.json").read_text())
    assert metrics["stage"] == "stage1_baseline_eval" and metrics["status"] == "completed"
    assert metrics["run_id"] == s1.name and metrics["mask"] == "causal"
    piqa = metrics["tasks"]["piqa"]
    assert piqa["n"] == 8 and piqa["chance"] == 0.5 and 0 <= piqa["acc"] <= 1
    assert piqa["acc_stderr"] > 0 and "acc_norm" in piqa
    assert metrics["tasks"]["ablate_tiny"]["chance"] == 0.25
    assert metrics["macro"]["acc"] == pytest.approx((piqa["acc"] + metrics["tasks"]["ablate_tiny"]["acc"]) / 2)
    assert metrics["macro"]["chance"] == pytest.approx(0.375)
    assert metrics["timing"]["tokens"] > 0 and metrics["timing"]["tokens_per_second"] > 0
    env = json.loads((s1 / "env.json").read_text())
    assert {"git_sha", "git_dirty", "packages", "device"} <= set(env) and env["packages"]["lm_eval"]
    config = json.loads((s1 / "config.json").read_text())
    assert config["tasks"] == ["ablate_tiny", "piqa"] and config["mask"] == "causal"
    assert f"run directory: {s1}" in outputs[0]


def test_samples_jsonl_rows(study):
    _, s1, _, _ = study
    rows = [json.loads(line) for line in (s1 / "samples_piqa.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(8))
    metrics = json.loads((s1 / "metrics.json").read_text())
    for row in rows:
        assert len(row["logprobs"]) == 2 and row["pred"] == row["logprobs"].index(max(row["logprobs"]))
        assert row["correct"] == (row["pred"] == row["target"])
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["tasks"]["piqa"]["acc"])


def test_stage2_compares_with_stage1(study):
    _, s1, s2, outputs = study
    m1 = json.loads((s1 / "metrics.json").read_text())
    m2 = json.loads((s2 / "metrics.json").read_text())
    assert m2["mask"] == "prefill_bidir" and m2["baseline"]["run_id"] == s1.name
    for task in ("piqa", "ablate_tiny"):
        b = m2["baseline"]["tasks"][task]
        assert b["acc_baseline"] == m1["tasks"][task]["acc"]
        assert b["delta"] == pytest.approx(m2["tasks"][task]["acc"] - m1["tasks"][task]["acc"])
        expected = m2["tasks"][task]["acc"] / m1["tasks"][task]["acc"] if m1["tasks"][task]["acc"] else None
        assert b["retention"] == (pytest.approx(expected) if expected is not None else None)
    assert m2["baseline"]["macro"]["delta"] == pytest.approx(m2["macro"]["acc"] - m1["macro"]["acc"])
    assert "retention" in outputs[1]
    # the ablation changed the scores themselves, document by document
    rows1 = [json.loads(x) for x in (s1 / "samples_piqa.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (s2 / "samples_piqa.jsonl").read_text().splitlines()]
    assert [r["logprobs"] for r in rows1] != [r["logprobs"] for r in rows2]


def test_stage2_without_stage1_still_runs_and_says_why(tiny_llama, tmp_path):
    result = ablate("stage2", "--model", tiny_llama, "--tasks", "ablate_tiny", "--device", "cpu",
                    "--runs-dir", tmp_path, "--limit", "4")
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path)
    baseline = json.loads((run / "metrics.json").read_text())["baseline"]
    assert baseline["run"] is None and "no completed stage 1 run" in baseline["reason"]
    assert "no stage 1 comparison" in result.output


def test_stage2_does_not_compare_with_other_settings(study, tiny_llama):
    runs, _, _, _ = study
    result = ablate("stage2", "--model", tiny_llama, "--tasks", "ablate_tiny,piqa", "--task-data", PIQA,
                    "--device", "cpu", "--runs-dir", runs, "--limit", "3")
    assert result.exit_code == 0, result.output
    latest = run_dirs(runs, "stage2_ablation_eval")[-1]
    baseline = json.loads((latest / "metrics.json").read_text())["baseline"]
    assert baseline["run"] is None and "differs in limit" in baseline["reason"]


BAD = {
    "unknown task": (["--tasks", "piqqa"], "unknown task 'piqqa'; did you mean piqa"),
    "unknown mask": (["--mask", "bidir"], "unknown mask 'bidir'"),
    "missing model": (["--model", "./no/such/model"], "does not exist"),
    "flash with prefix mask": (["--attn-implementation", "flash_attention_2"], "FlashAttention only supports causal"),
    "bad batch size": (["--batch-size", "0"], "--batch-size must be"),
    "unknown device": (["--device", "gpu"], "unknown device 'gpu'"),
    "unknown dtype": (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    "task data for another task": (["--task-data", PIQA], "names tasks not in --tasks"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, tiny_llama, tmp_path):
    extra, message = BAD[case]
    args = ["--model", tiny_llama, "--tasks", "ablate_tiny", "--device", "cpu", "--runs-dir", tmp_path]
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    result = ablate("stage2", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert run_dirs(tmp_path) == []


@pytest.mark.parametrize("content,message", [
    ('{"goal": "x", "sol1": "a", "sol2": "b", "label": 0}\n{not json\n', "line 2 is not valid JSON"),
    ('{"goal": "x", "sol1": "a", "label": 0}\n', "lacks field(s) sol2 used by task 'piqa'"),
    ("\n", "has no rows"),
    ('{"goal": "x", "sol1": "a", "sol2": "b", "label": 1}\n{"goal": "y", "sol1": "a", "sol2": "b", "label": 5}\n',
     "row 1 of its data file"),
    ('{"goal": "x", "sol1": "a", "sol2": "b", "label": 5}\n', "cannot build tasks piqa from --task-data"),
])
def test_malformed_task_data(content, message, tiny_llama, tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text(content)
    result = ablate("stage1", "--model", tiny_llama, "--tasks", "piqa", "--task-data", f"piqa={data}",
                    "--device", "cpu", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "runs").exists() or run_dirs(tmp_path / "runs") == []


def test_stage1_is_causal_only():
    from ablate.results.rundir import STAGE1
    from ablate.stages.config import load_eval_config
    from ablate.errors import BadInput

    with pytest.raises(BadInput, match="stage 1 is the causal baseline"):
        load_eval_config(STAGE1, {"mask": "prefill_bidir", "model": "m", "tasks": "piqa"})
    assert load_eval_config(STAGE1, {"model": "m"}).tasks == (
        "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


def test_help_lists_every_command_with_an_example():
    result = ablate("--help")
    for command in ("stage1", "stage2", "masks", "tiny-model"):
        assert command in result.output
        assert "Example" in ablate(command, "--help").output


def test_masks_command_lists_the_registry():
    result = ablate("masks")
    assert result.exit_code == 0
    assert "prefill_bidir" in result.output and "leaks labels" in result.output


def test_tiny_model_refuses_to_overwrite(tmp_path):
    result = ablate("tiny-model", "--out", tmp_path)
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_include_path_adds_a_custom_task(tiny_llama, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "colors.yaml").write_text(
        "task: my_colors\ndataset_path: json\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"{{q}}\\nAnswer:\"\ndoc_to_target: label\ndoc_to_choice: opts\n"
        "metric_list:\n  - metric: acc\n"
    )
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps({"q": f"The sky in picture {i} is blue. Its color?", "opts": ["blue", "red", "green"],
                                        "label": 0}) + "\n" for i in range(5)))
    result = ablate("stage1", "--model", tiny_llama, "--tasks", "my_colors", "--include-path", tasks,
                    "--task-data", f"my_colors={data}", "--device", "cpu", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"]["my_colors"]["n"] == 5
    assert metrics["tasks"]["my_colors"]["chance"] == pytest.approx(1 / 3)
    assert "acc_norm" not in metrics["tasks"]["my_colors"]


def test_gate_marks_the_run_and_stage2_refuses_it(tiny_llama, tmp_path, monkeypatch):
    import ablate.stages.config as config_module

    import shutil

    stages = tmp_path / "stages"
    shutil.copytree(config_module.STAGES_DIR, stages, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (stages / "stage1_baseline_eval.yaml").write_text("gate: {metric: macro.acc, min: 0.99}\n")
    monkeypatch.setattr(config_module, "STAGES_DIR", stages)
    common = ["--model", tiny_llama, "--tasks", "ablate_tiny", "--device", "cpu", "--runs-dir", tmp_path / "runs",
              "--limit", "4"]
    result = ablate("stage1", *common)
    assert result.exit_code == 0 and "GATED: macro.acc" in result.output
    (run,) = run_dirs(tmp_path / "runs", "stage1_baseline_eval")
    assert (run / "status.txt").read_text().startswith("gated")
    assert json.loads((run / "metrics.json").read_text())["status"] == "gated"
    refused = ablate("stage2", *common)
    assert refused.exit_code == 2 and "is gated (macro.acc" in refused.stderr and "--ignore-gate" in refused.stderr
    assert ablate("stage2", *common, "--ignore-gate").exit_code == 0


def test_malformed_gate_is_bad_input(tmp_path, monkeypatch):
    import ablate.stages.config as config_module

    (tmp_path / "stage1_baseline_eval.yaml").write_text("gate: {metric: macro.acc, floor: 0.4}\n")
    monkeypatch.setattr(config_module, "STAGES_DIR", tmp_path)
    result = ablate("stage1", "--model", "m", "--tasks", "piqa")
    assert result.exit_code == 2 and "gate must look like" in result.stderr


def test_bench_compares_stock_lm_eval_with_ablate(tiny_llama, tmp_path):
    from ablate.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_llama), "--tasks", "ablate_tiny,piqa", "--limit", "6", "--repeats", "1",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    piqa, tiny = result["tasks"]["piqa"], result["tasks"]["ablate_tiny"]
    assert tiny["identical_predictions"] and piqa["identical_predictions"]
    assert tiny["documents"] == 6 and tiny["max_loglikelihood_difference"] < 1e-4
    assert tiny["tokens"]["ablate"] < tiny["tokens"]["stock"]  # four choices behind one context
    assert tiny["token_ratio"] == pytest.approx(tiny["tokens"]["stock"] / tiny["tokens"]["ablate"], abs=1e-3)
    assert len(tiny["seconds"]["stock"]) == len(tiny["seconds"]["ablate"]) == 1
