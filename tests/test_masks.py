"""Exact tests of the mask registry: python -m pytest tests/test_masks.py -q"""

import pytest
import torch

from ablate.errors import BadInput
from ablate.core.masks import MASKS, dense_mask, get_mask, model_attention_mask
from ablate.core.tiny import tiny_config

PADDED = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)


def causal_reference(attention_mask):
    n = attention_mask.shape[1]
    tril = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return tril[None] & attention_mask[:, None, :]


def test_prefix_length_zero_equals_causal():
    got = dense_mask("prefill_bidir", torch.tensor([0, 0]), PADDED)
    assert torch.equal(got, causal_reference(PADDED))
    assert torch.equal(dense_mask("causal", torch.tensor([3, 2]), PADDED), causal_reference(PADDED))


def test_prefill_bidir_exact_pattern():
    got = dense_mask("prefill_bidir", torch.tensor([3]), torch.ones(1, 5, dtype=torch.bool))[0].int()
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ])
    assert torch.equal(got, expected)


def test_rows_after_prompt_are_causal_and_prompt_is_bidirectional():
    prefix = torch.tensor([4, 2])
    got = dense_mask("prefill_bidir", prefix, PADDED)
    causal = causal_reference(PADDED)
    for b, p in enumerate(prefix.tolist()):
        assert torch.equal(got[b, p:], causal[b, p:])
        assert got[b, :p, :p].all()
        assert not got[b, :p, p:].any()  # the prompt never sees the response


def test_padding_is_never_attended():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])  # what segment masks read
    for name in MASKS:
        got = dense_mask(name, torch.tensor([6, 6]), PADDED, segments)  # prefix even covering the padding
        assert not got[1, :, 4:].any(), name


def test_full_bidir_sees_everything_but_padding():
    got = dense_mask("full_bidir", torch.tensor([0, 0]), PADDED)
    assert got[0].all()
    assert got[1, :, :4].all()


def test_unknown_mask_is_bad_input():
    with pytest.raises(BadInput, match="unknown mask 'bidir'"):
        get_mask("bidir")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_refuses_non_causal(impl):
    config = tiny_config("llama")
    config._attn_implementation = impl
    with pytest.raises(BadInput, match="FlashAttention"):
        model_attention_mask(config, "prefill_bidir", PADDED, torch.tensor([2, 2]), torch.float32)


def test_causal_passes_the_padding_mask_through():
    config = tiny_config("llama")
    config._attn_implementation = "sdpa"
    assert model_attention_mask(config, "causal", PADDED, torch.tensor([2, 2]), torch.float32) is PADDED


def test_backend_formats():
    prefix = torch.tensor([3, 2])
    config = tiny_config("llama")
    config._attn_implementation = "sdpa"
    sdpa = model_attention_mask(config, "prefill_bidir", PADDED, prefix, torch.float32)
    assert sdpa.dtype == torch.bool and torch.equal(sdpa[:, 0], dense_mask("prefill_bidir", prefix, PADDED))
    config._attn_implementation = "eager"
    eager = model_attention_mask(config, "prefill_bidir", PADDED, prefix, torch.float32)
    assert eager.dtype == torch.float32 and torch.equal(eager[:, 0] == 0, sdpa[:, 0])


def test_qwen_layer_types_get_a_mapping():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=2, max_window_layers=1)
    config._attn_implementation = "sdpa"
    masks = model_attention_mask(config, "prefill_bidir", PADDED, torch.tensor([3, 2]), torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert not torch.equal(masks["full_attention"], masks["sliding_attention"])
