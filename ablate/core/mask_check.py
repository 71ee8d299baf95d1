"""The runtime mask check: the run's own stack under its mask against an eager reference, on a few real rows.

    python -m pytest tests/test_mask_check.py -q
    python -c "from ablate.core.mask_check import check_mask; from ablate.core.models import load_model; \
m, _ = load_model('/tmp/tiny-llama', 'cpu', 'float32'); print(check_mask(m, 'prefill_bidir', [([5, 9, 17, 33, 4], 3)]))"

A prefix mask can fail silently: a backend or library version that drops a 4D mask, or takes
SDPA's ``is_causal`` path, computes the causal forward and the run reports causal numbers as the
ablation (reported against LLM2Vec at batch size 1 and against NeMo's mask override on newer
transformers). So before the first batch of every non-causal run, on a few real rows cut short
(the last ``CONTEXT_TOKENS`` of the prompt, the first ``CONTINUATION_TOKENS`` after it):

1. the run path's logits (the call the run makes: its model, attention backend, dtype, device and the
   mask built by ``ablate.core.masks``) must equal a reference: the same model on the eager attention
   path fed a 4D additive mask built here from the definition alone (``reference_mask``, no
   ``masks.py`` or transformers mask code), within a tolerance calibrated on the causal mask: the run
   path against the eager reference under the causal mask, in the same dtype;
2. and must differ from the causal logits at prompt positions by more than that tolerance; else the
   mask did not take effect.

``check_mask`` returns a JSON-able dict (recorded as ``lm.mask_check`` and in metrics.json / summary.json)
and raises ``MaskCheckFailed`` (a ``BadInput``: one line, exit 2) when either fails.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import transformers

from ablate.core import layer_masks
from ablate.core.models import base_model
from ablate.errors import BadInput

ROWS = 3  # rows checked
CONTEXT_TOKENS = 12  # prompt tokens kept per row (its last ones, so the boundary stays where the run has it)
CONTINUATION_TOKENS = 4  # tokens kept after the prompt
SEGMENT_TOKENS = 4  # segment masks: tokens kept of the segment before the prompt's last one ...
MAX_CHECK_TOKENS = 256  # ... unless that makes the kept prompt longer than this
CALIBRATION = 10  # the tolerance is this many times the causal run-vs-reference difference ...
FLOOR_EPS = 4  # ... or this many epsilons of the dtype x the logit scale (at least 1), whichever is larger
# ... or this share of the mask's own effect on the reference (masked vs causal logits at prompt positions):
# in float32 a 30-layer model's bidirectional sums drift from eager ~30x more than its causal ones do
# (SmolLM2-135M: 9.5e-4 against a causal 3.3e-5, for an effect of ~25), which a causal-only calibration
# would call a failure; a fallback to causal misses by the whole effect, a wrong boundary by a large part of it.
EFFECT_SHARE = 1e-3

# A row is (token ids, prefix length) or (token ids, prefix length, each prompt token's segment) for masks
# that read segments (segment_bidir); a forward maps rows (right-padded by it) and a mask name to logits.
CheckRow = tuple
Forward = Callable[[list[CheckRow], str], torch.Tensor]


class MaskCheckFailed(BadInput):
    """The run's logits under its mask are not the reference's, or are the causal ones."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def row_segments(row: CheckRow) -> list[int] | None:
    return list(row[2]) if len(row) > 2 and row[2] is not None else None


def _extra_allowed(mask_name: str, in_prompt_q: torch.Tensor, in_prompt_k: torch.Tensor,
                   segment_q: torch.Tensor | None = None, segment_k: torch.Tensor | None = None) -> torch.Tensor:
    """What each mask lets a query see beyond causal attention, from the definitions in docs/masks.md."""
    if mask_name == "causal":
        return torch.zeros_like(in_prompt_q & in_prompt_k)
    if mask_name == "prefill_bidir":  # prompt positions attend to every prompt position
        return in_prompt_q & in_prompt_k
    if mask_name == "segment_bidir":  # prompt positions attend to every prompt position of their segment
        if segment_q is None:
            raise BadInput("the mask check of 'segment_bidir' needs each row's prompt segments")
        return in_prompt_q & in_prompt_k & (segment_q == segment_k)
    if mask_name == "full_bidir":  # every position attends to every position
        return torch.ones_like(in_prompt_q & in_prompt_k)
    raise BadInput(f"the mask check has no reference definition of mask '{mask_name}' "
                   "(add one to ablate.core.mask_check._extra_allowed)")


