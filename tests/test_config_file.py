"""``--config FILE``: package YAML < study file < flags, validated up front: python -m pytest tests/test_config_file.py -q"""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from ablate.cli import main
from ablate.errors import BadInput
from ablate.stages import study_file
from ablate.stages.config import load_eval_config, load_finetune_config, load_stage4_config
from ablate.results.rundir import STAGE1, STAGE2

DATA = str(Path(__file__).parent / "data" / "sft.jsonl")


def _file(tmp_path, data, name="study.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_precedence_package_file_flags(tmp_path):
    path = _file(tmp_path, {"model": "m", "tasks": "a,b", "limit": 4, "seed": 7,
                            "stage2": {"mask": "full_bidir", "allow_label_leakage": True, "limit": 5}})
    s1 = load_eval_config(STAGE1, {"config_file": path, "limit": 3})
    assert (s1.model, s1.tasks, s1.limit, s1.seed) == ("m", ("a", "b"), 3, 7)  # the flag wins over the file
    assert s1.attn_implementation == "sdpa" and s1.batch_size == "8"  # the package YAML where the file is silent
    assert s1.config_file == {"path": str(Path(path).resolve()),
                              "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    s2 = load_eval_config(STAGE2, {"config_file": path})
    assert (s2.mask, s2.limit, s2.seed) == ("full_bidir", 5, 7)  # the section over the top level
    assert load_eval_config(STAGE1, {"model": "m", "tasks": "a"}).config_file is None


def test_one_file_serves_every_stage(tmp_path):
    path = _file(tmp_path, {"model": "m", "tasks": ["a"], "device": "cpu", "batch_size": 2, "runs_dir": "r",
                            "gate": {"metric": "macro.acc", "min": 0.3},
                            "stage3": {"data": DATA, "max_steps": 20, "gate": {"metric": "eval_loss", "max": 3.0}},
                            "stage4": {"also_causal": True}, "study": {"masks": ["causal"]}})
    s1 = load_eval_config(STAGE1, {"config_file": path})
    s3 = load_finetune_config({"config_file": path, "mask": "causal"})
    s4 = load_stage4_config({"config_file": path})
    assert (s1.batch_size, s3.batch_size) == ("2", 2)  # each stage reads the value in its own type
    assert s1.gate == {"metric": "macro.acc", "min": 0.3} and s3.gate == {"metric": "eval_loss", "max": 3.0}
    assert (s3.max_steps, s3.mask, s3.data, s3.runs_dir) == (20, "causal", DATA, "r")
    assert s4.also_causal is True and s4.runs_dir == "r" and s4.device == "cpu"
    assert study_file.study_values(yaml.safe_load(Path(path).read_text())) == {"masks": ["causal"]}


def test_a_plain_file_of_one_stage(tmp_path):
    path = _file(tmp_path, "model: m\ndata: d.jsonl\nmax_steps: 30\nlearning_rate: 1.0e-4\n")
    s3 = load_finetune_config({"config_file": path})
    assert (s3.max_steps, s3.learning_rate, s3.data) == (30, 1e-4, "d.jsonl")


# Each bad file: what the one line must name. Every one is refused before anything runs.
BAD = [
    ("modle: m\n", "unknown field modle"),
    ("stage3: {max_stepz: 3}\n", "stage3.max_stepz is not a stage3 field"),
    ("stage1: {mask: prefill_bidir}\n", "stage1.mask is not a stage1 field"),
    ("stage2: 3\n", "section stage2 must hold field: value pairs"),
    ("limit: ten\n", "limit must be"),
    ("stage3: {learning_rate: .nan}\n", "stage3.learning_rate must be a finite number"),
    ("seed: true\n", "seed must be a whole number"),
    ("study: {maskz: [causal]}\n", "study: unknown maskz"),
    ("- a\n- b\n", "expected field: value pairs"),
    ("model: [unclosed\n", "not readable YAML"),
    ("config_file: x\n", "unknown field config_file"),
    ("stage: stage9\n", "unknown field stage"),
]


@pytest.mark.parametrize("text,says", BAD, ids=[b[1] for b in BAD])
def test_bad_files_are_one_line_naming_file_and_key(tmp_path, text, says, capsys):
    path = _file(tmp_path, text)
    with pytest.raises(BadInput, match=None) as err:
        load_eval_config(STAGE2, {"config_file": path, "model": "m", "tasks": "a"})
    assert says in str(err.value) and path in str(err.value)
    code = main(["stage1", "--config", path, "--model", "m", "--tasks", "a", "--runs-dir", str(tmp_path / "runs")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and err_lines[0].startswith("ablate: error: --config")
    assert not (tmp_path / "runs").exists()


def test_missing_file(tmp_path, capsys):
    assert main(["stage4", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_through_the_cli_records_the_file(tiny_llama, tmp_path):
    """The way a user types it: the file's values reach config.json with its digest; STATUS.md lands beside
    the runs folder the file names (not ./runs)."""
    runs = tmp_path / "study-runs"
    path = _file(tmp_path, {"model": str(tiny_llama), "tasks": "ablate_tiny", "device": "cpu", "limit": 4,
                            "runs_dir": str(runs), "stage1": {"seed": 11}})
    assert main(["stage1", "--config", path, "--limit", "3"]) == 0
    (run,) = (runs / STAGE1).iterdir()
    config = json.loads((run / "config.json").read_text())
    assert (config["limit"], config["seed"], config["model"]) == (3, 11, str(tiny_llama))
    assert config["config_file"]["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert (tmp_path / "STATUS.md").is_file()


def test_help_names_config():
    from typer.testing import CliRunner

    from ablate.cli import app

    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert "--config" in CliRunner().invoke(app, [stage, "--help"]).output


def test_the_shipped_study_files_plan(tmp_path):
    """Every file in studies/ (the README's GPU-box study among them) resolves for every stage."""
    from ablate.stages.study import plan

    files = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))
    assert files
    for path in files:
        p = plan(path)
        assert p.stage1.mask == "causal" and p.stage2.mask != "causal" and set(p.stage3) <= {"causal", "prefill_bidir"}
        assert p.stage1.config_file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
