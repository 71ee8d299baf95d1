"""Label-leakage guard for training under a mask, and the study's empirical probe.

    python -m pytest tests/test_finetune.py -q -k leak

Structural: the logits at position q are trained to predict token q+1 when
``labels[q+1] != -100``; such a supervised position must not attend to any
position after q (the target itself, or anything beyond). The probe repeats the
study's diagnosis: on held-out samples, the response loss under the training
mask vs under the causal mask with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ablate.core.masks import dense_mask, model_attention_mask


@dataclass(frozen=True)
class Leak:
    row: int
    position: int
    sees: int

    def __str__(self) -> str:
        return f"example {self.row}: supervised position {self.position} attends to later position {self.sees}"


def find_leak(mask_name: str, batch: dict) -> Leak | None:
    """First supervised position that can see the future under ``mask_name``, or None."""
    allowed = dense_mask(mask_name, batch["prefix_len"], batch["attention_mask"].bool())
    n = allowed.shape[-1]
    supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    bad = allowed & future[None] & supervised[:, :, None]
    if not bad.any():
        return None
    row, position, sees = (int(x) for x in bad.nonzero()[0])
    return Leak(row, position, sees)


def response_loss(model, batch: dict, mask_name: str) -> float:
    """Mean loss over response tokens under ``mask_name``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = model_attention_mask(model.config, mask_name, batch["attention_mask"].bool(), batch["prefix_len"],
                                next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
    model.train(was_training)
    return float(loss)


def probe(model, batch: dict, mask_name: str) -> dict:
    """The study's direct probe: same samples, same weights, training mask vs causal."""
    trained = response_loss(model, batch, mask_name)
    causal = response_loss(model, batch, "causal")
    return {"loss_mask": trained, "loss_causal": causal, "ratio": trained / causal if causal > 0 else None,
            "n_samples": int(batch["input_ids"].shape[0])}
