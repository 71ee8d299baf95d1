"""Packed stage 3 batches: a micro-batch's rows side by side in a few sequences, each row attending to itself only.

    python -m pytest tests/test_sft_packing.py -q
    python -c "from ablate.core.sft_packing import PackingCollator; \
print(PackingCollator(0, 8)([{'input_ids': [1, 5, 6], 'labels': [-100, 5, 6], 'prefix_len': 1}, \
{'input_ids': [1, 7, 8, 9, 4], 'labels': [-100, -100, 8, 9, 4], 'prefix_len': 2}]))"

``PackingCollator`` gets the very rows the padded ``ablate.core.sft_data.Collator`` would get, so each optimizer
step sees the same rows, and packs them best-fit decreasing into sequences of at most ``pack_length`` tokens (a
row is never split), or, with no pack length, all into one sequence: no padding at all, for models that attend
per row (ablate.core.row_attention: sdpa once per row, so a long sequence costs no more attention than its rows). Positions restart at 0 for each row, ``segments`` names each token's row (-1 on padding),
and the first label of every row is -100, so no row is trained to predict from the row before it. The mask
(``ablate.core.masks.packed_rows_mask``) keeps each row to itself, with exactly what its mask gives it alone.

The supervised tokens are those of the padded batch, and the Trainer counts them over ``labels[..., 1:]`` either
way, so the model's loss (a sum over them divided by ``num_items_in_batch``) is the padded run's objective.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from ablate.errors import BadInput

# Attention implementations that take the 4D mask packing needs (FlashAttention takes a padding mask only).
PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
# Stage 3 packs a micro-batch only when that feeds at least this fraction fewer positions than padding: building
# the packed 4D mask costs time of its own. Measured 2026-12-01 (ablate bench-stage3, SmolLM2 on this project's
# 2-core CPU, the demo's rows, pack length 128): packing saved 2.8% of the positions and ran 1.04x under causal
# but 0.90x under prefill_bidir, where the padded batch's own mask is already 4D. The 10% is a guess above that.
MIN_SAVING = 0.10
# Attending per row (ablate.core.row_attention), attention costs what the rows cost however they are laid out, so
# any saving of positions is worth the packed mask (about 1% of a step on the demo's rows).
MIN_SAVING_PER_ROW = 0.0


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per sequence: the longest row first, each into the fullest sequence it fits (ties: the
    earliest sequence; equal lengths: the earlier row), a new sequence when none has room."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise BadInput(f"row {i} has {n} tokens, more than the pack length {capacity}; a row is never split "
                       "(raise --pack-length to at least --max-length)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


class PackingCollator:
    """Packs a batch of ``{input_ids, labels, prefix_len}`` rows; deterministic (the packing depends on the rows'
    lengths and order only).

    Returns ``input_ids``, ``labels``, ``attention_mask`` (1 = real token), ``position_ids``, ``segments`` of shape
    ``[sequences, width]`` and ``prefix_len`` of shape ``[rows]`` (the batch's order; ``segments`` indexes it).
    Padding's positions go on from its sequence's last row, as right padding's do.
    """

    def __init__(self, pad_token_id: int, pack_length: int | None, min_saving: float = 0.0):
        self.pad = pad_token_id
        self.pack_length = pack_length  # None: the whole micro-batch in one sequence
        self.min_saving = min_saving  # below this saving of positions, the padded batch (Collator's) is returned

    def layout(self, lengths: list[int]) -> list[list[int]]:
        """The packing that feeds the fewest positions (sequences x widest): best-fit decreasing into the pack
        length, or into a multiple of the longest row under it. The longest row itself is one candidate, so a
        packed batch never feeds more positions than the padded one (ties: the narrower sequences). With no pack
        length, one sequence of the rows in batch order (it feeds exactly the real tokens)."""
        if self.pack_length is None:
            return [list(range(len(lengths)))]
        longest = max(lengths)
        capacities = sorted({*range(longest, self.pack_length + 1, longest), self.pack_length} - {0})
        best = None
        for capacity in capacities if longest <= self.pack_length else [self.pack_length]:
            bins = best_fit_decreasing(lengths, capacity)
            width = max(sum(lengths[i] for i in members) for members in bins)
            if best is None or len(bins) * width < best[0]:
                best = (len(bins) * width, bins)
        return best[1]

    def __call__(self, batch: list[dict]) -> dict:
        lengths = [len(b["input_ids"]) for b in batch]
        bins = self.layout(lengths)
        width = max(sum(lengths[i] for i in members) for members in bins)
        if len(bins) * width > (1 - self.min_saving) * len(lengths) * max(lengths):
            from ablate.core.sft_data import Collator

            return Collator(self.pad)(batch)  # the same rows and objective; MaskedTrainer takes either layout
        shape = (len(bins), width)
        ids, labels = torch.full(shape, self.pad), torch.full(shape, -100)
        positions, segments = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
        segmented = batch[0].get("prompt_segments") is not None
        prompt_segments = torch.full(shape, -1)  # segment_bidir: each prompt token's segment, -1 elsewhere
        for s, members in enumerate(bins):
            at = 0
            for i in members:
                n = lengths[i]
                ids[s, at:at + n] = torch.tensor(batch[i]["input_ids"])
                labels[s, at + 1:at + n] = torch.tensor(batch[i]["labels"][1:])
                positions[s, at:at + n] = torch.arange(n)
                segments[s, at:at + n] = i
                if segmented:
                    own = list(batch[i]["prompt_segments"])
                    prompt_segments[s, at:at + len(own)] = torch.tensor(own, dtype=torch.long)
                at += n
            positions[s, at:] = torch.arange(n, n + width - at)
        out = {"input_ids": ids, "labels": labels, "attention_mask": (segments >= 0).long(),
               "position_ids": positions, "segments": segments,
               "prefix_len": torch.tensor([b["prefix_len"] for b in batch])}
        if segmented:
            out["prompt_segments"] = prompt_segments
        return out


def is_packed(batch: dict) -> bool:
    return "segments" in batch


def unpack(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """``values`` of a packed batch (``[sequences, width, ...]``) in the padded layout: ``[rows, longest row, ...]``,
    zeros after each row's end."""
    segments, positions = batch["segments"].to(values.device), batch["position_ids"].to(values.device)
    real = segments >= 0
    rows, at = segments[real], positions[real]
    out = values.new_zeros((batch["prefix_len"].shape[0], int(at.max()) + 1, *values.shape[2:]))
    out[rows, at] = values[real]
    return out


def packing_refusal(model) -> str | None:
    """Why packing cannot be exact for this model (then stage 3 pads), or None."""
    from ablate.core.models import base_model

    base = base_model(model)
    impl = base.config._attn_implementation
    if impl not in PACKABLE_ATTENTION:
        return f"attention implementation '{impl}' takes no 4D mask that keeps packed rows apart"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids, so positions could not restart for each row"
    return None


def packed_forward(model, autocast_dtype: torch.dtype | None = None):
    """``ablate.core.mask_check``'s run path for a packed run: the check rows packed into one sequence, the
    trainer's mask, position ids and attention (per row where the model has it: ablate.core.row_attention), the
    logits handed back in the padded layout the check compares."""
    from ablate.core.layer_masks import forward_masks
    from ablate.core.masks import packed_rows_mask
    from ablate.core.row_attention import row_spans, rows_attention

    def forward(rows: list[tuple], mask_name: str) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = PackingCollator(0, None)(
            [{"input_ids": list(row[0]), "labels": list(row[0]), "prefix_len": row[1],
              "prompt_segments": row[2] if len(row) > 2 else None} for row in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        prompt_segments = batch.get("prompt_segments")
        mask = packed_rows_mask(model.config, mask_name, batch["attention_mask"].bool(), batch["prefix_len"],
                                batch["segments"], batch["position_ids"], next(model.parameters()).dtype,
                                prompt_segments)
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        per_layer = forward_masks(model, mask_name, batch["attention_mask"].bool(), batch["prefix_len"],
                                  next(model.parameters()).dtype, batch["segments"], batch["position_ids"], rows=True,
                                  built=mask, prompt_segments=prompt_segments)
        with torch.no_grad(), autocast, rows_attention(model) as per_row, per_layer:
            spans = {"row_spans": row_spans(batch["segments"])} if per_row else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                           position_ids=batch["position_ids"], **spans).logits
        return unpack(logits, batch)

    return forward
