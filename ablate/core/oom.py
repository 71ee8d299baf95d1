"""Out of memory while scoring or generating: halve the batch, retry, and record it.

    python -m pytest tests/test_oom.py -q

lm-eval's ``batch_size="auto"`` probes once; a later batch can still run out of
memory (a longer generation, fragmentation, another process on the GPU). Scoring
retries the failed batch with half its rows and keeps that size for the rest of
the call; generation splits the failed batch into halves (recursively) and joins
their outputs into the tensor one call would have returned. Each halving is one
WARNING line in the run's log and one entry of the model's ``oom_retries``,
which ``metrics.json`` records. The retry loops themselves live in
``PrefillMaskLM`` (ablate.core.lm_eval_model); this module holds the pure parts.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils.memory import should_reduce_batch_size

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
