"""segment_bidir against brute force: python -m pytest tests/test_segment_masks.py -q

The reference is this file's own: one request at a time, no padding, eager attention, and in each layer an
explicit additive mask written here from the definition (a prompt token attends to every prompt token of its
own segment and causally to the rest; later tokens causally; the layer's sliding window), put in by
test_layer_masks' hooks. Against it: evaluation's loglikelihoods (prefix-shared and one row per request),
greedy generation, a training step's per-row losses and gradients (padded and packed), on tiny float32 models of
every supported architecture, sdpa and eager, the mask in every layer and in some layers only.
"""

import json
import random

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core import layer_masks
from ablate.core.layer_masks import parse_layers
from ablate.core.leakage import find_leak
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.mask_check import check_mask, check_rows
from ablate.core.masks import dense_mask, dense_packed_mask, get_mask, model_attention_mask
from ablate.core.models import load_model
from ablate.core.segments import separator_ends, text_segments, token_segments
from ablate.core.sft_data import Collator
from ablate.core.sft_packing import PackingCollator
from ablate.errors import BadInput

from test_layer_masks import LAYERS, assert_training_step_is_the_brute_force, explicit_logits, kinds_of
from test_sft_packing import ARCHS


def definition(n: int, prefix: int, segments: list[int], window: int | None) -> torch.Tensor:
    """``[n, n]`` True = may attend: segment_bidir's definition, for one row alone."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            causal = k <= q and (window is None or q - k < window)
            inside = q < prefix and k < prefix and segments[q] == segments[k]
            allowed[q, k] = causal or inside
    return allowed


def brute_force_logits(model, tokens, prefix, segments, layers):
    """One row alone on eager: segment_bidir in ``layers`` (None: every layer), causal elsewhere."""
    kinds, window = kinds_of(model)
    n = len(tokens)
    return explicit_logits(model, tokens, [
        definition(n, prefix if layers is None or i in layers else 0, segments,
                   window if kind == "sliding_attention" else None) for i, kind in enumerate(kinds)])


# --- segments from text ----------------------------------------------------------------------------------

def test_segments_are_cut_after_each_separator(tiny_llama):
    _, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    text = "Q: one\nA: 1\n\nQ: two\nA: 2\n\nQ: three\nA:"
    ids, segments = text_segments(tokenizer, text, separator_ends(text, "\n\n"))
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert segments == sorted(segments) and set(segments) == {0, 1, 2}
    # Each segment's tokens decode to its text, the separator ending it.
    pieces = [tokenizer.decode([t for t, s in zip(ids, segments) if s == k]) for k in range(3)]
    assert "".join(pieces) == text and pieces[0].endswith("\n\n") and pieces[2] == "Q: three\nA:"
    assert token_segments(tokenizer, ids, "\n\n") == segments  # from the tokens alone, the same
    assert token_segments(tokenizer, ids, "@@") == [0] * len(ids)  # no separator: one segment
    assert separator_ends("a--b----c", "--") == [3, 6, 8]  # non-overlapping


def test_tokens_that_do_not_come_back_from_their_text_are_refused(tiny_llama):
    _, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    word = "newspaper"
    letters = [tokenizer.convert_tokens_to_ids(c) for c in word]  # a spelling the tokenizer itself never makes
    assert tokenizer(word, add_special_tokens=False)["input_ids"] != letters
    with pytest.raises(BadInput, match="does not tokenize back"):
        token_segments(tokenizer, letters, "\n\n")


def test_segment_bidir_without_segments_is_refused():
    with pytest.raises(BadInput, match="needs the prompt's segments"):
        dense_mask("segment_bidir", torch.tensor([3]), torch.ones(1, 5, dtype=torch.bool))


# --- the mask's definition -----------------------------------------------------------------------------

def random_layouts(seed, count=40):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(2, 12)
        prefix = rng.randint(0, n)
        cuts = sorted(rng.sample(range(1, prefix), rng.randint(0, max(0, prefix - 1)))) if prefix > 1 else []
        segments = [sum(1 for c in cuts if c <= t) for t in range(prefix)] + [-1] * (n - prefix)
        yield n, prefix, segments


def test_the_built_mask_is_the_definition_on_random_layouts():
    for n, prefix, segments in random_layouts(0):
        built = dense_mask("segment_bidir", torch.tensor([prefix]), torch.ones(1, n, dtype=torch.bool),
                           torch.tensor([segments]))[0]
        assert torch.equal(built, definition(n, prefix, segments, None)), (n, prefix, segments)
        one = [0] * prefix + [-1] * (n - prefix)  # one segment: prefill_bidir exactly
        assert torch.equal(dense_mask("segment_bidir", torch.tensor([prefix]), torch.ones(1, n, dtype=torch.bool),
                                      torch.tensor([one])), dense_mask("prefill_bidir", torch.tensor([prefix]),
                                                                       torch.ones(1, n, dtype=torch.bool)))


def test_packed_rows_keep_their_own_segments():
    layouts = list(random_layouts(1, count=6))
    batch = PackingCollator(0, None)([{"input_ids": list(range(1, n + 1)), "labels": [-100] * prefix + [5] * (n - prefix),
                                       "prefix_len": prefix, "prompt_segments": segments[:prefix]}
                                      for n, prefix, segments in layouts])
    packed = dense_packed_mask("segment_bidir", batch)[0]
    at = 0
    for n, prefix, segments in layouts:
        expected = torch.zeros_like(packed)
        expected[at:at + n, at:at + n] = definition(n, prefix, segments, None)
        assert torch.equal(packed[at:at + n], expected[at:at + n]), (n, prefix, segments)
        at += n


def test_segment_bidir_never_leaks_labels_and_shares_contexts():
    spec = get_mask("segment_bidir")
    assert not spec.leaks_labels and spec.shares_context and spec.needs_segments
    rows = [{"input_ids": list(range(1, n + 1)), "labels": [-100] * prefix + list(range(prefix + 1, n + 1)),
             "prefix_len": prefix, "prompt_segments": tuple(segments[:prefix])}
            for n, prefix, segments in random_layouts(2, count=10)]
    assert find_leak("segment_bidir", Collator(0)(rows)) is None
    assert find_leak("segment_bidir", PackingCollator(0, None)(rows)) is None


# --- evaluation -----------------------------------------------------------------------------------------

SHOTS = "Q: To dry wet shoes?\nA: newspaper\n\nQ: Color of grass?\nA: green\n\n"
PAIRS = [(SHOTS + "Q: Mia has a red ball. Its color?\nA:", " red"),
         (SHOTS + "Q: Mia has a red ball. Its color?\nA:", " blue"),  # a shared context
         ("Q: one segment only\nA:", " yes"),
         ("Q: x\n\nQ: y\nA:", " a continuation longer than its context")]


def loglikelihood(model, lm, context, continuation, layers):
    ctx, cont = lm._encode_pair(context, continuation)
    tokens = (ctx + cont)[:-1]
    segments = token_segments(lm.tokenizer, ctx, "\n\n") + [-1] * (len(tokens) - len(ctx))
    logits = brute_force_logits(model, tokens, len(ctx), segments, layers)
    rows = torch.log_softmax(logits.float(), -1)[len(tokens) - len(cont):]
    return float(rows.gather(1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", [None, "0", "1-2"])
def test_evaluation_under_segment_bidir_is_the_brute_force(tiny_models, arch, overrides, impl, spec):
    model, tokenizer = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32",
                                  impl)
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="segment_bidir", mask_layers=spec,
                       segment_separator="\n\n", batch_size=3, device="cpu")
    layers = None if spec is None else parse_layers(spec, LAYERS)
    requests = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    with torch.no_grad():
        expected = [loglikelihood(model, lm, c, x, layers) for c, x in PAIRS]
    assert got == pytest.approx(expected, abs=1e-4)
    assert lm.mask_check["passed"]
    assert lm.segments.record()["prompts"] == 3 and lm.segments.record()["separator"] == "\n\n"


def test_segments_change_the_scores_where_a_prompt_has_several(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    requests = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]
    segment = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="segment_bidir", segment_separator="\n\n",
                            batch_size=4, device="cpu").loglikelihood(requests)
    prefill = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=4,
                            device="cpu").loglikelihood(requests)
    assert segment[2][0] == pytest.approx(prefill[2][0], abs=1e-5)  # one segment: prefill_bidir
    for i in (0, 1, 3):  # several segments: not prefill_bidir
        assert segment[i][0] != pytest.approx(prefill[i][0], abs=1e-4)


def test_the_eval_model_refuses_segment_bidir_without_a_separator(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    with pytest.raises(BadInput, match="needs the prompt's segments"):
        PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="segment_bidir", device="cpu")


def test_the_mask_check_keeps_a_segment_boundary_and_fails_a_path_that_ignores_segments(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    prompt = tokenizer(SHOTS + "Q: a long last question that goes on and on for many tokens?\nA:",
                       add_special_tokens=False)["input_ids"]
    segments = token_segments(tokenizer, prompt, "\n\n")
    rows = check_rows([(prompt, [5, 6, 7])], segments=[segments])
    assert len(set(rows[0][2])) == 2  # the kept end reaches back over the last boundary
    assert check_mask(model, "segment_bidir", rows)["passed"]

    def one_segment(check, mask_name):  # a run path that reads the whole prompt as one segment
        ids = torch.tensor([row[0] for row in check])
        real = torch.ones_like(ids, dtype=torch.bool)
        prefix = torch.tensor([row[1] for row in check])
        mask = model_attention_mask(model.config, "prefill_bidir" if mask_name != "causal" else "causal", real,
                                    prefix, torch.float32)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    from ablate.core.mask_check import MaskCheckFailed

    with pytest.raises(MaskCheckFailed, match="differ from the eager reference"):
        check_mask(model, "segment_bidir", rows, one_segment)


# --- generation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,overrides", [ARCHS[0], ARCHS[3]], ids=["llama", "qwen2-sliding"])
@pytest.mark.parametrize("spec", [None, "1"])
def test_generation_under_segment_bidir_is_the_brute_force(tiny_models, arch, overrides, spec):
    from ablate.core.generation import masked_greedy

    model, _ = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32", "sdpa")
    layers = layer_masks.install(model, spec)
    prompts = [([1, 17, 33, 9, 41, 5, 88], [0, 0, 0, 1, 1, 2, 2]), ([1, 60, 4, 19], [0, 1, 1, 1])]
    width = max(len(p) for p, _ in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in prompts])  # left-padded, as lm-eval batches
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts])
    segs = torch.tensor([[-1] * (width - len(s)) + s for _, s in prompts])
    out = masked_greedy(model, "segment_bidir", ids, real, 5, None, pad_token_id=0, eos_token_ids=[-1],
                        prompt_segments=segs)
    for row, (prompt, segments) in enumerate(prompts):
        tokens = list(prompt)
        for _ in range(5):
            with torch.no_grad():
                logits = brute_force_logits(model, tokens, len(prompt),
                                            segments + [-1] * (len(tokens) - len(prompt)), layers)
            tokens.append(int(logits[-1].argmax()))
        assert out[row, width:].tolist() == tokens[len(prompt):]


# --- training -------------------------------------------------------------------------------------------

def training_rows(seed=0):
    rng = random.Random(seed)
    out = []
    for (length, prefix), cuts in zip([(17, 9), (9, 0), (12, 11), (6, 3)], [[3, 6], [], [1, 5, 10], [2]]):
        ids = [1] + [rng.randrange(3, 500) for _ in range(length - 1)]
        segments = tuple(sum(1 for c in cuts if c <= t) for t in range(prefix))
        out.append({"input_ids": ids, "labels": [-100] * prefix + ids[prefix:], "prefix_len": prefix,
                    "prompt_segments": segments})
    return out


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("impl,layout", [("sdpa", "padded"), ("sdpa", "packed"), ("eager", "padded"),
                                         ("eager", "packed")])
@pytest.mark.parametrize("spec", [None, "0,2"])
def test_a_training_step_under_segment_bidir_is_the_brute_force(tiny_models, arch, overrides, impl, layout, spec):
    model, _ = load_model(str(tiny_models(arch, num_hidden_layers=LAYERS, **overrides)), "cpu", "float32", impl)
    model.train()
    layers = layer_masks.install(model, spec)

    def reference(r):
        own_segments = list(r["prompt_segments"]) + [-1] * (len(r["input_ids"]) - r["prefix_len"])
        return brute_force_logits(model, r["input_ids"], r["prefix_len"], own_segments, layers)

    assert_training_step_is_the_brute_force(model, training_rows(), layout, "segment_bidir", reference)


# --- configuration --------------------------------------------------------------------------------------

def test_stage3_config_asks_for_a_separator_exactly_when_the_mask_reads_one():
    from ablate.stages.config import FinetuneConfig

    with pytest.raises(BadInput, match="pass --segment-separator"):
        FinetuneConfig(model="m", data="d.jsonl", mask="segment_bidir")
    with pytest.raises(BadInput, match="read by masks that read segments only"):
        FinetuneConfig(model="m", data="d.jsonl", mask="prefill_bidir", segment_separator="\n\n")
    assert FinetuneConfig(model="m", data="d.jsonl", mask="segment_bidir", segment_separator="\n\n")


# --- the stages -----------------------------------------------------------------------------------------

FEWSHOT_TASK = """task: seg_tiny
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def segment_runs(tiny_models, tmp_path_factory):
    """A few-shot task (two examples from its own train split, lm-eval's "\\n\\n" delimiter): stage 1, stage 2 under
    segment_bidir and prefill_bidir, stage 3 under segment_bidir cut at "\\n", stage 4 under segment_bidir."""
    from importlib.resources import files

    from ablate.cli import main
    from ablate.results import rundir

    root = tmp_path_factory.mktemp("segments")
    rows = files("ablate.core.task_data").joinpath("ablate_tiny/ablate_tiny.jsonl").read_text().splitlines()
    (root / "tasks").mkdir()
    (root / "train.jsonl").write_text("\n".join(rows[:12]) + "\n")
    (root / "test.jsonl").write_text("\n".join(rows[12:20]) + "\n")
    (root / "tasks" / "seg_tiny.yaml").write_text(FEWSHOT_TASK.format(train=root / "train.jsonl",
                                                                      test=root / "test.jsonl"))
    runs, model = root / "runs", str(tiny_models("llama", num_hidden_layers=LAYERS))
    common = ["--model", model, "--tasks", "seg_tiny", "--include-path", str(root / "tasks"), "--num-fewshot", "2",
              "--device", "cpu", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0
    assert main(["stage2", "--mask", "segment_bidir", *common]) == 0
    assert main(["stage2", "--mask", "prefill_bidir", *common]) == 0
    assert main(["stage3", "--mask", "segment_bidir", "--segment-separator", "\\n", "--model", model, "--data",
                 "tests/data/sft.jsonl", "--max-steps", "2", "--save-steps", "2", "--device", "cpu",
                 "--max-length", "64", "--runs-dir", str(runs)]) == 0
    assert main(["stage4", "--mask", "segment_bidir", "--device", "cpu", "--runs-dir", str(runs)]) == 0
    return runs, {stage: [rundir.load_run(p) for p in sorted((runs / stage).iterdir()) if p.is_dir()]
                  for stage in ("stage2_ablation_eval", "stage3_finetune_segment_bidir", "stage4_post_ft_eval")}


def test_stage2_cuts_few_shot_prompts_at_the_tasks_delimiter(segment_runs):
    import json

    _, found = segment_runs
    segment, prefill = (r.metrics for r in found["stage2_ablation_eval"])
    assert segment["mask"] == "segment_bidir" and segment["mask_check"]["passed"]
    assert segment["segments"] == {"source": "fewshot_delimiter", "separator": "\n\n", "prompts": 8,
                                   "mean_segments": 3.0}  # two examples and the question
    assert "segments" not in prefill

    def logprobs(run):
        return [x for line in (run.path / "samples_seg_tiny.jsonl").read_text().splitlines()
                for x in json.loads(line)["logprobs"]]

    assert logprobs(found["stage2_ablation_eval"][0]) != pytest.approx(logprobs(found["stage2_ablation_eval"][1]),
                                                                       abs=1e-4)


def test_stage3_trains_under_segments_cut_at_its_separator_and_stage4_reads_it(segment_runs):
    _, found = segment_runs
    (stage3,) = found["stage3_finetune_segment_bidir"]
    summary = stage3.summary
    assert summary["mask"] == "segment_bidir" and summary["mask_check"]["passed"]
    assert summary["mask_check"]["padded_path"]["passed"]  # and the padded path
    # The rows' prompts are "<question>\nAnswer:": two segments each.
    assert summary["segments"]["separator"] == "\n" and summary["segments"]["mean_segments"] == 2.0
    (stage4,) = found["stage4_post_ft_eval"]
    assert stage4.metrics["mask"] == "segment_bidir"
    (entry,) = stage4.metrics["checkpoints"]
    assert entry["train_mask"] == "segment_bidir" and entry["mask_check"]["passed"]
    assert entry["segments"]["separator"] == "\n\n" and entry["segments"]["mean_segments"] == 3.0


def test_stage3_refuses_segment_bidir_without_a_separator(tmp_path, tiny_llama):
    from ablate.cli import main

    assert main(["stage3", "--mask", "segment_bidir", "--model", str(tiny_llama), "--data", "tests/data/sft.jsonl",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


# --- stage 3's segments from a field ---------------------------------------------------------------------

def test_a_segment_field_cuts_the_prompt_where_its_pieces_end(tiny_llama, tmp_path):
    from ablate.core.sft_data import RowFormat, load_rows, tokenize

    _, tokenizer = load_model(str(tiny_llama), "cpu", "float32")
    pieces = ["System: be brief.\n", "User: Mia has a red ball.", " What color is it?\nAnswer:"]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"segments": pieces, "response": " red"}) + "\n")
    fmt = RowFormat(segment_field="segments")
    rows = load_rows(str(data), fmt)
    (example,) = tokenize(rows, tokenizer, fmt, 128, (0.25, 0.75), False, 0)
    prompt = example.input_ids[:example.prefix_len]
    segments = list(example.prompt_segments)
    bos = 1 if tokenizer.bos_token_id is not None else 0
    assert len(segments) == len(prompt) and set(segments) == {0, 1, 2}
    texts = [tokenizer.decode([t for t, s in zip(prompt[bos:], segments[bos:]) if s == k]) for k in range(3)]
    assert texts == pieces  # each segment is its piece (the pieces end where tokens do here)
    assert tokenize(load_rows(str(data), fmt), tokenizer, fmt, 128, (0.25, 0.75), False, 0) == [example]


