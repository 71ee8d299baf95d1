"""Per-layer masks against brute force: python -m pytest tests/test_layer_masks.py -q

The reference is written here, independent of ablate.core.layer_masks and ablate.core.masks: one request at a
time, no padding, the eager attention path, and in each layer an explicit additive 4D mask from the mask's
definition (ablate.core.mask_check.reference_mask: the run's mask in the chosen layers, causal elsewhere, the
layer's own sliding window) put in by this file's own hooks. Against it: evaluation's loglikelihoods (the
prefix-shared path and one row per request), greedy generation, and a training forward's per-row losses and
gradients (padded, and packed with attention per row) on tiny float32 models of every supported architecture,
sdpa and eager; the runtime mask check passes on per-layer masks and fails a run path that ignores them.
"""

import json
import random
from contextlib import contextmanager

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core import layer_masks
from ablate.core.layer_masks import describe, forward_masks, parse_layers
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.mask_check import MaskCheckFailed, check_mask, masks_forward, reference_mask
from ablate.core.masks import model_attention_mask, packed_rows_mask
from ablate.core.models import load_model
from ablate.core.row_attention import row_spans, rows_attention
from ablate.core.sft_data import Collator
from ablate.core.sft_packing import PackingCollator, unpack
from ablate.errors import BadInput

from test_sft_packing import ARCHS, SLIDING  # every tiny architecture, sliding windows biting
from test_sft_packing import rows as training_rows

LAYERS = 3  # tiny models with three layers: specs can choose one, two or all of them


@pytest.mark.parametrize("spec,layers", [
    ("0", (0,)), ("0-7", tuple(range(8))), ("0,2,4", (0, 2, 4)), ("last:4", (26, 27, 28, 29)),
    ("first:2", (0, 1)), ("all", tuple(range(30))), ("0-3,last:2", (0, 1, 2, 3, 28, 29)), (" 5 , 3 ", (3, 5)),
    ("2,2,1-2", (1, 2)), ("29", (29,)),
])
def test_a_layer_spec_resolves_against_the_model(spec, layers):
    assert parse_layers(spec, 30) == layers


@pytest.mark.parametrize("spec,message", [
    ("", "is empty"), ("  ", "is empty"), ("30", "names layer 30, but the model has 30 layers"),
    ("28-31", "names layer 30"), ("7-3", "runs backwards; write 3-7"), ("last:0", "K must be 1 to 30"),
    ("first:31", "K must be 1 to 30"), ("-1", "is not N, A-B"), ("a-b", "is not N, A-B"), ("0,,1", "is not N"),
    ("last4", "is not N"), ("1.5", "is not N"), ("middle:2", "is not N"),
])
def test_a_bad_layer_spec_is_one_line(spec, message):
    with pytest.raises(BadInput, match=message):
        parse_layers(spec, 30)


def test_describe_is_the_canonical_spelling_of_the_resolved_layers():
    rng = random.Random(0)
    for _ in range(200):
        layers = tuple(sorted(rng.sample(range(30), rng.randint(1, 30))))
        assert parse_layers(describe(layers), 30) == layers
    assert describe((0, 1, 2, 3, 8, 28, 29)) == "0-3,8,28-29"


# --- the reference -------------------------------------------------------------------------------------------

def kinds_of(model):
    text = model.config.get_text_config()
    kinds = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if kinds:
        return list(kinds), window
    return ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers, window


