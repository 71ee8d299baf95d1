"""`ablate sweep`: stage 2 under several layer specs, one model load, one stage 1: python -m pytest tests/test_sweep.py -q"""

import json

import pytest

from ablate.cli import main
from ablate.core import models
from ablate.stages.sweep import block_specs
from ablate.errors import BadInput


def test_blocks_cover_every_layer_once():
    assert block_specs(1, 3) == ["0", "1", "2"]
    assert block_specs(2, 5) == ["0-1", "2-3", "4"]
    assert block_specs(5, 30) == ["0-4", "5-9", "10-14", "15-19", "20-24", "25-29"]
    assert block_specs(4, 3) == ["0-2"]
    for k in range(1, 9):
        from ablate.core.layer_masks import parse_layers

        covered = [i for spec in block_specs(k, 30) for i in parse_layers(spec, 30)]
        assert covered == list(range(30))
    with pytest.raises(BadInput, match="--blocks must be at least 1"):
        block_specs(0, 3)


@pytest.fixture(scope="module")
def swept(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_models("llama", num_hidden_layers=3)
    common = ["--model", str(model), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "6",
              "--runs-dir", str(root / "runs")]
    assert main(["stage1", *common]) == 0
    calls = []
    real = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    models.load_model = counting
    try:
        code = main(["sweep", "--mask", "prefill_bidir", *common, "--blocks", "1", "--layers", "all",
                     "--plot", str(root / "sweep.png"), "--out", str(root / "sweep.json")])
    finally:
        models.load_model = real
    assert code == 0
    return root, json.loads((root / "sweep.json").read_text()), calls


def test_each_spec_is_a_stage2_run_against_the_same_stage1(swept):
    from ablate.results import rundir

    root, result, _ = swept
    (stage1,) = (root / "runs" / "stage1_baseline_eval").iterdir()
    assert result["stage1"] == str(stage1) and result["num_layers"] == 3
    assert [r["layers"] for r in result["runs"]] == ["0-2", "0", "1", "2"]  # --layers first, then the blocks
    assert [r["spec"] for r in result["runs"]] == ["all", "0", "1", "2"]
    for r in result["runs"]:
        run = rundir.load_run(r["run"])
        assert run.stage == "stage2_ablation_eval" and run.metrics["mask_layers"] == {"layers": r["layers"], "num_layers": 3}
        assert run.metrics["baseline"]["run"] == str(stage1)  # one baseline for every spec
        assert run.config["baseline"] == str(stage1)
    last = result["runs"][3]["paired"]  # the last layer alone changes no score (tests/test_layer_masks.py)
    assert last["delta"] == 0 and last["mcnemar"]["lost"] == last["mcnemar"]["gained"] == 0
    assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_model_is_loaded_once(swept):
    _, _, calls = swept
    assert len(calls) == 1, calls


@pytest.mark.parametrize("flags,message", [
    (["--layers", "0-2", "--layers", "all"], "names the same layers as 0-2"),
    (["--layers", "5"], "names layer 5, but the model has 3 layers"),
    (["--layers", "7-3"], "runs backwards"),
    (["--blocks", "0"], "--blocks must be at least 1"),
    ([], "nothing to sweep"),
    (["--mask", "causal", "--layers", "0"], "needs a mask other than causal"),
])
def test_bad_sweeps_are_one_line_exit_2_and_write_no_run(swept, tiny_models, capsys, flags, message):
    root, _, _ = swept
    runs = root / "runs"
    before = sorted(runs.glob("stage2_ablation_eval/*"))
    code = main(["sweep", "--model", str(tiny_models("llama", num_hidden_layers=3)), "--tasks", "ablate_tiny",
                 "--device", "cpu", "--limit", "6", "--runs-dir", str(runs), *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ablate: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert sorted(runs.glob("stage2_ablation_eval/*")) == before


def test_a_sweep_without_its_stage1_is_refused_before_any_run(tiny_models, tmp_path, capsys):
    code = main(["sweep", "--model", str(tiny_models("llama", num_hidden_layers=3)), "--tasks", "ablate_tiny",
                 "--device", "cpu", "--limit", "6", "--runs-dir", str(tmp_path), "--layers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "compares each spec with stage 1: no completed stage 1 run" in err
    assert not list(tmp_path.glob("stage2_ablation_eval/*"))