def reference_mask(mask_name: str, lengths: list[int], prefix_lens: list[int], width: int,
                   dtype: torch.dtype, window: int | None = None,
                   segments: list[list[int] | None] | None = None) -> torch.Tensor:
    """Additive ``[batch, 1, width, width]`` mask of right-padded rows: 0 may attend, dtype min may not.

    Causal attention within ``window`` (a sliding layer), plus the mask's extra reach; padding never.
    ``segments``: each row's prompt segments (a list per prompt token), for masks that read them.
    """
    q = torch.arange(width)[:, None]
    k = torch.arange(width)[None, :]
    causal = k <= q
    if window is not None:
        causal = causal & (q - k < window)
    from ablate.core.masks import MASKS

    user = MASKS[mask_name].pattern if mask_name in MASKS else None
    masks = []
    for i, (length, prefix) in enumerate(zip(lengths, prefix_lens, strict=True)):
        if user is not None:  # a mask from a file: its own function, on this row alone (ablate.core.user_masks)
            allowed = _user_reference(mask_name, user, length, prefix, segments[i] if segments else None, width)
            allowed = allowed & (k < length) & (q - k < window if window is not None else True)
            masks.append(torch.where(allowed, 0.0, torch.finfo(dtype).min))
            continue
        own = segments[i] if segments is not None else None
        seg_q = seg_k = None
        if own is not None:
            seg = torch.tensor(list(own) + [-1] * (width - len(own)))
            seg_q, seg_k = seg[:, None], seg[None, :]
        allowed = (causal | _extra_allowed(mask_name, q < prefix, k < prefix, seg_q, seg_k)) & (k < length)
        masks.append(torch.where(allowed, 0.0, torch.finfo(dtype).min))
    return torch.stack(masks)[:, None].to(dtype)


def _user_reference(mask_name: str, fn, length: int, prefix: int, segments, width: int) -> torch.Tensor:
    from ablate.core.user_masks import evaluate

    own = list(segments) if segments is not None else [0] * prefix
    ids = torch.tensor([own + [-1] * (length - len(own))])
    alone = evaluate(fn, mask_name, torch.tensor([prefix]), ids)[0]
    out = torch.zeros(width, width, dtype=torch.bool)
    out[:length, :length] = alone
    out[length:, :] = True  # padding queries read anything (never compared); padding keys are cut by the caller
    return out


