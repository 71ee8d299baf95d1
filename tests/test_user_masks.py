"""Masks from a file (``--mask FILE.py:NAME``): python -m pytest tests/test_user_masks.py -q

What a mask is gets decided from its function, on probes (every verdict enumerated below on the functions of
tests/data/user_masks.py); a mask that restates a registered one gives the registered one's numbers exactly; a
new one (``prompt_window``) equals a brute-force reference written here from its definition in evaluation
(prefix-shared), generation and a training step (padded and packed) on every tiny architecture, sdpa and eager,
in every layer and per layer; every real batch is checked against the verdicts; the file's digest names the
mask and a changed file is refused.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core import layer_masks
from ablate.core.layer_masks import parse_layers
from ablate.core.leakage import find_leak
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.masks import MASKS, dense_mask
from ablate.core.models import load_model
from ablate.core.sft_data import Collator
from ablate.core.sft_packing import PackingCollator
from ablate.core.mask_files import resolve
from ablate.errors import BadInput

from test_layer_masks import LAYERS, assert_training_step_is_the_brute_force, explicit_logits, kinds_of
from test_sft_packing import ARCHS
from test_sft_packing import rows as training_rows

FILE = Path(__file__).parent / "data" / "user_masks.py"


def user(name: str) -> str:
    return resolve(f"{FILE}:{name}", None)[0]


# --- what the probes decide ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,leaks,shares,causal_after,segmented", [
    ("causal", False, True, True, False),
    ("prefill", False, True, True, False),
    ("segments", False, True, True, True),
    ("prompt_window", False, True, True, False),
    ("full", True, False, False, False),
    ("next_token", True, False, False, False),
    ("response_skips_first", False, True, False, False),
    ("late_leak", False, True, True, False),  # its leak starts past every probe row: caught on real rows
])
def test_the_probes_decide_what_a_mask_is(name, leaks, shares, causal_after, segmented):
    spec = MASKS[user(name)]
    assert (spec.leaks_labels, spec.shares_context, spec.causal_continuation, spec.needs_segments) == \
        (leaks, shares, causal_after, segmented)
    assert spec.source["name"] == name and spec.name == f"{name}@{spec.source['sha256'][:8]}"


@pytest.mark.parametrize("name,message", [
    ("batch_mates", "depend on its batch-mates"), ("width_dependent", "depend on its batch-mates"),
    ("sees_nothing", "nothing to attend"), ("not_bool", "not bool"), ("python_if", "tensor operations"),
    ("NOT_A_FUNCTION", "defines no function"), ("missing", "defines no function"),
])
def test_a_function_that_cannot_be_a_mask_is_one_line(name, message):
    with pytest.raises(BadInput, match=message) as info:
        user(name)
    assert "\n" not in str(info.value)


def test_a_file_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import nothing_of_that_name\n")
    with pytest.raises(BadInput, match="does not run: ModuleNotFoundError"):
        resolve(f"{tmp_path / 'bad.py'}:m", None)
    with pytest.raises(BadInput, match="cannot read"):
        resolve(f"{tmp_path / 'absent.py'}:m", None)


def test_the_file_digest_names_the_mask_and_a_changed_file_is_refused(tmp_path):
    path = tmp_path / "masks.py"
    shutil.copy(FILE, path)
    label, source = resolve(f"{path}:prefill", None)
    assert resolve(label, source) == (label, source)  # a config re-read: the same file, the same mask
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(BadInput, match="changed since this run was configured"):
        resolve(label, source)
    other, _ = resolve(f"{path}:prefill", None)  # named afresh: another mask
    assert other != label and other.startswith("prefill@")
    with pytest.raises(BadInput, match="is not the recorded"):
        resolve("prefill@00000000", source)


# --- a restated mask is the registered one ------------------------------------------------------------

PAIRS = [("Q: To dry wet shoes?\nA: newspaper\n\nQ: Mia has a red ball. Its color?\nA:", " red"),
         ("Q: To dry wet shoes?\nA: newspaper\n\nQ: Mia has a red ball. Its color?\nA:", " blue"),
         ("Q: one segment only\nA:", " yes"),
         ("A", " a continuation longer than its context")]


def requests():
    return [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]


@pytest.mark.parametrize("restated,registered,separator", [("prefill", "prefill_bidir", None),
                                                           ("segments", "segment_bidir", "\n\n")])
def test_a_restated_mask_gives_the_registered_masks_scores(tiny_llama, restated, registered, separator):
    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    kw = dict(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu", segment_separator=separator)
    mine = PrefillMaskLM(mask=user(restated), **kw).loglikelihood(requests())
    theirs = PrefillMaskLM(mask=registered, **kw).loglikelihood(requests())
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=1e-5)
    rows = training_rows(segments=True)
    for collate in (Collator(0), PackingCollator(0, None)):
        batch = collate(rows)
        assert find_leak(user(restated), batch) is None
    plain = Collator(0)(rows)
    assert torch.equal(dense_mask(user(restated), plain["prefix_len"], plain["attention_mask"].bool(),
                                  plain["prompt_segments"]),
                       dense_mask(registered, plain["prefix_len"], plain["attention_mask"].bool(),
                                  plain["prompt_segments"]))


def test_a_leaking_mask_is_found_by_the_training_guard():
    batch = Collator(0)(training_rows())
    assert find_leak(user("next_token"), batch) is not None
    assert find_leak(user("full"), PackingCollator(0, None)(training_rows())) is not None


def test_a_leak_past_the_probes_is_caught_on_the_real_row():
    real = torch.ones(1, 24, dtype=torch.bool)
    with pytest.raises(BadInput, match="leaks labels on rows this long"):
        dense_mask(user("late_leak"), torch.tensor([3]), real)
    dense_mask(user("late_leak"), torch.tensor([3]), real[:, :20])  # short rows: causal


# --- a new mask against brute force ---------------------------------------------------------------------

def window_definition(n: int, prefix: int, window: int | None) -> torch.Tensor:
    """prompt_window's definition (tests/data/user_masks.py), written again: True = may attend."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = (k <= q) | ((q < prefix) & (k < prefix) & ((q - k).abs() <= 2))
    return allowed & (q - k < window) if window is not None else allowed


