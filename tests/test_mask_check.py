"""The runtime mask check on tiny real models: python -m pytest tests/test_mask_check.py -q

Every architecture (two with sliding-window layers) x sdpa and eager passes under prefill_bidir; the
check fails in one line when the run path silently falls back to causal (the library bug it exists to
catch, played by a mask builder that returns the padding mask) or builds another mask; an evaluation
records its passed check as ``lm.mask_check`` and in metrics.json; a training batch is checked too.
"""

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from typer.testing import CliRunner

from ablate.cli import app
from ablate.core import lm_eval_model, mask_check, masks
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.mask_check import MaskCheckFailed, check_mask, check_training_mask, reference_mask
from ablate.core.models import load_model
from ablate.core.sft_data import Collator
from ablate.core.tiny import ARCHS

ROWS = [([5, 17, 33, 9, 41, 12, 7, 30], 5), ([8, 21, 3, 44, 19], 3)]
SLIDING = {"mistral-sliding": ("mistral", dict(sliding_window=2)),
           "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=2, max_window_layers=1))}
MODELS = {**{arch: (arch, {}) for arch in ARCHS}, **SLIDING}


def load(tiny_models, name, impl="sdpa"):
    arch, overrides = MODELS[name]
    return load_model(str(tiny_models(arch, **overrides)), "cpu", "float32", impl)[0]


def padding_only(config, mask_name, attention_mask, *args, **kwargs):
    """The silent fallback: whatever the mask, the model gets the padding mask and runs causally."""
    return attention_mask


def test_the_reference_is_the_definition():
    got = reference_mask("prefill_bidir", [5, 4], [3, 2], 5, torch.float32)[:, 0] == 0
    assert got[0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                                     [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert got[1].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                     [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]  # padding never attended
    window = reference_mask("prefill_bidir", [5], [3], 5, torch.float32, window=2)[0, 0] == 0
    assert window[:3, :3].all() and window[4].int().tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefill_bidir_passes_on_every_architecture(tiny_models, name, impl):
    model = load(tiny_models, name, impl)
    record = check_mask(model, "prefill_bidir", ROWS)
    assert record["passed"] and record["differs_from_causal"]
    assert record["max_diff"] <= record["tolerance"] < record["masked_vs_causal"]
    assert record["tolerance"] == max(mask_check.CALIBRATION * record["causal_diff"], record["floor"],
                                      mask_check.EFFECT_SHARE * record["effect"])
    assert record["backend"] == impl and model.config._attn_implementation == impl  # switched back
    assert (record["dtype"], record["device"], record["rows"]) == ("float32", "cpu", 2)
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("name", ["llama", "qwen2-sliding"])
def test_bfloat16_passes_too(tiny_models, name):
    # The dtype floor must stay below what the mask changes, or a tiny bf16 model reads as a causal fallback.
    arch, overrides = MODELS[name]
    model = load_model(str(tiny_models(arch, **overrides)), "cpu", "bfloat16", "sdpa")[0]
    record = check_mask(model, "prefill_bidir", ROWS)
    assert record["passed"] and record["dtype"] == "bfloat16"


def test_full_bidir_has_its_own_reference(tiny_models):
    record = check_mask(load(tiny_models, "llama"), "full_bidir", ROWS)
    assert record["passed"] and record["mask"] == "full_bidir"


@pytest.mark.parametrize("name", SLIDING)
def test_the_sliding_layers_are_checked(tiny_models, name, monkeypatch):
    # A reference that forgot the window differs from the run: the sliding layers are in the comparison.
    model = load(tiny_models, name)
    windowed = mask_check.reference_mask
    monkeypatch.setattr(mask_check, "reference_mask", lambda name, *args, window=None, **kw: windowed(
        name, *args, window=window if name == "causal" else None, **kw))  # the causal calibration keeps it
    record = check_mask(model, "prefill_bidir", ROWS, strict=False)
    assert record["max_diff"] > record["tolerance"] and not record["passed"]


@pytest.mark.parametrize("name", ["llama", "qwen2-sliding", "mistral3"])
def test_a_silent_causal_fallback_fails_in_one_line(tiny_models, name, monkeypatch):
    model = load(tiny_models, name)
    monkeypatch.setattr(masks, "model_attention_mask", padding_only)
    with pytest.raises(MaskCheckFailed, match="did not take effect") as info:
        check_mask(model, "prefill_bidir", ROWS)
    assert "\n" not in str(info.value) and info.value.result["passed"] is False
    assert info.value.result["masked_vs_causal"] == 0.0


def test_another_mask_than_the_one_named_fails(tiny_models, monkeypatch):
    model = load(tiny_models, "llama")
    build = masks.model_attention_mask

    def another_mask(config, name, *args, **kwargs):  # full_bidir whenever a non-causal mask is named
        return build(config, name if name == "causal" else "full_bidir", *args, **kwargs)

    monkeypatch.setattr(masks, "model_attention_mask", another_mask)
    with pytest.raises(MaskCheckFailed, match="differ from the eager reference"):
        check_mask(model, "prefill_bidir", ROWS)


def test_a_training_batch_is_checked(tiny_models, monkeypatch):
    model = load(tiny_models, "qwen3")
    model.train()
    batch = Collator(0)([{"input_ids": tokens, "labels": tokens, "prefix_len": p} for tokens, p in ROWS])
    record = check_training_mask(model, batch, "prefill_bidir")
    assert record["passed"] and record["where"] == "training" and model.training
    monkeypatch.setattr(masks, "model_attention_mask", padding_only)
    with pytest.raises(MaskCheckFailed, match=r"\(training\).*did not take effect"):
        check_training_mask(model, batch, "prefill_bidir")


def requests(lm):
    return [Instance("loglikelihood", doc={}, idx=i, arguments=(context, choice))
            for i, (context, choice) in enumerate([("the cat sat on the", " mat"), ("the cat sat on the", " hat"),
                                                   ("a dog ran", " home")])]


def test_the_evaluation_records_it_once(tiny_models, monkeypatch):
    model, tokenizer = load_model(str(tiny_models("llama")), "cpu", "float32", "sdpa")
    causal = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=2, device="cpu")
    causal.loglikelihood(requests(causal))
    assert causal.mask_check is None  # the causal mask is the model's own: nothing to check
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2, device="cpu")
    first = lm.loglikelihood(requests(lm))
    assert lm.mask_check["passed"] and lm.mask_check["rows"] == 3 and lm.mask_check["where"] == "evaluation"
    record = lm.mask_check
    assert lm.loglikelihood(requests(lm)) == first and lm.mask_check is record  # once per run
    generating = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2, device="cpu")
    generating.generate_until([Instance("generate_until", doc={}, idx=0, arguments=(
        "the cat sat on the mat", {"until": ["\n"], "max_gen_toks": 3, "do_sample": False, "temperature": 0}))])
    assert generating.mask_check["passed"]


