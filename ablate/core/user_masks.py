"""Masks from a file: ``--mask path/to/masks.py:name``, without editing the package.

    ablate stage2 --mask examples/masks.py:prompt_window --model ... --tasks ...

The file defines ``name(prompt_lens, segment_ids)`` returning a function in transformers' mask-function form
(``masking_utils``): ``(batch_idx, head_idx, q_idx, kv_idx) -> bool``, True where query ``q_idx`` may attend
key ``kv_idx`` of row ``batch_idx``. ``prompt_lens`` (``[rows]``) is each row's number of prompt tokens and
``segment_ids`` (``[rows, length]``) each prompt token's segment (0 for every prompt token unless the run cuts
prompts into segments: the tasks' few-shot delimiter, stage 3's ``--segment-separator``), -1 after the prompt.
The function is evaluated on index tensors that broadcast (``batch_idx`` ``[rows, 1, 1]``, ``q_idx``
``[1, length, 1]``, ``kv_idx`` ``[1, 1, length]``), as transformers evaluates its own mask functions, so it is
written with tensor operations (``&``, ``|``, ``torch.where``), not ``if``. Indices are each row's own positions
(0 at its first token, padding and packing never shift them). A sliding-window layer also cuts keys more than
its window behind the query.

What the mask is, is decided from the function itself, on probe rows (every prompt length of rows up to
``PROBE_LENGTHS``, one segment and several), never from the user's word:

- it must give each row the same mask alone and in a batch, and the same mask on a row's tokens whatever the
  width of the batch (else a row's scores would depend on its batch-mates: refused);
- every position must attend to something (else refused);
- ``leaks_labels``: some position sees a later token at or after the prompt's end (a scored or supervised token
  seeing its own future): refused in training, flagged (``leaky``) in evaluation, as ``full_bidir`` is;
- ``shares_context``: no prompt position sees a token after the prompt: only then does evaluation compute a
  context once for all its continuations (ablate.core.packing); else one row per request;
- ``causal_continuation``: positions after the prompt attend exactly causally: only then can generation prefill
  the prompt under the mask and decode causally from the cache (else generative tasks are refused);
- ``needs_segments``: the mask changes with the segments (then the run must cut prompts into segments).

Probes cannot see every length: every real batch's mask is also checked against the leak and context verdicts
when it is built (``overlay``), and a row that breaks one stops the run with one line.

A mask's name in runs is ``name@`` and the first 8 hex digits of the file's sha256: an edited file is another
mask. Configs record the file (path, name, sha256); a run re-read from its config.json (``--resume``) loads the
file again and refuses it if its digest changed.

No library loads mask functions from files (transformers' mask functions are code in the package), hence this.
Loading, naming and registering a file's mask: ablate.core.mask_files; this module evaluates, probes and lays out.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ablate.errors import BadInput

SPEC = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
PROBE_LENGTHS = 12  # probe rows of 1 to this many tokens, every prompt length
PROBE_WIDER = 7  # ... evaluated again in a frame this much wider


def parse(value: str) -> tuple[Path, str] | None:
    """``(file, function name)`` of a ``path.py:name`` mask, else None."""
    found = SPEC.match(value or "")
    return (Path(found["path"]).expanduser(), found["name"]) if found else None


def line(exc: BaseException) -> str:
    """An exception's first line (its type when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def evaluate(fn, label: str, prompt_lens: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, length, length]`` bool: ``fn``'s mask on rows in their own frame (``segment_ids``' width)."""
    rows, length = segment_ids.shape
    device = segment_ids.device
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(length, device=device)[None, :, None]
    kv = torch.arange(length, device=device)[None, None, :]
    try:
        inner = fn(prompt_lens, segment_ids)
        out = inner(b, torch.zeros_like(b), q, kv)
        out = torch.as_tensor(out, device=device)
        if out.dtype != torch.bool:
            raise TypeError(f"it returned {out.dtype}, not bool")
        return torch.broadcast_to(out, (rows, length, length)).clone()
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"mask '{label}' cannot be evaluated on index tensors ({type(exc).__name__}: {line(exc)}); "
                       "write it with tensor operations, as transformers' mask functions are") from None