@pytest.mark.parametrize("row,message", [({"segments": "one string", "response": " r"}, "non-empty list of strings"),
                                          ({"segments": [], "response": " r"}, "non-empty list of strings"),
                                          ({"segments": ["a", 3], "response": " r"}, "non-empty list of strings")])
def test_a_segment_field_that_is_not_a_list_of_strings_is_one_line(tmp_path, row, message):
    from ablate.core.sft_data import RowFormat, load_rows

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps({"segments": ["x"], "response": " y"}) + "\n")
    with pytest.raises(BadInput, match=message):
        load_rows(str(data), RowFormat(segment_field="segments"))


@pytest.mark.parametrize("kw,message", [
    (dict(segment_field="s", segment_separator="\n"), "once"),
    (dict(segment_field="s", prompt_template="{q}"), "does not go with"),
    (dict(segment_field="s", mask="prefill_bidir"), "read segments only"),
])
def test_stage3_refuses_a_segment_field_that_cannot_apply(kw, message):
    from ablate.stages.config import FinetuneConfig

    with pytest.raises(BadInput, match=message):
        FinetuneConfig(**{"model": "m", "data": "d.jsonl", "mask": "segment_bidir", **kw})


def test_stage3_trains_on_segments_from_a_field(tiny_llama, tmp_path):
    from ablate.cli import main
    from ablate.results import rundir

    data = tmp_path / "rows.jsonl"
    rows = [json.loads(line) for line in open("tests/data/sft.jsonl")]
    data.write_text("".join(json.dumps({"segments": r["prompt"].split("\n"), "response": r["response"]}) + "\n"
                            for r in rows))  # the prompt without its newline, cut where it was
    assert main(["stage3", "--mask", "segment_bidir", "--segment-field", "segments", "--model", str(tiny_llama),
                 "--data", str(data), "--max-steps", "1", "--save-steps", "1", "--device", "cpu", "--max-length",
                 "64", "--runs-dir", str(tmp_path / "runs")]) == 0
    (run,) = [rundir.load_run(p) for p in (tmp_path / "runs" / "stage3_finetune_segment_bidir").iterdir()]
    assert run.summary["segments"] == {"source": "--segment-field", "field": "segments", "prompts": 38,
                                       "mean_segments": 2.0}
    assert run.summary["mask_check"]["passed"]
