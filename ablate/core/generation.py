"""Greedy generation with the prompt read under a mask: prefill once with the mask, then decode causally.

    python -m pytest tests/test_generation.py -q

The prompt (left-padded, as lm-eval batches it) is prefilled in one forward
with the stage's mask, so under ``prefill_bidir`` every prompt token attends to
every other prompt token and padding never; its keys and values go into a
transformers ``DynamicCache`` (sliding-window layers included). Decoding then
goes on token by token from that cache with the model's own causal mask: each
generated token attends to the whole prompt and to the tokens generated before
it. Finished rows are padded and the batch stops when every row has met its
stopping criteria, as ``transformers.generate`` does in greedy mode.

No library does this for ordinary decoder LMs (transformers' prefix-LM
generation exists for PaliGemma-style models only; Bitune forks generation at
batch size 1), hence this short loop.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache

from ablate.core.layer_masks import forward_masks, installed
from ablate.core.masks import model_attention_mask


@torch.no_grad()
def masked_greedy(model, mask_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, stopping_criteria, pad_token_id: int, eos_token_ids: list[int],
                  prompt_segments: torch.Tensor | None = None) -> torch.Tensor:
    """``input_ids`` followed by up to ``max_new_tokens`` greedy tokens per row (the shape generate returns);
    ``prompt_segments``: each prompt token's segment (``segment_bidir``), left-padded with -1 as the prompt."""
    batch, length = input_ids.shape
    attention_mask = attention_mask.long()
    # As transformers.generate: positions count real tokens only, so left padding does not shift them.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt = torch.full((batch,), length, device=input_ids.device)  # with left padding the prompt ends every row
    mask = model_attention_mask(model.config, mask_name, attention_mask.bool(), prompt, model.dtype,
                                prompt_segments=prompt_segments)
    cache = DynamicCache(config=model.config)
    with forward_masks(model, mask_name, attention_mask.bool(), prompt, model.dtype, built=mask,
                       prompt_segments=prompt_segments):
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    per_layer = installed(model)  # decoding: every mask gives a new token the whole prefix, in every layer
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    sequences, last = input_ids, positions[:, -1]
    for step in range(max_new_tokens):
        token = torch.where(finished, pad_token_id, logits.argmax(-1))
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= torch.isin(token, eos)
        if stopping_criteria is not None:
            finished |= stopping_criteria(sequences, None)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        last = last + 1
        with per_layer.stock() if per_layer else nullcontext():
            logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=last[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1]
    return sequences
