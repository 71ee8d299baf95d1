"""Out of memory while scoring, generating or training: halve the batch, retry, and record it.

    python -m pytest tests/test_oom.py tests/test_train_oom.py -q

lm-eval's ``batch_size="auto"`` probes once; a later batch can still run out of
memory (a longer generation, fragmentation, another process on the GPU). Scoring
retries the failed batch with half its rows and keeps that size for the rest of
the call; generation splits the failed batch into halves (recursively) and joins
their outputs into the tensor one call would have returned. Each halving is one
WARNING line in the run's log and one entry of the model's ``oom_retries``,
which ``metrics.json`` records. The retry loops themselves live in
``PrefillMaskLM`` (ablate.core.lm_eval_model); this module holds the pure parts.

Training (stage 3) halves the per-device micro-batch and doubles gradient accumulation, so every optimizer step
still takes the same rows in the same order (``smaller_micro_batch``), and goes on from the run's newest intact
checkpoint through the Trainer's own resume, or from the start with the starting weights put back
(ablate.stages.stage3_resume.after_oom). Each halving is one WARNING line and one entry of summary.json's
``oom_retries``; a micro-batch of one row that does not fit is one line (``BadInput``, exit 2). What changes:
each smaller micro-batch is packed on its own (ablate.core.sft_packing), so a step's rows sit in other sequences,
each row computed as before; the step's loss is still the sum over its supervised tokens divided by their count
over the whole step (the Trainer's ``num_items_in_batch``), so only the order of float sums differs (5e-7 on the
tiny float32 model after 6 steps; tests/test_train_oom.py asks 1e-5). Dropout, where a model has it, draws other
masks. The steps between the checkpoint and the failure are trained again, and the run's throughput counts the
last attempt only. Under several processes a failed step is not retried (the other ranks wait in a collective).
"""

from __future__ import annotations

import gc
import logging

import torch
from accelerate.utils.memory import should_reduce_batch_size

from ablate.errors import BadInput

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, or what accelerate (and so lm-eval's ``auto`` batch size) reads as one."""
    return isinstance(exc, torch.OutOfMemoryError) or should_reduce_batch_size(exc)


def half(rows: int) -> int:
    return (rows + 1) // 2


def record_halving(retries: list[dict], during: str, rows: int, tokens: int) -> None:
    """One out-of-memory error on ``rows`` rows of ``tokens`` tokens: a line in the run's log, one in ``retries``."""
    log.warning("out of memory on %d rows of %d tokens during %s: retrying with %d", rows, tokens, during, half(rows))
    retries.append({"during": during, "rows": rows, "tokens": tokens, "retry_rows": half(rows)})


def one_row_error(during: str, tokens: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"out of memory on 1 row of {tokens} tokens during {during}, even after halving the batch: "
        "lower --max-length, use a smaller --dtype, or free the device")


def generate_in_halves(generate, context: torch.Tensor, attention_mask: torch.Tensor,
                       pad_token_id: int) -> torch.Tensor:
    """``generate(context, attention_mask)`` for the whole batch, or (when it returns None: out of memory)
    for each half in turn, the outputs joined as ``transformers.generate`` returns one batch.

    The halves keep the batch's width and left padding, so every row's tokens, positions and mask are
    exactly those of the unsplit batch, and upstream's ``generate_until`` still cuts the prompt off at
    ``context.shape[1]``. Greedy decoding of a row depends on that row alone, so its tokens are those of
    the unsplit batch (bit for bit as far as the kernels give each row the same arithmetic whatever the
    batch size; on CPU float32 the tests find them identical). A half stops when its own rows are done,
    so the shorter output is padded on the right with ``pad_token_id``, as ``generate`` pads a row that
    finished early. One thing differs from one call: lm-eval's stop-sequence criterion stops a batch only
    when every row has met its stop string, so a row past its stop string goes on generating in the
    unsplit batch and may be padding in a half. The text is unaffected: ``generate_until`` cuts it at the
    stop string.
    """
    out = generate(context, attention_mask)
    if out is not None:
        return out
    first = half(context.shape[0])
    parts = [generate_in_halves(generate, context[rows], attention_mask[rows], pad_token_id)
             for rows in (slice(0, first), slice(first, None))]
    width = max(part.shape[1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1]), value=pad_token_id)
                      for part in parts])


# ---------------------------------------------------------------- training


class StepOutOfMemory(torch.OutOfMemoryError):
    """A training micro-batch (forward and backward) ran out of memory: at which optimizer step, on what."""

    def __init__(self, step: int, rows: int, tokens: int):
        super().__init__(f"out of memory in training step {step} on a micro-batch of {rows} rows, {tokens} tokens")
        self.step, self.rows, self.tokens = step, rows, tokens


def smaller_micro_batch(rows: int) -> int | None:
    """The micro-batch to retry with: half of ``rows`` (the largest divisor below it when ``rows`` is odd), or None
    at one row. A divisor keeps each optimizer step's rows: the Trainer takes micro-batches in turn from one sampler
    order, so ``m`` micro-batches of ``rows / m`` rows are the rows, in order, of one micro-batch of ``rows``."""
    return next((d for d in range(rows // 2, 0, -1) if rows % d == 0), None)


def halve_training(retries: list[dict], failed: StepOutOfMemory, micro_batch: int,
                   accumulation: int) -> tuple[int, int]:
    """One out-of-memory error in training: the new ``(micro_batch, gradient_accumulation_steps)``, a line in the
    run's log, one entry in ``retries`` (the caller adds ``resumed_from``). BadInput (one line) when one row does
    not fit."""
    smaller = None if failed.rows <= 1 else smaller_micro_batch(micro_batch)
    if smaller is None:
        raise BadInput(f"out of memory in training step {failed.step} on 1 row of {failed.tokens} tokens, even at "
                       "micro-batch 1: lower --max-length, train a LoRA adapter (--lora-r), turn on "
                       "--gradient-checkpointing, or use a smaller --dtype or a bigger device")
    accumulation *= micro_batch // smaller
    log.warning("out of memory in training step %d on %d rows of %d tokens: micro-batch %d -> %d, gradient "
                "accumulation %d (the same %d rows a step)", failed.step, failed.rows, failed.tokens, micro_batch,
                smaller, accumulation, smaller * accumulation)
    retries.append({"step": failed.step, "rows": failed.rows, "tokens": failed.tokens, "micro_batch": smaller,
                    "gradient_accumulation_steps": accumulation})
    return smaller, accumulation


def release(trainer) -> None:
    """Free what a failed training attempt holds on the device (optimizer state, gradients) before the retry."""
    model = trainer.model
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