def brute_force_logits(model, tokens, prefix, layers):
    kinds, window = kinds_of(model)
    n = len(tokens)
    return explicit_logits(model, tokens, [
        window_definition(n, prefix if layers is None or i in layers else 0,
                          window if kind == "sliding_attention" else None) for i, kind in enumerate(kinds)])


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", [None, "1-2"])
def test_evaluation_under_a_file_mask_is_the_brute_force(tiny_models, arch, overrides, impl, spec):
    model, tokenizer = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32",
                                  impl)
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=user("prompt_window"), mask_layers=spec,
                       batch_size=3, device="cpu")
    layers = None if spec is None else parse_layers(spec, LAYERS)
    got = [ll for ll, _ in lm.loglikelihood(requests())]
    expected = []
    with torch.no_grad():
        for context, continuation in PAIRS:
            ctx, cont = lm._encode_pair(context, continuation)
            tokens = (ctx + cont)[:-1]
            logprobs = torch.log_softmax(brute_force_logits(model, tokens, len(ctx), layers).float(), -1)
            expected.append(float(logprobs[len(tokens) - len(cont):].gather(1, torch.tensor(cont)[:, None]).sum()))
    assert got == pytest.approx(expected, abs=1e-4)
    assert lm.mask_check["passed"]
    assert lm.tokens_processed < lm.tokens_unshared  # it shares contexts: the prefix-shared path ran