def test_the_evaluation_stops_on_a_fallback(tiny_models, monkeypatch):
    model, tokenizer = load_model(str(tiny_models("llama")), "cpu", "float32", "sdpa")
    monkeypatch.setattr(lm_eval_model, "model_attention_mask", padding_only)
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2, device="cpu")
    with pytest.raises(MaskCheckFailed, match="did not take effect"):
        lm.loglikelihood(requests(lm))
    assert lm.mask_check["passed"] is False


def test_stage2_records_a_passed_check_and_a_fallback_exits_2(tiny_llama, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    evals = ["--model", tiny_llama, "--tasks", "ablate_tiny", "--device", "cpu", "--runs-dir", runs, "--limit", "4"]
    runner = CliRunner()
    for stage in (["stage1"], ["stage2", "--mask", "prefill_bidir"]):
        result = runner.invoke(app, [str(a) for a in stage + evals])
        assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads(next((runs / "stage2_ablation_eval").iterdir()).joinpath("metrics.json").read_text())
    if "mask_check" in metrics:  # written by ablate.stages.evaluation from lm.mask_check
        assert metrics["mask_check"]["passed"] and metrics["mask_check"]["mask"] == "prefill_bidir"
    monkeypatch.setattr(lm_eval_model, "model_attention_mask", padding_only)
    result = runner.invoke(app, [str(a) for a in ["stage2", "--mask", "prefill_bidir"] + evals])
    assert result.exit_code == 2 and "mask check failed" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("ablate: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output and "did not take effect" in errors[0]
    failed = sorted((runs / "stage2_ablation_eval").iterdir())[-1]
    assert (failed / "status.txt").read_text().split()[0] == "failed"
