"""Attention per row for packed stage 3 batches: sdpa over each row's own square of the packed mask.

    python -m pytest tests/test_sft_packing.py -q -k rows

A packed sequence holding a micro-batch's rows back to back needs no padding, but sdpa with the packed 4D mask
still computes attention over the whole sequence (its cost grows with the square of the sequence's length), so
packing into one long sequence saves the padding's compute in every linear layer and spends it again in
attention. FlashAttention's variable-length kernels are the standard cure, and they cannot express a prompt
read bidirectionally; flex attention's block sparsity needs a compiled kernel. This is the variable-length idea
on sdpa, written here because no library offers it for arbitrary per-row masks: transformers' ``AttentionInterface``
gets one more implementation that, given the rows' spans, runs transformers' own sdpa forward once per row on
that row's queries, keys, values and its square of the mask (``ablate.core.masks.packed_rows_mask``, exactly
the row's own mask), and returns zeros at the padding after the last row. A row's attention is then what it is
alone, bit for bit the same arithmetic as the padded batch's row, and nothing outside the squares can be read.

It is used only inside ``rows_attention(model)`` with ``row_spans=`` passed to the forward (stage 3's packed
training steps, forward and backward, so a gradient-checkpointing recompute attends per row too; and its mask
check); everywhere else the model keeps its own sdpa. A forward given ``row_spans`` but run without the switch
takes stock sdpa and the dense packed mask, which is exact too, only slower.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ablate.core.models import base_model

ROW_SDPA = "ablate_row_sdpa"
# Implementations that have a per-row form here: stage 3 packs into one sequence per micro-batch under these.
ROW_ATTENTION = {"sdpa": ROW_SDPA}
# Forwards that took the per-row path, counted so a run can say whether its speed came from it.
CALLS = {"rows": 0}


def row_spans(segments: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per packed sequence, the ``(start, end)`` of each row, in order: rows lie back to back from position 0,
    padding (segment -1) only after the last."""
    out = []
    for seq in segments.tolist():
        spans, start = [], 0
        for i in range(1, len(seq) + 1):
            if i == len(seq) or seq[i] != seq[start]:
                if seq[start] >= 0:
                    spans.append((start, i))
                start = i
        out.append(spans)
    return out


def row_sdpa_forward(module, query, key, value, attention_mask, row_spans=None, **kwargs):
    """transformers' sdpa forward, once per row when ``row_spans`` is given (``query`` is ``[batch, heads, length,
    dim]``; the output ``[batch, length, heads, dim]``, as sdpa's)."""
    if row_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    CALLS["rows"] += 1
    batch, heads, length, dim = query.shape
    sequences = []
    for b in range(batch):
        pieces, end = [], 0
        for start, end in row_spans[b]:
            mask = None if attention_mask is None else attention_mask[b:b + 1, :, start:end, start:end]
            out, _ = sdpa_attention_forward(module, query[b:b + 1, :, start:end], key[b:b + 1, :, start:end],
                                            value[b:b + 1, :, start:end], mask, **kwargs)
            pieces.append(out)
        if end < length:  # padding: read by no row, so anything finite is exact; zeros
            pieces.append(query.new_zeros(1, length - end, heads, dim))
        sequences.append(torch.cat(pieces, dim=1))
    return torch.cat(sequences, dim=0), None


AttentionInterface.register(ROW_SDPA, row_sdpa_forward)
AttentionMaskInterface.register(ROW_SDPA, sdpa_mask)  # masks in sdpa's format (the per-row path slices them)


def has_row_attention(model) -> bool:
    return base_model(model).config._attn_implementation in ROW_ATTENTION


@contextmanager
def rows_attention(model):
    """The model attends per row inside (where its implementation has a per-row form), as before after."""
    base = base_model(model)
    before = base.config._attn_implementation
    if before not in ROW_ATTENTION:
        yield False
        return
    base.set_attn_implementation(ROW_ATTENTION[before])
    try:
        yield True
    finally:
        base.set_attn_implementation(before)
