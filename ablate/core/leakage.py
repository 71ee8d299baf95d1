"""Label-leakage guard for training under a mask, and the study's empirical probe.

    python -m pytest tests/test_finetune.py -q -k leak

Structural: the logits at position q are trained to predict token q+1 when
``labels[q+1] != -100``; such a supervised position must not attend to any
position after q (the target itself, or anything beyond). In a packed batch
(ablate.core.sft_packing) the guard reads the mask the trainer builds, and no
token may see, or be trained to predict, a token of another row. The probe
repeats the study's diagnosis: on held-out samples, the response loss under the
training mask vs under the causal mask with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ablate.core.layer_masks import forward_masks
from ablate.core.masks import dense_mask, dense_packed_mask, model_attention_mask, packed_rows_mask


@dataclass(frozen=True)
class Leak:
    row: int
    position: int
    sees: int
    other_row: int | None = None  # packed rows: the row reached, when it is another (never allowed)

    def __str__(self) -> str:
        if self.other_row is not None:
            return (f"example {self.row}: position {self.position} reaches position {self.sees} of example "
                    f"{self.other_row} (packed rows must not see or predict each other)")
        return f"example {self.row}: supervised position {self.position} attends to later position {self.sees}"


def find_leak(mask_name: str, batch: dict) -> Leak | None:
    """First supervised position that can see the future under ``mask_name``, or None; in a packed batch, first
    a token that reaches another row. "First" is the smallest (row, position, seen position) either way."""
    if "segments" in batch:
        return _packed_leak(mask_name, batch)
    allowed = dense_mask(mask_name, batch["prefix_len"], batch["attention_mask"].bool(), batch.get("prompt_segments"))
    n = allowed.shape[-1]
    supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    bad = allowed & future[None] & supervised[:, :, None]
    if not bad.any():
        return None
    row, position, sees = (int(x) for x in bad.nonzero()[0])
    return Leak(row, position, sees)


def _packed_leak(mask_name: str, batch: dict) -> Leak | None:
    # The full-attention layers' mask: a sliding window only takes attention away.
    allowed = dense_packed_mask(mask_name, batch)
    segments, positions, labels = batch["segments"], batch["position_ids"], batch["labels"]
    width = segments.shape[1]
    other = (segments[:, :, None] >= 0) & (segments[:, :, None] != segments[:, None, :])  # padding counts as other
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != -100
    next_token = torch.eye(width, dtype=torch.bool).roll(1, dims=1)  # q -> q + 1, the token q is trained on
    reaches = (allowed & other) | (supervised[:, :, None] & next_token[None] & other)
    if not reaches.any():
        future = torch.triu(torch.ones(width, width, dtype=torch.bool), diagonal=1)
        reaches = allowed & future[None] & supervised[:, :, None]
        if not reaches.any():
            return None
    seq, q, k = reaches.nonzero().unbind(1)
    found = torch.stack([segments[seq, q], positions[seq, q], positions[seq, k], segments[seq, k]], 1)
    row, position, sees, seen = (int(x) for x in min(found.tolist()))
    return Leak(row, position, sees, seen if seen != row else None)


def response_loss(model, batch: dict, mask_name: str) -> float:
    """Mean loss over response tokens under ``mask_name``, on a padded or a packed batch."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    real, dtype, extra = batch["attention_mask"].bool(), next(model.parameters()).dtype, {}
    packed = "segments" in batch
    if packed:
        mask = packed_rows_mask(model.config, mask_name, real, batch["prefix_len"], batch["segments"],
                                batch["position_ids"], dtype, batch.get("prompt_segments"))
        extra["position_ids"] = batch["position_ids"]
    else:
        mask = model_attention_mask(model.config, mask_name, real, batch["prefix_len"], dtype,
                                    prompt_segments=batch.get("prompt_segments"))
    was_training = model.training
    model.eval()
    with torch.no_grad(), forward_masks(model, mask_name, real, batch["prefix_len"], dtype,
                                        batch.get("segments"), batch.get("position_ids"), rows=packed, built=mask,
                                        prompt_segments=batch.get("prompt_segments")):
        loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"], **extra).loss
    model.train(was_training)
    return float(loss)


def probe(model, batch: dict, mask_name: str) -> dict:
    """The study's direct probe: same samples, same weights, training mask vs causal."""
    trained = response_loss(model, batch, mask_name)
    causal = response_loss(model, batch, "causal")
    return {"loss_mask": trained, "loss_causal": causal, "ratio": trained / causal if causal > 0 else None,
            "n_samples": int(batch["prefix_len"].shape[0])}
