"""Packed stage 3 batches train exactly what padded ones do: python -m pytest tests/test_sft_packing.py -q

Every tiny architecture (sliding windows biting), both training masks, sdpa and eager: the per-row losses,
the model's own loss and every parameter's gradient of a packed batch equal the padded batch's. The packed
mask is checked structurally for every registered mask (no row sees another row or padding; within a row it is
the row's own mask, by definition and by the unpacked builder), the guard on packed batches, the collator's
packing, and a short stage 3 run packed against --no-packing.
"""

import json
import random
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ablate.cli import app
from ablate.core import leakage, masks, row_attention
from ablate.core.leakage import find_leak
from ablate.core.mask_check import reference_mask
from ablate.core.masks import MASKS, dense_mask, dense_packed_mask, model_attention_mask, packed_rows_mask
from ablate.core.models import load_model
from ablate.core.row_attention import row_spans, rows_attention
from ablate.core.sft_data import Collator
from ablate.core.sft_packing import PackingCollator, best_fit_decreasing, packing_refusal, unpack
from ablate.core.tiny import ARCHS as TINY_ARCHS
from ablate.errors import BadInput

SLIDING = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
ARCHS = [("llama", {}), ("mistral", {"sliding_window": 4}), ("ministral3", {}), ("qwen2", SLIDING),
         ("qwen3", SLIDING), ("mistral3", {})]
# (length, prompt tokens): one row without a prompt (its first label is a token), all longer than the window.
SHAPES = [(17, 5), (9, 0), (12, 11), (5, 2), (14, 7), (6, 1)]
PACK_LENGTH = 24