@pytest.mark.parametrize("arch,overrides", [ARCHS[0], ARCHS[3]], ids=["llama", "qwen2-sliding"])
def test_generation_under_a_file_mask_is_the_brute_force(tiny_models, arch, overrides):
    from ablate.core.generation import masked_greedy

    model, _ = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32", "sdpa")
    prompts = [[1, 17, 33, 9, 41, 5, 88], [1, 60, 4, 19]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded: own positions differ
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = masked_greedy(model, user("prompt_window"), ids, real, 5, None, pad_token_id=0, eos_token_ids=[-1])
    for row, prompt in enumerate(prompts):
        tokens = list(prompt)
        for _ in range(5):
            with torch.no_grad():
                tokens.append(int(brute_force_logits(model, tokens, len(prompt), None)[-1].argmax()))
        assert out[row, width:].tolist() == tokens[len(prompt):]


def test_generation_refuses_a_mask_not_causal_after_the_prompt(tiny_llama):
    from ablate.stages.checks import check_generation

    class Generative:
        OUTPUT_TYPE = "generate_until"

    with pytest.raises(BadInput, match="not causal after the prompt"):
        check_generation(user("response_skips_first"), {"gsm8k": Generative()})
    check_generation(user("prompt_window"), {"gsm8k": Generative()})


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl,layout", [("sdpa", "padded"), ("sdpa", "packed"), ("eager", "padded"),
                                         ("eager", "packed")])
def test_a_training_step_under_a_file_mask_is_the_brute_force(tiny_models, arch, overrides, impl, layout):
    model, _ = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32", impl)
    model.train()
    layers = layer_masks.install(model, "0,2")
    assert_training_step_is_the_brute_force(
        model, training_rows(), layout, user("prompt_window"),
        lambda r: brute_force_logits(model, r["input_ids"], r["prefix_len"], layers))


# --- the stages -----------------------------------------------------------------------------------------