@contextmanager
def explicit_masks(model, per_layer: list[torch.Tensor]):
    """This file's own hooks: layer i attends with per_layer[i] (additive, eager)."""
    modules = {m.layer_idx: m for n, m in model.named_modules() if n.endswith("self_attn")}

    def hook_for(i):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = per_layer[i]
            return args, kwargs
        return hook

    handles = [modules[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in range(len(per_layer))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def brute_force_logits(model, tokens: list[int], prefix: int, mask_name: str, layers: tuple[int, ...]):
    """One request alone on eager: the mask's definition in ``layers``, causal elsewhere."""
    kinds, window = kinds_of(model)
    n = len(tokens)
    return explicit_logits(model, tokens, [
        reference_mask(mask_name if i in layers else "causal", [n], [prefix], n, torch.float32,
                       window=window if kind == "sliding_attention" else None)[0, 0] == 0
        for i, kind in enumerate(kinds)])


def explicit_logits(model, tokens: list[int], allowed: list[torch.Tensor]):
    """One row alone on eager, layer i attending exactly where ``allowed[i]`` (``[n, n]``, True = may attend)."""
    n = len(tokens)
    per_layer = [torch.where(a, 0.0, torch.finfo(torch.float32).min)[None, None] for a in allowed]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        holder = layer_masks.installed(model)
        with explicit_masks(model, per_layer), (holder.stock() if holder else _nothing()):
            return model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(n)[None]).logits[0]
    finally:
        base.set_attn_implementation(before)


@contextmanager
def _nothing():
    yield


@pytest.fixture(scope="module")
def three_layer(tiny_models):
    def get(arch, **overrides):
        return tiny_models(arch, num_hidden_layers=LAYERS, **overrides)
    return get


def test_tiny_models_here_have_three_layers(three_layer):
    model, _ = load_model(str(three_layer("llama")), "cpu", "float32")
    assert layer_masks.num_layers(model.config) == LAYERS


# --- evaluation ---------------------------------------------------------------------------------------------

PAIRS = [("Question: To dry wet shoes,\nAnswer:", " stuff them with newspaper overnight."),
         ("Question: To dry wet shoes,\nAnswer:", " fill them with water."),  # shares its context: prefix sharing
         ("Mia has a red ball. What color is the ball of Mia?\nAnswer:", " red"),
         ("A", " very long continuation that is longer than its context")]


def brute_force_loglikelihood(model, lm, context, continuation, mask_name, layers):
    ctx, cont = lm._encode_pair(context, continuation)
    tokens = (ctx + cont)[:-1]
    logprobs = torch.log_softmax(brute_force_logits(model, tokens, len(ctx), mask_name, layers).float(), -1)
    rows = logprobs[len(tokens) - len(cont):]
    return float(rows.gather(1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mask,spec", [("prefill_bidir", "0"), ("prefill_bidir", "1-2"), ("full_bidir", "last:1")])
def test_evaluation_under_per_layer_masks_is_the_brute_force(three_layer, arch, overrides, impl, mask, spec):
    path = three_layer(arch, **overrides)
    model, tokenizer = load_model(str(path), "cpu", "float32", impl)
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, mask_layers=spec, batch_size=3,
                       device="cpu")
    layers = parse_layers(spec, LAYERS)
    assert lm.mask_layers == layers
    requests = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    expected = [brute_force_loglikelihood(model, lm, c, x, mask, layers) for c, x in PAIRS]
    assert got == pytest.approx(expected, abs=1e-4)
    everywhere = [brute_force_loglikelihood(model, lm, c, x, mask, tuple(range(LAYERS))) for c, x in PAIRS]
    assert got != pytest.approx(everywhere, abs=1e-4)  # the causal layers are causal: not the mask everywhere
    assert lm.mask_check["passed"] and lm.mask_check["layers"] == {"layers": describe(layers), "num_layers": LAYERS}


def test_the_causal_mask_takes_no_layer_spec(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    with pytest.raises(BadInput, match="causal in every layer"):
        PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", mask_layers="0", device="cpu")


def test_a_forward_outside_the_per_layer_context_is_refused(three_layer):
    model, _ = load_model(str(three_layer("llama")), "cpu", "float32")
    layer_masks.install(model, "0")
    with pytest.raises(RuntimeError, match="ran without them"):
        model(input_ids=torch.tensor([[1, 5, 7]]))
    with layer_masks.installed(model).stock():
        model(input_ids=torch.tensor([[1, 5, 7]]))


# --- generation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,overrides", [ARCHS[0], ARCHS[3]], ids=["llama", "qwen2-sliding"])
def test_generation_under_per_layer_masks_is_the_brute_force(three_layer, arch, overrides):
    from ablate.core.generation import masked_greedy

    model, _ = load_model(str(three_layer(arch, **overrides)), "cpu", "float32", "sdpa")
    layers = layer_masks.install(model, "1")
    prompts = [[1, 17, 33, 9, 41, 5, 88], [1, 60, 4, 19]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded, as lm-eval batches
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = masked_greedy(model, "prefill_bidir", ids, real, 5, None, pad_token_id=0, eos_token_ids=[-1])
    for row, prompt in enumerate(prompts):
        tokens = list(prompt)
        for _ in range(5):  # every step recomputed from scratch: the prompt bidirectional in layer 1 only
            with torch.no_grad():
                tokens.append(int(brute_force_logits(model, tokens, len(prompt), "prefill_bidir", layers)[-1]
                                  .argmax()))
        assert out[row, width:].tolist() == tokens[len(prompt):]


# --- training -----------------------------------------------------------------------------------------------

def run_loss(model, batch_rows, layout, mask):
    """The loss as MaskedTrainer computes it (its masks, per-layer context and, packed, attention per row)."""
    batch = Collator(0)(batch_rows) if layout == "padded" else PackingCollator(0, None)(batch_rows)
    real, prefix, segments = batch["attention_mask"].bool(), batch["prefix_len"], batch.get("segments")
    prompt_segments = batch.get("prompt_segments")
    n = (batch["labels"][:, 1:] != -100).sum()
    kw = dict(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=n)
    if segments is None:
        kw["attention_mask"] = model_attention_mask(model.config, mask, real, prefix, torch.float32,
                                                    prompt_segments=prompt_segments)
        attend = _nothing()
    else:
        kw["attention_mask"] = packed_rows_mask(model.config, mask, real, prefix, segments, batch["position_ids"],
                                                torch.float32, prompt_segments)
        kw.update(position_ids=batch["position_ids"], row_spans=row_spans(segments))
        attend = rows_attention(model)
    with attend, forward_masks(model, mask, real, prefix, torch.float32, segments, batch.get("position_ids"),
                               rows=segments is not None, prompt_segments=prompt_segments):
        out = model(**kw)
    logits = out.logits if segments is None else unpack(out.logits, batch)
    return out.loss, logits


def assert_training_step_is_the_brute_force(model, rows, layout, mask, reference):
    """A training forward's per-row losses, loss and every gradient (``run_loss``) against ``reference(row)``, each
    row's logits alone, within 1e-4 (the loss 1e-5)."""
    loss, logits = run_loss(model, rows, layout, mask)
    model.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    # Brute force: each row alone, its summed response loss; the total over the supervised count.
    model.zero_grad()
    n = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    total = 0
    for i, r in enumerate(rows):
        ref = reference(r)
        labels = torch.tensor(r["labels"])
        targets = torch.nonzero(labels[1:] != -100).flatten()
        row_loss = -torch.log_softmax(ref.float(), -1)[targets, labels[targets + 1]].sum()
        own = -torch.log_softmax(logits[i].float(), -1)[targets, labels[targets + 1]].sum()
        torch.testing.assert_close(own, row_loss.detach(), rtol=0, atol=1e-4)
        total = total + row_loss
    (total / n).backward()
    torch.testing.assert_close(loss, (total / n).detach(), rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl,layout", [("sdpa", "padded"), ("sdpa", "packed"), ("eager", "padded"),
                                         ("eager", "packed")])
def test_a_training_forward_under_per_layer_masks_is_the_brute_force(three_layer, arch, overrides, impl, layout):
    model, _ = load_model(str(three_layer(arch, **overrides)), "cpu", "float32", impl)
    model.train()
    layers = layer_masks.install(model, "0,2")
    assert_training_step_is_the_brute_force(
        model, training_rows(), layout, "prefill_bidir",
        lambda r: brute_force_logits(model, r["input_ids"], r["prefix_len"], "prefill_bidir", layers))


# --- the runtime mask check ---------------------------------------------------------------------------------

def test_the_mask_check_compares_per_layer_masks_and_fails_a_path_that_ignores_them(three_layer):
    model, _ = load_model(str(three_layer("qwen2", **SLIDING)), "cpu", "float32", "sdpa")
    layer_masks.install(model, "1")
    rows = [([1, 17, 33, 9, 41, 5, 88, 3, 12], 6), ([1, 60, 4, 19, 7, 7], 3)]
    record = check_mask(model, "prefill_bidir", rows)
    assert record["passed"] and record["layers"] == {"layers": "1", "num_layers": LAYERS}

    def everywhere(check_rows, mask_name):  # a run path that hands the mask to every layer
        ids = torch.tensor([t + [0] * (9 - len(t)) for t, _ in check_rows])
        real = torch.tensor([[1] * len(t) + [0] * (9 - len(t)) for t, _ in check_rows]).bool()
        prefix = torch.tensor([p for _, p in check_rows])
        mask = model_attention_mask(model.config, mask_name, real, prefix, torch.float32)
        with torch.no_grad(), layer_masks.installed(model).stock():
            return model(input_ids=ids, attention_mask=mask).logits

    with pytest.raises(MaskCheckFailed, match="differ from the eager reference"):
        check_mask(model, "prefill_bidir", rows, everywhere)
    assert masks_forward(model)(rows, "prefill_bidir").shape[0] == 2  # the default run path takes the layers


# --- the stages ---------------------------------------------------------------------------------------------

def read_samples(run):
    return [json.loads(line) for line in (run.path / "samples_ablate_tiny.jsonl").read_text().splitlines()]


def _main(args):
    from ablate.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def layered_runs(three_layer, tmp_path_factory):
    """Stage 1, then stage 2 under prefill_bidir in every layer and in layer 1 only, stage 3 in layers 1-2 and
    stage 4 under layer 1 only, on a three-layer tiny llama."""
    from ablate.results import rundir

    runs = tmp_path_factory.mktemp("layered")
    model = three_layer("llama")
    common = ["--model", model, "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "6", "--runs-dir", runs]
    assert _main(["stage1", *common]) == 0
    assert _main(["stage2", "--mask", "prefill_bidir", *common]) == 0
    assert _main(["stage2", "--mask", "prefill_bidir", "--mask-layers", "first:1", *common]) == 0
    assert _main(["stage2", "--mask", "prefill_bidir", "--mask-layers", "last:1", *common]) == 0
    assert _main(["stage2", "--mask", "prefill_bidir", "--mask-layers", "1", *common]) == 0
    assert _main(["stage3", "--mask", "prefill_bidir", "--mask-layers", "1-2", "--model", model, "--data",
                  "tests/data/sft.jsonl", "--max-steps", "2", "--save-steps", "2", "--device", "cpu",
                  "--max-length", "64", "--runs-dir", runs]) == 0
    assert _main(["stage4", "--mask", "prefill_bidir", "--mask-layers", "1", "--device", "cpu",
                  "--runs-dir", runs]) == 0
    return runs, {stage: [rundir.load_run(p) for p in sorted((runs / stage).iterdir()) if p.is_dir()]
                  for stage in ("stage1_baseline_eval", "stage2_ablation_eval", "stage3_finetune_prefill_bidir",
                                "stage4_post_ft_eval")}


def test_stage2_records_the_resolved_layers_and_checks_them(layered_runs):
    from ablate.results.verified import verified_metrics

    runs, found = layered_runs
    every, first, last, one = (r.metrics for r in found["stage2_ablation_eval"])
    assert every["mask_layers"] is None
    assert [m["mask_layers"] for m in (first, last, one)] == [{"layers": x, "num_layers": LAYERS}  # resolved
                                                              for x in ("0", "2", "1")]
    assert one["mask_check"]["passed"] and one["mask_check"]["layers"] == one["mask_layers"]
    assert "layers" not in every["mask_check"]
    logprobs = {name: [x for r in read_samples(run) for x in r["logprobs"]]
                for name, run in zip(("every", "first", "last", "one"), found["stage2_ablation_eval"])}
    logprobs["causal"] = [x for r in read_samples(found["stage1_baseline_eval"][0]) for x in r["logprobs"]]
    assert len({json.dumps(logprobs[k]) for k in ("every", "first", "one", "causal")}) == 4  # four answers
    # Exact property: in the last layer only the prompt positions' outputs change, and nothing is scored from
    # them but the last prompt position's, which sees the whole prompt causally too: the causal scores.
    assert logprobs["last"] == pytest.approx(logprobs["causal"], abs=1e-5)
    assert logprobs["first"] != pytest.approx(logprobs["causal"], abs=1e-4)
    for run in found["stage2_ablation_eval"]:
        verified_metrics(run, runs)
    run = found["stage2_ablation_eval"][3]
    edited = json.loads((run.path / "metrics.json").read_text())
    edited["mask_layers"]["num_layers"] = 30
    (run.path / "metrics.json").write_text(json.dumps(edited))
    try:
        from ablate.results import rundir

        with pytest.raises(BadInput, match="mask_layers"):
            verified_metrics(rundir.load_run(run.path), runs)
    finally:
        (run.path / "metrics.json").write_text(json.dumps(run.metrics))


def test_stage3_trains_under_the_layers_and_stage4_reads_its_own_stage2(layered_runs):
    _, found = layered_runs
    (s3,) = found["stage3_finetune_prefill_bidir"]
    assert s3.summary["status"] == "completed"
    assert s3.summary["mask_layers"] == {"layers": "1-2", "num_layers": LAYERS}
    assert s3.summary["mask_check"]["passed"] and s3.summary["mask_check"]["layers"] == s3.summary["mask_layers"]
    (s4,) = found["stage4_post_ft_eval"]
    assert s4.metrics["mask_layers"] == {"layers": "1", "num_layers": LAYERS}
    assert s4.metrics["stage2_run"] == str(found["stage2_ablation_eval"][3].path)  # layer 1's, not another's


@pytest.mark.parametrize("flags,message", [
    (["--mask", "prefill_bidir", "--mask-layers", "3"], "names layer 3, but the model has 3 layers"),
    (["--mask", "prefill_bidir", "--mask-layers", "last:9"], "K must be 1 to 3"),
    (["--mask", "prefill_bidir", "--mask-layers", "2-1"], "runs backwards"),
    (["--mask", "causal", "--mask-layers", "0"], "causal in every layer"),
])
def test_a_bad_layer_spec_is_one_line_exit_2_and_writes_no_run(three_layer, tmp_path, capsys, flags, message):
    code = _main(["stage2", "--model", three_layer("llama"), "--tasks", "ablate_tiny", "--device", "cpu",
                  "--limit", "2", "--runs-dir", tmp_path, *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ablate: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not list(tmp_path.glob("stage2_ablation_eval/*"))


def test_gradient_checkpointing_recomputes_under_the_same_layers_and_rows(three_layer, tmp_path):
    """Stage 3 holds its attention contexts (per-layer masks, attention per row) through the backward pass, where
    gradient checkpointing runs each layer's forward again: the weights are those of the run without it."""
    from safetensors.torch import load_file
    from test_finetune import config
    from ablate.core import row_attention
    from ablate.stages.stage3_finetune import run_stage3

    model = three_layer("llama")
    calls = {}
    runs = {}
    for checkpointing in (False, True):
        before = row_attention.CALLS["rows"]
        runs[checkpointing] = run_stage3(config(model, tmp_path / str(checkpointing), mask_layers="0,2",
                                                gradient_checkpointing=checkpointing, max_steps=3, save_steps=10,
                                                max_length=128))
        calls[checkpointing] = row_attention.CALLS["rows"] - before
    assert calls[True] > calls[False] > 0  # the recompute attended per row too (stock sdpa would not count)
    a, b = (load_file(str(runs[c] / "final" / "model.safetensors")) for c in (False, True))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("spec", ["0", "0-999999999999", "last:4", "first:1", "all", "3,1-2"])
def test_a_spec_s_form_is_checked_before_the_model_is_known(spec):
    assert parse_layers(spec, None) == ()  # nothing resolved, nothing expanded (a huge range costs nothing)


@pytest.mark.parametrize("spec,message", [("", "is empty"), ("7-3", "runs backwards"), ("last:0", "K must be at least 1"),
                                          ("x", "is not N, A-B")])
def test_a_bad_spec_s_form_is_refused_before_the_model_is_known(spec, message):
    with pytest.raises(BadInput, match=message):
        parse_layers(spec, None)


def test_stage4_names_the_layers_a_model_was_trained_under_and_verifies_them(layered_runs, tmp_path):
    import shutil

    from ablate.results import rundir
    from ablate.results.finetuned import stage3_record, trained_with
    from ablate.results.verified import verified_metrics

    runs, found = layered_runs
    (s4,) = found["stage4_post_ft_eval"]
    (entry,) = s4.metrics["checkpoints"]
    assert entry["train_mask_layers"] == {"layers": "1-2", "num_layers": LAYERS}
    assert trained_with(entry) == "prefill_bidir in layers 1-2 of 3"
    original = (s4.path / "metrics.json").read_text()
    edited = json.loads(original)
    edited["checkpoints"][0]["train_mask_layers"] = None  # would read as a finetune under every layer
    (s4.path / "metrics.json").write_text(json.dumps(edited))
    try:
        with pytest.raises(BadInput, match="train_mask_layers"):
            verified_metrics(rundir.load_run(s4.path), runs)
    finally:
        (s4.path / "metrics.json").write_text(original)
    # A layered stage 3 run without summary.json (killed) records no resolved layers: refused, not guessed.
    (s3,) = found["stage3_finetune_prefill_bidir"]
    copy = tmp_path / s3.path.parent.name / s3.path.name
    shutil.copytree(s3.path, copy)
    (copy / "summary.json").unlink()
    with pytest.raises(BadInput, match="has no summary.json, which records the layers"):
        stage3_record(rundir.load_run(copy))


def test_the_head_to_head_never_pairs_finetunes_under_other_layers_as_one_mask():
    from ablate.results.recovery import head_to_head

    def entry(label, mask, layers=None):
        return {"label": label, "train_mask": mask,
                "train_mask_layers": layers and {"layers": layers, "num_layers": 30}}

    correct = {name: {"t": {0: True, 1: False, 2: True}} for name in ("c", "full", "early")}
    causal, full, early = entry("c", "causal"), entry("full", "prefill_bidir"), entry("early", "prefill_bidir", "0-9")
    assert head_to_head([causal, early], correct)["after"] == "early"
    assert head_to_head([causal, full], correct)["after"] == "full"
    assert head_to_head([causal, full, early], correct) is None  # two trainings under the mask: no single pair