def rows(shapes=SHAPES, seed=0, segments=False):
    """``segments``: each prompt also cut into up to three segments (what segment masks read)."""
    rng = random.Random(seed)
    out = []
    for length, prefix in shapes:
        ids = [1] + [rng.randrange(3, 500) for _ in range(length - 1)]
        out.append({"input_ids": ids, "labels": [-100] * prefix + ids[prefix:], "prefix_len": prefix})
        if segments:
            out[-1]["prompt_segments"] = tuple(min(t * 3 // max(prefix, 1), 2) for t in range(prefix))
    return out


def test_every_tiny_architecture_is_covered():
    assert {arch for arch, _ in ARCHS} == set(TINY_ARCHS)


def per_row_losses(logits, batch):
    """Summed next-token loss of each row, from logits in the padded layout."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for r, row in enumerate(batch):
        labels = torch.tensor(row["labels"])
        targets = torch.nonzero(labels[1:] != -100).flatten()
        out.append(-logprobs[r, targets, labels[targets + 1]].sum())
    return torch.stack(out)


def on_model(model, batch):
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def padded_forward(model, mask_name, batch):
    padded = on_model(model, Collator(0)(batch))
    mask = model_attention_mask(model.config, mask_name, padded["attention_mask"].bool(), padded["prefix_len"],
                                torch.float32)
    n = (padded["labels"][:, 1:] != -100).sum()
    out = model(input_ids=padded["input_ids"], attention_mask=mask, labels=padded["labels"], num_items_in_batch=n)
    return out.loss, out.logits.cpu(), int(n)


def packed_forward(model, mask_name, batch, attend="mask", pack_length=PACK_LENGTH):
    """``attend``: ``mask`` (the model's own attention over the packed mask) or ``rows`` (per row:
    ablate.core.row_attention, as MaskedTrainer runs sdpa)."""
    packed = on_model(model, PackingCollator(0, pack_length)(batch))
    mask = packed_rows_mask(model.config, mask_name, packed["attention_mask"].bool(), packed["prefix_len"],
                            packed["segments"], packed["position_ids"], torch.float32)
    n = (packed["labels"][:, 1:] != -100).sum()  # what the Trainer counts as num_items_in_batch
    spans = {"row_spans": row_spans(packed["segments"])} if attend == "rows" else {}
    with rows_attention(model) if attend == "rows" else nullcontext(False) as per_row:
        assert per_row == (attend == "rows")
        out = model(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"],
                    labels=packed["labels"], num_items_in_batch=n, **spans)
    return out.loss, unpack(out.logits, packed).cpu(), int(n)


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# How packed rows attend: the implementation over the whole packed mask, or (sdpa) once per row, in sequences of
# PACK_LENGTH (padding after the last row) or all in one sequence (stage 3's default under sdpa).
ATTEND = [("sdpa", "mask", PACK_LENGTH), ("sdpa", "rows", PACK_LENGTH), ("sdpa", "rows", None),
          ("eager", "mask", PACK_LENGTH), ("flex_attention", "mask", PACK_LENGTH)]


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("mask", ["causal", "prefill_bidir"])
@pytest.mark.parametrize("impl,attend,pack_length", ATTEND, ids=[f"{i}-{a}-{p}" for i, a, p in ATTEND])
def test_a_packed_batch_has_the_padded_losses_and_gradients(tiny_models, arch, overrides, mask, impl, attend,
                                                            pack_length):
    if impl == "flex_attention" and not torch.cuda.is_available():
        pytest.skip("flex attention is checked on CUDA only (on CPU it differs from sdpa even unmasked: "
                    "tests/test_models.py)")
    device = "cuda" if impl == "flex_attention" else "cpu"
    model, _ = load_model(str(tiny_models(arch, **overrides)), device, "float32", impl)
    model.train()
    batch = rows()
    window = getattr(model.config, "sliding_window", None)
    if window:
        assert max(length for length, _ in SHAPES) > window + 1  # the window bites
    assert len(PackingCollator(0, pack_length)(batch)["input_ids"]) < len(batch)  # rows do share sequences
    padded_loss, padded_logits, n_padded = padded_forward(model, mask, batch)
    padded_grads = gradients(model, padded_loss)
    calls = row_attention.CALLS["rows"]
    packed_loss, packed_logits, n_packed = packed_forward(model, mask, batch, attend, pack_length)
    packed_grads = gradients(model, packed_loss)
    layers = model.config.get_text_config().num_hidden_layers
    assert row_attention.CALLS["rows"] - calls == (layers if attend == "rows" else 0)  # every layer, per row
    assert n_packed == n_padded  # the same supervised tokens, counted as the Trainer counts them
    torch.testing.assert_close(per_row_losses(packed_logits, batch), per_row_losses(padded_logits, batch),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-5)
    assert set(packed_grads) == {name for name, p in model.named_parameters() if p.requires_grad}
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_head_at_supervised_positions_only_gives_the_same_loss_and_gradients(tiny_models, arch, overrides,
                                                                                 layout):
    """MaskedTrainer's training forwards: logits_to_keep at the positions supervised_logits picks, shift_labels
    their targets; against the head over every position (the model's own loss either way)."""
    from ablate.core.sft_data import supervised_logits

    model, _ = load_model(str(tiny_models(arch, **overrides)), "cpu", "float32", "sdpa")
    model.train()
    batch = Collator(0)(rows()) if layout == "padded" else PackingCollator(0, None)(rows())
    segments = batch.get("segments")
    mask = (model_attention_mask(model.config, "prefill_bidir", batch["attention_mask"].bool(), batch["prefix_len"],
                                 torch.float32) if segments is None else
            packed_rows_mask(model.config, "prefill_bidir", batch["attention_mask"].bool(), batch["prefix_len"],
                             segments, batch["position_ids"], torch.float32))
    n = (batch["labels"][:, 1:] != -100).sum()
    kw = dict(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"], num_items_in_batch=n,
              **({} if segments is None else {"position_ids": batch["position_ids"]}))
    full = model(**kw)
    full_grads = gradients(model, full.loss)
    keep, targets = supervised_logits(batch["labels"])
    assert keep.numel() < batch["labels"].shape[1]  # prompts, padding: positions the head is spared
    assert int((targets != -100).sum()) == int(n)  # every supervised token still a target
    kept = model(**kw, logits_to_keep=keep, shift_labels=targets)
    assert kept.logits.shape[1] == keep.numel()
    kept_grads = gradients(model, kept.loss)
    torch.testing.assert_close(kept.loss, full.loss, rtol=0, atol=1e-5)
    assert set(kept_grads) == set(full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def row_blocks(dense, packed):
    """Each row's own square of a packed dense mask, by the batch's row order."""
    out = []
    for r in range(len(packed["prefix_len"])):
        s, at = (packed["segments"] == r).nonzero().unbind(1)
        out.append(dense[s[0]][at][:, at])
    return out


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("window", [None, 4])
def test_a_row_sees_only_itself_and_there_exactly_its_own_mask(mask, window):
    batch = rows(segments=MASKS[mask].needs_segments)
    packed = PackingCollator(0, PACK_LENGTH)(batch)
    dense = dense_packed_mask(mask, packed, window)
    segments = packed["segments"]
    real = segments >= 0
    other = segments[:, None, :] != segments[:, :, None]  # another row, or padding
    assert not (dense & other & real[:, :, None]).any()  # no real token sees another row or padding
    assert dense.any(-1).all()  # every query, padding too, sees something (no NaN from an empty softmax row)
    for row, block in zip(batch, row_blocks(dense, packed)):
        n, prefix = len(row["input_ids"]), row["prefix_len"]
        own = [list(row["prompt_segments"])] if "prompt_segments" in row else None
        definition = reference_mask(mask, [n], [prefix], n, torch.float32, window=window, segments=own)[0, 0] == 0
        assert torch.equal(block, definition)
        if window is None:  # and what the unpacked builder gives the row alone
            alone = None if own is None else torch.tensor([own[0] + [-1] * (n - prefix)])
            assert torch.equal(block, dense_mask(mask, torch.tensor([prefix]), torch.ones(1, n, dtype=torch.bool),
                                                 alone)[0])


@pytest.mark.parametrize("pack_length", [PACK_LENGTH, None])
def test_attention_per_row_reads_nothing_outside_each_rows_square(tiny_llama, pack_length):
    """Structural: open every entry of the packed mask outside the rows' own squares, and the per-row path gives
    the same logits (it never reads there), while the model's own sdpa over that mask does not; padding's
    outputs stay finite."""
    model, _ = load_model(str(tiny_llama), "cpu", "float32", "sdpa")
    packed = PackingCollator(0, pack_length)(rows())
    mask = packed_rows_mask(model.config, "prefill_bidir", packed["attention_mask"].bool(), packed["prefix_len"],
                            packed["segments"], packed["position_ids"], torch.float32)
    segments = packed["segments"]
    square = (segments[:, None, :] == segments[:, :, None]) & (segments >= 0)[:, :, None]
    opened = mask | ~square[:, None]  # every other row and the padding made visible
    assert not torch.equal(opened, mask)
    kw = dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"])
    with torch.no_grad():
        with rows_attention(model):
            spans = row_spans(segments)
            owners = [int(segments[b, start]) for b, seq in enumerate(spans) for start, _ in seq]
            assert sorted(owners) == list(range(len(SHAPES)))  # every row one span, whole
            assert [end - start for seq in spans for start, end in seq] == [SHAPES[r][0] for r in owners]
            per_row = model(attention_mask=mask, row_spans=spans, **kw).logits
            per_row_opened = model(attention_mask=opened, row_spans=spans, **kw).logits
        stock_opened = model(attention_mask=opened, **kw).logits
    real = segments >= 0
    assert torch.equal(per_row[real], per_row_opened[real])
    assert not torch.allclose(stock_opened[real], per_row[real], atol=1e-3)
    assert per_row.isfinite().all()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_model_formats_hold_the_same_mask_per_layer_kind(impl):
    from ablate.core.tiny import tiny_config

    config = tiny_config("qwen2", **SLIDING)
    config._attn_implementation = impl
    packed = PackingCollator(0, PACK_LENGTH)(rows())
    got = packed_rows_mask(config, "prefill_bidir", packed["attention_mask"].bool(), packed["prefix_len"],
                           packed["segments"], packed["position_ids"], torch.float32)
    assert set(got) == {"full_attention", "sliding_attention"}
    for kind, window in (("full_attention", None), ("sliding_attention", 4)):
        allowed = got[kind][:, 0] if impl == "sdpa" else got[kind][:, 0] == 0
        assert torch.equal(allowed, dense_packed_mask("prefill_bidir", packed, window)), kind


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_the_guard_gives_packed_rows_the_padded_verdict(mask):
    batch = rows(segments=MASKS[mask].needs_segments)
    padded, packed = find_leak(mask, Collator(0)(batch)), find_leak(mask, PackingCollator(0, PACK_LENGTH)(batch))
    assert packed == padded
    assert (packed is not None) == MASKS[mask].leaks_labels


def test_the_guard_reads_the_packed_mask_and_labels(monkeypatch):
    batch = rows()
    packed = PackingCollator(0, PACK_LENGTH)(batch)
    labels = packed["labels"].clone()
    seq = next(i for i, seg in enumerate(packed["segments"]) if len(set(seg[seg >= 0].tolist())) > 1)  # 2+ rows
    second = (packed["segments"][seq] != packed["segments"][seq, 0]).nonzero()[0, 0]  # where its second row starts
    labels[seq, second] = packed["input_ids"][seq, second]
    leak = find_leak("causal", {**packed, "labels": labels})  # a row trained to predict the next row's first token
    assert leak is not None and leak.other_row == int(packed["segments"][seq, second])
    assert "packed rows must not see or predict each other" in str(leak)
    # A mask that lets rows see each other (causal over the whole sequence) is found in the mask itself.
    monkeypatch.setattr(masks, "row_function", lambda segments, positions, window=None:
                        lambda b, h, q, kv: segments[b, kv] >= 0)
    leak = find_leak("prefill_bidir", packed)
    assert leak is not None and leak.other_row is not None


def test_the_probe_reads_packed_batches(tiny_llama):
    model, _ = load_model(str(tiny_llama), "cpu", "float32")
    batch = rows()
    for mask in ("causal", "prefill_bidir"):
        padded = leakage.probe(model, Collator(0)(batch), mask)
        packed = leakage.probe(model, PackingCollator(0, PACK_LENGTH)(batch), mask)
        assert packed["n_samples"] == padded["n_samples"] == len(batch)
        for key in ("loss_mask", "loss_causal"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-6)


def test_best_fit_decreasing():
    # Longest first; each row into the fullest sequence with room (3 goes beside 7, not 6 or 5).
    assert best_fit_decreasing([5, 9, 3, 7, 2, 6], 10) == [[1], [3, 2], [5, 4], [0]]
    assert best_fit_decreasing([4, 4, 4], 12) == [[0, 1, 2]]
    assert best_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(BadInput, match="row 1 has 11 tokens, more than the pack length 10; a row is never split"):
        best_fit_decreasing([5, 11], 10)


def test_the_collator_keeps_rows_whole_restarts_positions_and_masks_first_labels():
    batch = rows()
    packed = PackingCollator(0, PACK_LENGTH)(batch)
    assert packed["input_ids"].shape[1] <= PACK_LENGTH
    assert torch.equal(packed["prefix_len"], torch.tensor([r["prefix_len"] for r in batch]))
    for r, row in enumerate(batch):
        s, at = (packed["segments"] == r).nonzero().unbind(1)
        assert len(set(s.tolist())) == 1 and torch.equal(at, torch.arange(at[0], at[0] + len(row["input_ids"])))
        assert packed["input_ids"][s, at].tolist() == row["input_ids"]
        assert packed["position_ids"][s, at].tolist() == list(range(len(row["input_ids"])))
        assert packed["labels"][s, at].tolist() == [-100] + row["labels"][1:]  # never a target from the row before
    assert torch.equal(packed["attention_mask"].bool(), packed["segments"] >= 0)
    assert (packed["labels"][packed["segments"] < 0] == -100).all()
    again = PackingCollator(0, PACK_LENGTH)([dict(r) for r in batch])
    assert all(torch.equal(packed[k], again[k]) for k in packed)
    with pytest.raises(BadInput, match="never split"):
        PackingCollator(0, 16)(batch)


def test_a_packed_batch_never_feeds_more_positions_than_the_padded_one():
    """Every layout, not an example: seeded batches of every size and spread against several pack lengths."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        pack_length = rng.choice([16, 25, 64, 128, 256])
        lengths = [rng.randint(2, pack_length) for _ in range(rng.randint(1, 16))]
        bins = PackingCollator(0, pack_length).layout(lengths)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every row once, whole
        width = max(sum(lengths[i] for i in b) for b in bins)
        assert width <= pack_length and len(bins) * width <= len(lengths) * max(lengths), (pack_length, lengths)
    assert PackingCollator(0, 25).layout([10, 10, 10]) == [[0], [1], [2]]  # two wide sequences would feed 40, not 30
    assert PackingCollator(0, None).layout([7, 3, 9]) == [[0, 1, 2]]  # no pack length: one sequence, no padding


def test_packing_that_cannot_be_exact_falls_back(tiny_llama):
    model, _ = load_model(str(tiny_llama), "cpu", "float32")
    assert packing_refusal(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no 4D mask" in packing_refusal(model)


def test_pack_length_options(tmp_path):
    from ablate.stages.config import load_finetune_config

    flags = dict(model="m", data="d", runs_dir=str(tmp_path))
    config = load_finetune_config(flags)
    assert config.packing is True and config.pack_length is None
    assert load_finetune_config({**flags, "packing": False}).packing is False
    with pytest.raises(BadInput, match="--pack-length 512 is shorter than --max-length 1024"):
        load_finetune_config({**flags, "pack_length": 512})
    help_text = CliRunner().invoke(app, ["stage3", "--help"], terminal_width=200).output
    assert "--no-packing" in help_text and "--pack-length" in help_text


def test_stage3_packed_trains_what_padded_trains(tiny_llama, tmp_path):
    from test_finetune import config, summary_of
    from ablate.stages.stage3_finetune import run_stage3

    rng = random.Random(0)
    words = "the cup box ball red blue has what color is of answer question".split()
    data = tmp_path / "varied.jsonl"  # rows of many lengths, so padding has something to waste
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.choices(words, k=rng.randint(2, 30))) + "\nAnswer:",
                                        "response": " " + " ".join(rng.choices(words, k=rng.randint(1, 12)))}) + "\n"
                            for _ in range(40)))
    runs = {packing: run_stage3(config(tiny_llama, tmp_path / str(packing), data=str(data), packing=packing,
                                       max_steps=4, save_steps=10, max_length=128))
            for packing in (True, False)}
    packed, padded = (summary_of(runs[p]) for p in (True, False))
    assert packed["packing"] == {"packed": True, "pack_length": None, "unpacked_because": None,
                                 "row_attention": True}  # sdpa: each micro-batch in one sequence, per row
    assert padded["packing"] == {"packed": False, "pack_length": None, "unpacked_because": "--no-packing",
                                 "row_attention": False}
    assert packed["tokens_fed"]["real"] == padded["tokens_fed"]["real"]  # the same rows, step by step
    assert packed["tokens_fed"]["positions"] == packed["tokens_fed"]["real"] < padded["tokens_fed"]["positions"]
    for summary in (packed, padded):
        assert summary["status"] == "completed" and summary["train_tokens_per_second"] > 0
        assert summary["padding_fraction"] == pytest.approx(
            1 - summary["tokens_fed"]["real"] / summary["tokens_fed"]["positions"], abs=1e-6)
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], abs=1e-5)
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], abs=1e-5)
    assert packed["mask_check"]["passed"] and packed["mask_check"]["where"] == "training (packed rows)"
    # A packing run pads the micro-batches packing would barely shorten: that path is checked too.
    assert packed["mask_check"]["padded_path"]["passed"] and packed["mask_check"]["padded_path"]["where"] == "training"
    a, b = (load_file(str(runs[p] / "final" / "model.safetensors")) for p in (True, False))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    end = json.loads((runs[True] / "train_log.jsonl").read_text().splitlines()[-1])["end"]
    assert end["train_tokens_per_second"] == packed["train_tokens_per_second"]