def test_stages_run_a_file_mask_and_record_its_file(tiny_models, tmp_path):
    from ablate.cli import main
    from ablate.results import rundir

    runs, model = tmp_path / "runs", str(tiny_models("llama", num_hidden_layers=LAYERS))
    mask = f"{FILE}:prompt_window"
    common = ["--model", model, "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "6", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0
    assert main(["stage2", "--mask", mask, *common]) == 0
    assert main(["stage3", "--mask", mask, "--model", model, "--data", "tests/data/sft.jsonl", "--max-steps", "2",
                 "--save-steps", "2", "--device", "cpu", "--max-length", "64", "--runs-dir", str(runs)]) == 0
    assert main(["stage4", "--mask", mask, "--device", "cpu", "--runs-dir", str(runs)]) == 0
    label = user("prompt_window")
    (stage2,) = [rundir.load_run(p) for p in (runs / "stage2_ablation_eval").iterdir()]
    assert stage2.metrics["mask"] == label and stage2.metrics["mask_check"]["passed"]
    assert json.loads((stage2.path / "config.json").read_text())["mask_file"]["sha256"] == MASKS[label].source["sha256"]
    (stage3,) = [rundir.load_run(p) for p in (runs / f"stage3_finetune_{label}").iterdir()]
    assert stage3.summary["mask"] == label and stage3.summary["mask_check"]["passed"]
    (stage4,) = [rundir.load_run(p) for p in (runs / "stage4_post_ft_eval").iterdir()]
    assert stage4.metrics["stage2_run"] == str(stage2.path)  # the stage 2 run of this very mask
    # A leaking file mask is refused for training, before any run folder.
    assert main(["stage3", "--mask", f"{FILE}:next_token", "--model", model, "--data", "tests/data/sft.jsonl",
                 "--device", "cpu", "--runs-dir", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


def test_ablate_masks_shows_what_a_file_mask_is(capsys):
    from ablate.cli import main

    assert main(["masks", f"{FILE}:response_skips_first"]) == 0
    out = capsys.readouterr().out
    assert "response_skips_first@" in out and "causal after the prompt (can generate)       no" in out
    assert main(["masks", f"{FILE}:batch_mates"]) == 2
    assert main(["masks", "prefill_bidir"]) == 2  # not FILE.py:NAME
    assert main(["masks"]) == 0 and "segment_bidir" in capsys.readouterr().out


def test_a_config_file_names_a_file_mask(tmp_path):
    from ablate.stages.config import load_eval_config

    (tmp_path / "study.yaml").write_text(f"model: m\ntasks: [ablate_tiny]\nmask: {FILE}:prompt_window\n")
    config = load_eval_config("stage2_ablation_eval", {"config_file": str(tmp_path / "study.yaml")})
    assert config.mask == user("prompt_window") and config.mask_file["name"] == "prompt_window"


def test_a_run_re_read_from_its_config_loads_its_mask_file_again_and_refuses_an_edit(tiny_llama, tmp_path):
    from ablate.cli import main
    from ablate.stages.stage3_resume import _saved_config

    path = tmp_path / "masks.py"
    shutil.copy(FILE, path)
    runs = tmp_path / "runs"
    assert main(["stage3", "--mask", f"{path}:prompt_window", "--model", str(tiny_llama), "--data",
                 "tests/data/sft.jsonl", "--max-steps", "1", "--save-steps", "1", "--device", "cpu", "--max-length",
                 "64", "--runs-dir", str(runs)]) == 0
    (run_dir,) = (runs / f"stage3_finetune_{resolve(f'{path}:prompt_window', None)[0]}").iterdir()
    config = _saved_config(run_dir)  # what --resume reads
    assert config.mask.startswith("prompt_window@") and config.mask_file["path"] == str(path.resolve())
    original = path.read_bytes()
    path.write_bytes(original.replace(b"<= 2", b"<= 3"))  # the mask's definition edited after the run began
    with pytest.raises(BadInput, match="changed since this run was configured"):
        _saved_config(run_dir)
    path.write_bytes(original)
    assert _saved_config(run_dir).mask == config.mask


def test_a_file_masks_leakage_is_recorded_with_its_file_and_a_reader_holds_the_run_to_it(tiny_models, tmp_path):
    """Readers cannot probe (no torch): the verdict travels in config.json's mask_file, digested with the run; a
    run whose leaky flag disagrees with it is damaged, for a leaking and for a clean file mask."""
    from ablate.cli import main
    from ablate.results import rundir
    from ablate.results.verified import verified_run

    runs, model = tmp_path / "runs", str(tiny_models("llama", num_hidden_layers=LAYERS))
    common = ["--model", model, "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0
    assert main(["stage2", "--mask", f"{FILE}:next_token", *common]) == 2  # leaks: refused without the flag
    assert main(["stage2", "--mask", f"{FILE}:next_token", "--allow-label-leakage", *common]) == 0
    assert main(["stage2", "--mask", f"{FILE}:prompt_window", *common]) == 0
    for run in rundir.find_runs(runs, "stage2_ablation_eval"):
        name = run.metrics["mask"].split("@")[0]
        verdict = json.loads((run.path / "config.json").read_text())["mask_file"]["verdict"]
        assert verdict == {"leaks_labels": name == "next_token", "shares_context": name != "next_token",
                           "causal_continuation": name != "next_token", "needs_segments": False}
        assert run.metrics["leaky"] is (name == "next_token") and verified_run(run, runs).error is None
        metrics = json.loads((run.path / "metrics.json").read_text())
        metrics["leaky"] = not metrics["leaky"]  # the flag edited: the reader refuses the run
        (run.path / "metrics.json").write_text(json.dumps(metrics))
        assert "leaky" in verified_run(rundir.load_run(run.path), runs).error


def test_a_file_mask_probed_otherwise_than_recorded_is_refused():
    label, source = resolve(f"{FILE}:prompt_window", None)
    assert source["verdict"]["shares_context"] is True
    with pytest.raises(BadInput, match="probes now say"):
        resolve(label, {**source, "verdict": {**source["verdict"], "shares_context": False}})