def _layer_windows(config) -> dict[str, int | None]:
    """The model's kinds of attention layer and their window: what the reference must give each."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    return {kind: window if kind == "sliding_attention" else None for kind in set(kinds)}


def _padded(rows: list[CheckRow], device) -> tuple[torch.Tensor, list[int], int]:
    width = max(len(row[0]) for row in rows)
    ids = torch.tensor([row[0] + [0] * (width - len(row[0])) for row in rows], device=device)
    return ids, [len(row[0]) for row in rows], width


def masks_forward(model, autocast_dtype: torch.dtype | None = None) -> Forward:
    """The call stage 3's trainer makes: ``ablate.core.masks.model_attention_mask``, then the model's forward."""
    from ablate.core.masks import model_attention_mask

    def forward(rows: list[CheckRow], mask_name: str) -> torch.Tensor:
        device = _device(model)
        ids, lengths, width = _padded(rows, device)
        padding = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        prefix = torch.tensor([row[1] for row in rows], device=device)
        prompt_segments = _segments_tensor(rows, width, device)
        dtype = next(model.parameters()).dtype
        mask = model_attention_mask(model.config, mask_name, padding, prefix, dtype, prompt_segments=prompt_segments)
        with torch.no_grad(), _autocast(device, autocast_dtype), \
                layer_masks.forward_masks(model, mask_name, padding, prefix, dtype, built=mask,
                                          prompt_segments=prompt_segments):
            return model(input_ids=ids, attention_mask=mask).logits

    return forward


def _segments_tensor(rows: list[CheckRow], width: int, device) -> torch.Tensor | None:
    """The rows' prompt segments, right-padded with -1; None when the rows carry none."""
    if not rows or row_segments(rows[0]) is None:
        return None
    return torch.tensor([row_segments(row) + [-1] * (width - len(row[2])) for row in rows], device=device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


@contextmanager
def _eager(model):
    """The same model object on the eager attention path, switched back afterwards."""
    base = base_model(model)
    before = base.config._attn_implementation
    if before != "eager":
        base.set_attn_implementation("eager")
    try:
        yield base
    finally:
        if before != "eager":
            base.set_attn_implementation(before)


def _reference(model, rows: list[CheckRow], mask_name: str, autocast_dtype) -> torch.Tensor:
    device = _device(model)
    ids, lengths, width = _padded(rows, device)
    dtype = next(model.parameters()).dtype
    prefix = [row[1] for row in rows]
    segments = [row_segments(row) for row in rows]

    def by_kind(name):
        return {kind: reference_mask(name, lengths, prefix, width, dtype, window=window,
                                     segments=segments).to(device)
                for kind, window in _layer_windows(model.config).items()}

    masks = by_kind(mask_name)
    # Models declaring layer_types take a {layer type: mask} mapping, the others one mask.
    mask = masks if getattr(model.config, "layer_types", None) else next(iter(masks.values()))
    positions = torch.arange(width, device=device)[None].expand(len(rows), -1)
    per_layer = layer_masks.installed(model)  # the mask in the chosen layers, the definition's causal elsewhere
    layers = (nullcontext() if per_layer is None else
              per_layer.stock() if mask_name == "causal" else per_layer.apply(masks, by_kind("causal")))
    with _eager(model) as eager, torch.no_grad(), _autocast(device, autocast_dtype), layers:
        return eager(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor, rows: list[CheckRow], prompt_only: bool = False) -> float:
    """Largest |a - b| over the real positions (``prompt_only``: the prompt positions but its last)."""
    out = 0.0
    for i, (tokens, prefix, *_) in enumerate(rows):
        end = max(prefix - 1, 0) if prompt_only else len(tokens)
        if end:
            out = max(out, float((a[i, :end].float() - b[i, :end].float()).abs().max()))
    return out


def check_rows(pairs: list[tuple[list[int], list[int]]], rows: int = ROWS,
               segments: list[list[int]] | None = None) -> list[CheckRow]:
    """Short check rows from ``(prompt tokens, what follows)`` pairs: the first ``rows`` distinct ones.

    A prompt of one token gives nothing to compare at prompt positions; such pairs are skipped. ``segments``:
    each prompt's token segments (``segment_bidir``), kept with the rows; a kept prompt end that lies in one
    segment is extended back to ``SEGMENT_TOKENS`` tokens of the segment before, when the prompt has one, so
    the check sees a boundary between segments.
    """
    out: list[CheckRow] = []
    for i, (prompt, after) in enumerate(pairs):
        prompt = list(prompt)
        keep = min(CONTEXT_TOKENS, len(prompt))
        if segments is not None:
            own = list(segments[i])
            boundary = max((j for j in range(1, len(own)) if own[j] != own[j - 1]), default=0)
            if boundary and len(prompt) - boundary >= keep:  # the kept end lies in the last segment only
                keep = min(len(prompt) - boundary + SEGMENT_TOKENS, MAX_CHECK_TOKENS, len(prompt))
        start = len(prompt) - keep
        row = (prompt[start:] + list(after)[:CONTINUATION_TOKENS], keep)
        if segments is not None:
            row = (*row, tuple(segments[i][start:]))
        if keep >= 2 and row not in out:
            out.append(row)
        if len(out) == rows:
            break
    return out


def check_mask(model, mask_name: str, rows: list[CheckRow], forward: Forward | None = None,
               autocast_dtype: torch.dtype | None = None, where: str = "evaluation", strict: bool = True) -> dict:
    """Check ``mask_name`` on ``rows`` through ``forward`` (the run's path; default ``masks_forward``).

    Returns the JSON-able record; with ``strict`` raises ``MaskCheckFailed`` (one line) when it fails.
    """
    forward = forward or masks_forward(model, autocast_dtype)
    base = base_model(model)
    per_layer = layer_masks.installed(model)
    record = {
        "mask": mask_name, "where": where, "backend": base.config._attn_implementation, "reference": "eager",
        **({"layers": layer_masks.record(tuple(sorted(per_layer.layers)), len(per_layer.modules))}
           if per_layer else {}),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(_device(model)),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "rows": len(rows), "tokens": sum(len(row[0]) for row in rows),
    }
    if not rows:
        return {**record, "passed": None, "skipped": "no row with a prompt of two tokens or more"}
    training = model.training
    model.eval()
    try:
        run_masked, run_causal = forward(rows, mask_name), forward(rows, "causal")
        ref_masked = _reference(model, rows, mask_name, autocast_dtype)
        ref_causal = _reference(model, rows, "causal", autocast_dtype)
    finally:
        model.train(training)
    causal_diff = _max_diff(run_causal, ref_causal, rows)
    scale = max(1.0, _max_diff(ref_causal, torch.zeros_like(ref_causal), rows))
    floor = FLOOR_EPS * torch.finfo(run_masked.dtype).eps * scale
    effect = _max_diff(ref_masked, ref_causal, rows, prompt_only=True)
    tolerance = max(CALIBRATION * causal_diff, floor, EFFECT_SHARE * effect)
    max_diff = _max_diff(run_masked, ref_masked, rows)
    vs_causal = _max_diff(run_masked, run_causal, rows, prompt_only=True)
    record.update(max_diff=max_diff, tolerance=tolerance, causal_diff=causal_diff, floor=floor, effect=effect,
                  masked_vs_causal=vs_causal, differs_from_causal=vs_causal > tolerance)
    record["passed"] = max_diff <= tolerance and record["differs_from_causal"]
    if strict and not record["passed"]:
        raise MaskCheckFailed(failure_line(record), record)
    return record


def failure_line(record: dict) -> str:
    stack = f"{record['backend']}, {record['dtype']}, {record['device']}, transformers {record['transformers']}"
    if not record["differs_from_causal"]:
        return (f"mask check failed ({record['where']}): under '{record['mask']}' the logits at prompt positions "
                f"equal the causal ones (max difference {record['masked_vs_causal']:.3g}, tolerance "
                f"{record['tolerance']:.3g}) on {stack}: the mask did not take effect")
    return (f"mask check failed ({record['where']}): under '{record['mask']}' the logits differ from the eager "
            f"reference by {record['max_diff']:.3g} (tolerance {record['tolerance']:.3g}, calibrated on the causal "
            f"mask and the mask's own effect {record['effect']:.3g}) on {stack}")


def check_training_mask(model, batch: dict, mask: str, rows: int = ROWS,
                        autocast_dtype: torch.dtype | None = None, strict: bool = True) -> dict:
    """Stage 3's check before step 1, on a batch as ``ablate.core.sft_data.Collator`` gives it.

    ``batch`` holds ``input_ids`` and ``attention_mask`` (right-padded) and ``prefix_len``; the run path
    is the trainer's (``masks_forward``). Raises ``MaskCheckFailed`` when the mask did not take effect.
    """
    pairs, segments = [], [] if "prompt_segments" in batch else None
    for i, (ids, real, prefix) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["prefix_len"],
                                                strict=True)):
        tokens = ids[real.bool()].tolist()
        pairs.append((tokens[: int(prefix)], tokens[int(prefix):]))
        if segments is not None:
            segments.append(batch["prompt_segments"][i][: int(prefix)].tolist())
    return check_mask(model, mask, check_rows(pairs, rows, segments), masks_forward(model, autocast_dtype),
                      autocast_dtype, where="training", strict=strict)
