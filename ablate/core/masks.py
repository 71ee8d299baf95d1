"""Named attention masks: `causal`, `prefill_bidir`, `full_bidir`.

    python -c "from ablate.core.masks import dense_mask; import torch; \
print(dense_mask('prefill_bidir', torch.tensor([2]), torch.ones(1, 4, dtype=torch.bool)).int())"

A mask is described by *block sequence ids*, the format transformers'
``masking_utils`` understands: tokens sharing a non-negative id attend to each
other in both directions, id -1 keeps plain causality. The actual 4D mask (a
boolean tensor for sdpa, an additive float tensor for eager, a ``BlockMask`` for
flex attention) is then built by ``create_causal_mask`` /
``create_sliding_window_causal_mask`` for the model's own attention
implementation, so every backend gets the format it needs and padding is never
attended. Adding a mask is one function ``(prefix_lens, attention_mask) ->
block ids | None`` plus a ``@register`` line.

Packed layouts add an and-mask on segments: evaluation's shared contexts
(``tree_function``, ablate.core.packing) and stage 3's packed rows
(``packed_rows_mask``, ablate.core.sft_packing), where each row's block ids are
those it has alone, made unique to the row, so every registered mask packs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
from transformers import masking_utils

from ablate.core.user_masks import overlay
from ablate.errors import BadInput

# (prefix_lens [batch], attention_mask [batch, length], prompt_segments [batch, length] or None) -> block ids or None
BlockIdsFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


@dataclass(frozen=True)
class MaskSpec:
    name: str
    block_ids: BlockIdsFn
    description: str
    # True when a position can see tokens after itself that training would supervise.
    leaks_labels: bool
    # True when the prompt's keys and values never depend on what follows it, so one computation of a
    # prompt serves every continuation (ablate.core.packing).
    shares_context: bool
    # True when the mask reads the prompt's segments (``prompt_segments``: each prompt token's segment index).
    needs_segments: bool = False
    # A mask from a file (ablate.core.user_masks): its ``(prompt_lens, segment_ids) -> mask function``, used in
    # place of block ids; None for the registered block-id masks.
    pattern: Callable | None = None
    # True when tokens after the prompt attend exactly causally (generation decodes causally from the cache).
    causal_continuation: bool = True
    source: dict | None = None  # a mask from a file: {path, name, sha256}


MASKS: dict[str, MaskSpec] = {}


def register(name: str, description: str, leaks_labels: bool = False, shares_context: bool = True,
             needs_segments: bool = False):
    def wrap(fn: BlockIdsFn) -> BlockIdsFn:
        MASKS[name] = MaskSpec(name, fn, description, leaks_labels, shares_context, needs_segments)
        return fn

    return wrap


@register("causal", "every token attends to itself and earlier tokens (the model's native mask)")
def _causal(prefix_lens: torch.Tensor, attention_mask: torch.Tensor, prompt_segments=None) -> None:
    return None


@register(
    "prefill_bidir",
    "prompt tokens attend to each other in both directions; later tokens attend causally",
)
def _prefill_bidir(prefix_lens: torch.Tensor, attention_mask: torch.Tensor, prompt_segments=None) -> torch.Tensor:
    return torch.where(_in_prompt(prefix_lens, attention_mask), 0, -1)


@register(
    "segment_bidir",
    "each segment of the prompt attends to itself in both directions, causally to earlier segments; later "
    "tokens attend causally",
    needs_segments=True,
)
def _segment_bidir(prefix_lens: torch.Tensor, attention_mask: torch.Tensor,
                   prompt_segments: torch.Tensor | None) -> torch.Tensor:
    if prompt_segments is None:
        raise BadInput("mask 'segment_bidir' needs the prompt's segments (evaluation: the task's few-shot "
                       "delimiter; stage 3: --segment-separator)")
    segments = prompt_segments.to(attention_mask.device)
    return torch.where(_in_prompt(prefix_lens, attention_mask) & (segments >= 0), segments, -1)


def _in_prompt(prefix_lens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions[None, :] < prefix_lens.to(attention_mask.device)[:, None]) & attention_mask.bool()


@register(
    "full_bidir",
    "every token attends to every token (diagnostic only: leaks labels in training)",
    leaks_labels=True,
    shares_context=False,
)
def _full_bidir(prefix_lens: torch.Tensor, attention_mask: torch.Tensor, prompt_segments=None) -> torch.Tensor:
    return torch.where(attention_mask.bool(), 0, -1)


def get_mask(name: str) -> MaskSpec:
    if name not in MASKS:
        raise BadInput(f"unknown mask '{name}'; known masks: {', '.join(MASKS)}")
    return MASKS[name]


def check_attention_backend(mask_name: str, attn_implementation: str | None) -> None:
    """FlashAttention takes only a padding mask and a causal flag: it cannot express a prefix mask."""
    if mask_name != "causal" and attn_implementation and "flash" in attn_implementation:
        raise BadInput(
            f"mask '{mask_name}' cannot run on attention implementation '{attn_implementation}' "
            "(FlashAttention only supports causal masks); use --attn-implementation sdpa, eager or flex_attention"
        )


def mask_kinds(config) -> list[str]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return sorted(set(layer_types))
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]


def tree_function(segments: torch.Tensor, positions: torch.Tensor, window: int | None = None):
    """Packed rows (ablate.core.packing): a continuation sees the context (segment 0) and itself only.

    A sliding window is measured in position ids, which restart after the context for each continuation.
    """
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        seg_kv = segments[batch_idx, kv_idx]
        ok = (seg_kv == 0) | (seg_kv == segments[batch_idx, q_idx])
        if window is not None:
            ok = ok & (positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window)
        return ok

    return inner


def row_function(segments: torch.Tensor, positions: torch.Tensor, window: int | None = None):
    """Packed training rows (ablate.core.sft_packing): a token sees its own row only.

    Padding (segment -1) may read what precedes it, so no query is left with nothing to attend (sdpa would give
    NaN there, and NaN values spread through the zero weights of later layers). A sliding window is measured
    in position ids, which restart for each row.
    """
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        seg_q = segments[batch_idx, q_idx]
        ok = (segments[batch_idx, kv_idx] == seg_q) | (seg_q < 0)
        if window is not None:
            ok = ok & (positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window)
        return ok

    return inner


def model_attention_mask(
    config,
    mask_name: str,
    attention_mask: torch.Tensor,
    prefix_lens: torch.Tensor,
    dtype: torch.dtype,
    segments: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    prompt_segments: torch.Tensor | None = None,
):
    """What to pass as ``attention_mask=`` to a decoder's forward for this mask.

    ``attention_mask`` is the 2D padding mask (1 = real token), ``prefix_lens``
    the number of prompt tokens of each row. Causal returns the 2D mask untouched,
    so the model takes exactly its stock path. ``segments`` and ``positions``
    describe packed rows (a shared prompt followed by several continuations): the
    mask then also keeps each continuation to the prompt and itself. ``prompt_segments`` (same shape as
    ``attention_mask``): each prompt token's segment index, -1 elsewhere, for masks that read it
    (``segment_bidir``).
    """
    check_attention_backend(mask_name, config._attn_implementation)
    block_ids, same_segment, extra = _tree_parts(mask_name, attention_mask, prefix_lens, segments, positions,
                                                 prompt_segments)
    if block_ids is None and same_segment is None and extra is None:
        return attention_mask
    return _build(config, mask_name, attention_mask, block_ids, dtype, same_segment, overlay=extra)


def _tree_parts(mask_name, attention_mask, prefix_lens, segments, positions, prompt_segments=None):
    """Block ids, and-mask and overlay (a mask from a file) of evaluation's layouts: plain rows, or a shared
    prompt and its continuations."""
    spec = get_mask(mask_name)
    packed = segments is not None and int(segments.max()) > 1  # one continuation per row is the plain layout
    same_segment = (lambda window: tree_function(segments, positions, window)) if packed else None
    if spec.pattern is not None:
        return None, same_segment, overlay(spec, attention_mask, prefix_lens, prompt_segments, segments,
                                           positions if packed else None, rows=False)
    return spec.block_ids(prefix_lens, attention_mask, prompt_segments), same_segment, None


def masks_by_kind(config, mask_name: str, attention_mask: torch.Tensor, prefix_lens: torch.Tensor,
                  dtype: torch.dtype, segments: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                  rows: bool = False, prompt_segments: torch.Tensor | None = None) -> dict:
    """``{layer kind: 4D mask}`` (``full_attention``, ``sliding_attention``) of ``model_attention_mask``'s layouts
    (``rows``: ``packed_rows_mask``'s), built as they build it, even for ``causal`` (whose plain layout the model
    otherwise builds itself): what ablate.core.layer_masks hands each layer. A kind's mask may be None under sdpa
    (transformers' "no mask needed: causal" answer, which sdpa reads as causal)."""
    check_attention_backend(mask_name, config._attn_implementation)
    if rows:
        block_ids, extra = _rows_parts(mask_name, attention_mask, prefix_lens, segments, positions, prompt_segments)
        same_segment = lambda window: row_function(segments, positions, window)  # noqa: E731
    else:
        block_ids, same_segment, extra = _tree_parts(mask_name, attention_mask, prefix_lens, segments, positions,
                                                     prompt_segments)
    return _build(config, mask_name, attention_mask, block_ids, dtype, same_segment, by_kind=True, overlay=extra)


def packed_rows_mask(config, mask_name: str, attention_mask: torch.Tensor, prefix_lens: torch.Tensor,
                     segments: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                     prompt_segments: torch.Tensor | None = None):
    """``attention_mask=`` for rows packed side by side (ablate.core.sft_packing): each row sees itself only, and
    within itself exactly what ``mask_name`` gives it unpacked.

    ``segments`` holds each token's row (an index into ``prefix_lens``, -1 on padding) and ``positions`` its
    position in its row. Every mask, ``causal`` too, needs the 4D mask here: the 2D padding mask would let a
    row see the rows before it. ``prompt_segments``: as ``model_attention_mask``'s, in the packed layout.
    """
    check_attention_backend(mask_name, config._attn_implementation)
    block_ids, extra = _rows_parts(mask_name, attention_mask, prefix_lens, segments, positions, prompt_segments)
    return _build(config, mask_name, attention_mask, block_ids, dtype,
                  lambda window: row_function(segments, positions, window), overlay=extra)


def _rows_parts(mask_name, attention_mask, prefix_lens, segments, positions, prompt_segments):
    """Block ids or overlay (a mask from a file) of stage 3's packed rows."""
    spec = get_mask(mask_name)
    if spec.pattern is not None:
        return None, overlay(spec, attention_mask, prefix_lens, prompt_segments, segments, positions, rows=True)
    return packed_block_ids(mask_name, prefix_lens, segments, positions, prompt_segments), None


def packed_block_ids(mask_name: str, prefix_lens: torch.Tensor, segments: torch.Tensor,
                     positions: torch.Tensor, prompt_segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask's block ids of packed rows: each row's own, computed as if it stood alone (right-padded, as the
    padded collator gives it), its non-negative ids offset to be unique to the row."""
    real = segments >= 0
    rows, at = segments[real], positions[real]
    lengths = torch.bincount(rows, minlength=prefix_lens.shape[0])
    alone = torch.arange(int(lengths.max()), device=segments.device)[None, :] < lengths[:, None]
    own_segments = None
    if prompt_segments is not None:  # each row's prompt segments as it has them alone
        own_segments = torch.full(alone.shape, -1, dtype=prompt_segments.dtype, device=segments.device)
        own_segments[rows, at] = prompt_segments.to(segments.device)[real]
    ids = get_mask(mask_name).block_ids(prefix_lens.to(segments.device), alone, own_segments)
    if ids is None:
        return None
    span = max(int(ids.max()) + 1, 1)
    unique = torch.where(ids >= 0, ids + span * torch.arange(len(ids), device=ids.device)[:, None], -1)
    out = torch.full_like(segments, -1)
    out[real] = unique[rows, at]
    return out


def _build(config, mask_name: str, attention_mask: torch.Tensor, block_ids: torch.Tensor | None,
           dtype: torch.dtype, same_segment: Callable | None, by_kind: bool = False, overlay=None):
    """The model's 4D mask(s) from block ids, per kind of attention layer, via transformers' own builders.

    ``same_segment(window)`` is the packed layouts' and-mask; it carries the window itself, measured in position
    ids (the sliding builder measures it in row indices). ``overlay``: ``(allowed, positions)`` of a mask from a
    file (ablate.core.user_masks), the whole pattern (or-ed onto causal and and-ed: exactly ``allowed``), a
    sliding layer's window cutting keys more than its window behind the query, in position ids.
    """
    batch, length = attention_mask.shape
    # Only the shape, dtype and device of inputs_embeds are read by the mask builders.
    embeds = torch.empty(batch, length, 0, dtype=dtype, device=attention_mask.device)
    kwargs = dict(config=config, inputs_embeds=embeds, attention_mask=attention_mask, block_sequence_ids=block_ids,
                  **{_CACHE_KWARG: None})
    kinds = mask_kinds(config)
    unknown = [k for k in kinds if k not in ("full_attention", "sliding_attention")]
    if unknown:
        raise BadInput(f"mask '{mask_name}' does not support layer types {unknown} of this model")
    masks = {}
    for kind in kinds:
        window = config.sliding_window if kind == "sliding_attention" else None
        if overlay is not None:  # the file's pattern, within the layout's rows and the layer's window
            allowed, positions = overlay
            pattern = lambda b, h, q, kv: allowed[b, q, kv]  # noqa: E731
            parts = [pattern] + ([same_segment(None)] if same_segment is not None else []) + (
                [lambda b, h, q, kv, w=window: positions[b, q] - positions[b, kv] < w] if window is not None else [])
            masks[kind] = masking_utils.create_causal_mask(**kwargs, or_mask_function=pattern,
                                                           and_mask_function=masking_utils.and_masks(*parts))
        elif same_segment is not None:
            masks[kind] = masking_utils.create_causal_mask(**kwargs, and_mask_function=same_segment(window))
        elif kind == "sliding_attention":
            masks[kind] = masking_utils.create_sliding_window_causal_mask(**kwargs)
        else:
            masks[kind] = masking_utils.create_causal_mask(**kwargs)
    # Models declaring layer_types (Qwen2/3) take a mapping; the others one mask.
    return masks if by_kind or getattr(config, "layer_types", None) else masks[kinds[0]]


# transformers 5.2x renamed the mask builders' `past_key_values` to `cache` (the old name warns until 5.40).
_CACHE_KWARG = ("cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters
                else "past_key_values")


def dense_mask(mask_name: str, prefix_lens: torch.Tensor, attention_mask: torch.Tensor,
               prompt_segments: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[batch, query, key]`` view of a mask (True = may attend), via the sdpa builder."""
    spec = get_mask(mask_name)
    attention_mask = attention_mask.bool()
    if spec.pattern is not None:
        allowed, _ = overlay(spec, attention_mask, prefix_lens, prompt_segments, None, None, rows=False)
        return allowed & attention_mask[:, None, :]
    block_ids = spec.block_ids(prefix_lens, attention_mask, prompt_segments)
    fn = masking_utils.causal_mask_function
    if block_ids is not None:
        fn = masking_utils.or_masks(fn, masking_utils.blockwise_overlay(block_ids))
    batch, length = attention_mask.shape
    mask = masking_utils.sdpa_mask(
        batch_size=batch,
        q_length=length,
        kv_length=length,
        mask_function=fn,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        device=attention_mask.device,
    )
    return mask[:, 0]


def dense_packed_mask(mask_name: str, batch: dict, window: int | None = None) -> torch.Tensor:
    """Boolean ``[sequence, query, key]`` view of a packed batch's mask (True = may attend), built by
    ``packed_rows_mask`` itself for sdpa; ``window``: the view of a sliding layer."""
    config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=window, layer_types=None)
    mask = packed_rows_mask(config, mask_name, batch["attention_mask"].bool(), batch["prefix_len"],
                            batch["segments"], batch["position_ids"], torch.float32, batch.get("prompt_segments"))
    return mask[:, 0]