def _probe_rows(segmented: bool):
    """Probe layouts ``(length, prompt length, segments per prompt token)``: every prompt length of rows up to
    PROBE_LENGTHS tokens; ``segmented``: prompts cut every two tokens."""
    for n in range(1, PROBE_LENGTHS + 1):
        for p in range(0, n + 1):
            yield n, p, [t // 2 if segmented else 0 for t in range(p)]


def _frame(rows, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_lens = torch.tensor([p for _, p, _ in rows])
    segment_ids = torch.tensor([s + [-1] * (width - len(s)) for _, _, s in rows])
    return prompt_lens, segment_ids


def probe(fn, label: str) -> dict:
    """The mask's properties, decided on probe rows (module docstring); BadInput when it cannot be a mask."""
    verdict = {"leaks_labels": False, "shares_context": True, "causal_continuation": True, "needs_segments": False}
    per_layout = {}
    for segmented in (False, True):
        rows = list(_probe_rows(segmented))
        batch = evaluate(fn, label, *_frame(rows, PROBE_LENGTHS))
        wider = evaluate(fn, label, *_frame(rows, PROBE_LENGTHS + PROBE_WIDER))
        per_layout[segmented] = batch
        for i, (n, p, segments) in enumerate(rows):
            alone = evaluate(fn, label, *_frame([(n, p, segments)], n))[0]
            where = f"a row of {n} tokens with a prompt of {p}"
            if not torch.equal(batch[i, :n, :n], alone) or not torch.equal(wider[i, :n, :n], alone):
                raise BadInput(f"mask '{label}' gives {where} another mask in a batch or a wider frame than "
                               "alone: a row's scores would depend on its batch-mates")
            empty = (~alone.any(-1)).nonzero()
            if len(empty):
                raise BadInput(f"mask '{label}' leaves position {int(empty[0])} of {where} nothing to attend")
            q = torch.arange(n)[:, None]
            k = torch.arange(n)[None, :]
            if (alone & (k > q) & (k >= p)).any():
                verdict["leaks_labels"] = True
            if (alone & (q < p) & (k >= p)).any():
                verdict["shares_context"] = False
            if not torch.equal(alone[p:], (k <= q).expand(n, n)[p:]):
                verdict["causal_continuation"] = False
    verdict["needs_segments"] = not torch.equal(per_layout[False], per_layout[True])
    return verdict


def overlay(spec, attention_mask: torch.Tensor, prefix_lens: torch.Tensor, prompt_segments: torch.Tensor | None,
            segments: torch.Tensor | None, positions: torch.Tensor | None, rows: bool) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """``(allowed [batch, length, length], positions [batch, length])``: the user mask ``spec`` on a batch in any
    layout, each row's pattern evaluated in its own frame. ``rows``: stage 3's packed rows (``segments`` names each
    token's row); else one row per batch line (left or right padded, or evaluation's shared context and its
    continuations, whose ``positions`` restart after the context). Checked against the mask's verdicts."""
    real = attention_mask.bool()
    batch, width = real.shape
    device = real.device
    at = torch.arange(width, device=device)
    if rows:
        owner, pos = segments, positions
        prompt_lens = prefix_lens.to(device)
    else:
        owner = torch.where(real, torch.arange(batch, device=device)[:, None], -1)
        pos = positions if positions is not None else (real.long().cumsum(-1) - 1).clamp(min=0)
        prompt_lens = (real & (at[None, :] < prefix_lens.to(device)[:, None])).sum(-1)
    valid = owner >= 0
    n_rows = int(prompt_lens.shape[0])
    frame = int(pos[valid].max()) + 1 if valid.any() else 1
    own = torch.full((n_rows, frame), -1, dtype=torch.long, device=device)
    own_pos = torch.arange(frame, device=device)[None, :]
    if prompt_segments is not None:
        own[owner[valid], pos[valid]] = prompt_segments.to(device)[valid].long()
    else:  # no segments cut: the whole prompt is segment 0
        own = torch.where(own_pos < prompt_lens[:, None], 0, own)
    pattern = evaluate(spec.pattern, spec.name, prompt_lens, own)
    _check(spec, pattern, prompt_lens, owner, pos, valid)
    r = owner.clamp(min=0)
    allowed = pattern[r[:, :, None], pos[:, :, None], pos[:, None, :]]
    allowed = allowed & (owner[:, :, None] == owner[:, None, :]) & valid[:, None, :]
    allowed = torch.where(valid[:, :, None], allowed, True)  # padding queries: never empty (no NaN); never read
    return allowed, pos


def _check(spec, pattern, prompt_lens, owner, pos, valid) -> None:
    """A real batch's rows against the mask's probe verdicts (leak, context independence)."""
    lengths = torch.zeros(len(prompt_lens), dtype=torch.long, device=pattern.device)
    lengths = lengths.scatter_reduce(0, owner[valid], pos[valid] + 1, reduce="amax")
    frame = pattern.shape[-1]
    q = torch.arange(frame, device=pattern.device)[None, :, None]
    k = torch.arange(frame, device=pattern.device)[None, None, :]
    inside = (q < lengths[:, None, None]) & (k < lengths[:, None, None])
    p = prompt_lens[:, None, None]
    if not spec.leaks_labels and (pattern & inside & (k > q) & (k >= p)).any():
        raise BadInput(f"mask '{spec.name}' let a position see a later token after the prompt on a real row, which "
                       "its probes did not show: it leaks labels on rows this long; refused")
    if spec.shares_context and (pattern & inside & (q < p) & (k >= p)).any():
        raise BadInput(f"mask '{spec.name}' let a prompt position see past the prompt on a real row, which its "
                       "probes did not show; refused (its contexts were computed once for every continuation)")
