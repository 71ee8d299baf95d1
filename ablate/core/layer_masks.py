"""Per-layer masks: the run's mask in some layers, the causal mask in the others (``--mask-layers``).

    python -m pytest tests/test_layer_masks.py -q
    python -c "from ablate.core.layer_masks import parse_layers; print(parse_layers('0-3,last:2', 30))"

A layer spec names decoder layers, 0-based: ``N``, ``A-B`` (inclusive), ``first:K``, ``last:K``, ``all``, joined
by commas (``0-7``, ``0,2,4``, ``last:4``, ``0-3,last:2``). ``parse_layers`` resolves it against the model's own
number of layers, so a run's identity is the resolved layers (``describe`` writes them back canonically), never
the spelling.

transformers hands every decoder layer the same mask (or one per kind of layer: full and sliding), so there is no
library hook for a mask per layer index; ``LayerMasks`` adds one: a forward pre-hook on each layer's attention
module (``self_attn``, which every supported architecture calls with ``attention_mask=`` as a keyword) puts in
the mask of that layer's kind, the run's mask in the chosen layers and the causal mask elsewhere, for the
forwards run inside ``apply``. Both masks are built by ``ablate.core.masks.masks_by_kind``, the same builders
and layouts as the single-mask path. A forward of a model with per-layer masks outside ``apply`` or ``stock``
raises: no forward can silently take the run's mask in every layer.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from ablate.core.models import base_model
from ablate.errors import BadInput

_ITEM = re.compile(r"^(?:(\d+)|(\d+)-(\d+)|(first|last):(\d+)|(all))$")


def num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def parse_layers(spec: str, layers: int | None) -> tuple[int, ...]:
    """The sorted layer indices ``spec`` names among ``layers`` decoder layers. Raises BadInput (one line).
    ``layers`` None: the spec's form only, before the model's layer count is known (returns ``()``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInput("--mask-layers is empty; give e.g. 0-7, 0,2,4, first:4, last:4 or all")
    chosen: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        match = _ITEM.match(item)
        if not match:
            raise BadInput(f"--mask-layers item '{item}' is not N, A-B, first:K, last:K or all (layers 0-based)")
        single, start, end, side, count, every = match.groups()
        if start is not None and int(start) > int(end):
            raise BadInput(f"--mask-layers range '{item}' runs backwards; write {end}-{start}")
        if side is not None and not 1 <= int(count) <= (layers or int(count)):
            raise BadInput(f"--mask-layers '{item}': " + (f"the model has {layers} layers, so K must be 1 to {layers}"
                                                           if layers else "K must be at least 1"))
        if layers is None:  # the form only
            continue
        if every:
            picked = list(range(layers))
        elif single is not None:
            picked = [int(single)]
        elif start is not None:
            picked = list(range(int(start), min(int(end), layers) + 1))
            if int(end) >= layers:
                picked.append(int(end))  # named, so refused below
        else:
            k = int(count)
            picked = list(range(k)) if side == "first" else list(range(layers - k, layers))
        outside = [i for i in picked if i >= layers]
        if outside:
            raise BadInput(f"--mask-layers '{item}' names layer {min(outside)}, but the model has {layers} layers "
                           f"(0 to {layers - 1})")
        chosen.update(picked)
    return tuple(sorted(chosen))


def describe(layers: tuple[int, ...]) -> str:
    """Canonical spelling of resolved layers: ranges of consecutive indices, ``0-3,8,28-29``."""
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


def record(layers: tuple[int, ...] | None, layers_of: int) -> dict | None:
    """What a run records of its layers: ``{"layers": describe(layers), "num_layers": n}`` (the model's layer
    count, which ``last:K`` is resolved against), or None for every layer. The mask check records the same."""
    return None if layers is None else {"layers": describe(tuple(layers)), "num_layers": layers_of}


def attention_modules(model) -> list:
    """Each decoder layer's attention module, by layer index (``self_attn`` modules carrying ``layer_idx``)."""
    found = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "self_attn" and isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, module)
    expected = num_layers(model.config)
    if sorted(found) != list(range(expected)):
        raise BadInput(f"{type(model).__name__}: found attention modules for layers {sorted(found)[:4]}..., "
                       f"not one per each of its {expected} layers; per-layer masks need one")
    return [found[i] for i in range(expected)]


class LayerMasks:
    """Installed on a model: inside ``apply(ablated, causal)`` each chosen layer attends with ``ablated`` (of its
    kind), every other layer with ``causal``; inside ``stock()`` every layer takes the mask the model passes."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.layers = frozenset(layers)
        self.modules = attention_modules(model)
        self._current: tuple | str | None = None
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]

    def _hook(self, module, args, kwargs):
        if self._current == "stock":
            return None
        if self._current is None:
            raise RuntimeError(f"layer {module.layer_idx}: a forward of a model with per-layer masks ran without "
                               "them (ablate.core.layer_masks.LayerMasks.apply)")
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"{type(module).__name__} was not called with attention_mask= as a keyword; "
                               "per-layer masks cannot reach it")
        ablated, causal = self._current
        masks = ablated if module.layer_idx in self.layers else causal
        kwargs["attention_mask"] = masks[_kind(module, masks)]
        return args, kwargs

    @contextmanager
    def apply(self, ablated: dict, causal: dict):
        """Forwards inside run the chosen layers under ``ablated`` and the others under ``causal`` (both
        ``{kind: mask}``, ``ablate.core.masks.masks_by_kind``)."""
        before, self._current = self._current, (ablated, causal)
        try:
            yield self
        finally:
            self._current = before

    @contextmanager
    def stock(self):
        """Forwards inside take the mask the model passes in every layer (decoding one token after a prefill:
        every mask gives the new token the whole prefix)."""
        before, self._current = self._current, "stock"
        try:
            yield self
        finally:
            self._current = before

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _kind(module, masks: dict) -> str:
    if len(masks) == 1:
        return next(iter(masks))
    kinds = getattr(module.config, "layer_types", None)
    if not kinds:
        raise RuntimeError(f"layer {module.layer_idx}: masks for {sorted(masks)} but no layer_types to choose")
    return kinds[module.layer_idx]


def install(model, spec: str | None) -> tuple[int, ...] | None:
    """Per-layer masks on ``model`` (its base model under a peft wrapper) for ``spec``, replacing any installed
    before; None: none (every layer takes the mask the forward passes). Returns the resolved layers. Raises
    BadInput for a bad spec (then nothing changes)."""
    base = base_model(model)
    layers = None if spec is None else parse_layers(spec, num_layers(base.config))  # before anything changes
    if getattr(base, "ablate_layer_masks", None) is not None:  # another run's layers on the same model object
        base.ablate_layer_masks.remove()
        base.ablate_layer_masks = None
    if layers is not None:
        base.ablate_layer_masks = LayerMasks(base, layers)
    return layers


def check_spec(spec: str | None, model) -> tuple[int, ...] | None:
    """``spec`` resolved against ``model``'s layers (BadInput if it names one it lacks), installing nothing."""
    return None if spec is None else parse_layers(spec, num_layers(model.config))


def installed(model) -> LayerMasks | None:
    return getattr(base_model(model), "ablate_layer_masks", None)


def forward_masks(model, mask_name: str, attention_mask: torch.Tensor, prefix_lens: torch.Tensor,
                  dtype: torch.dtype, segments: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                  rows: bool = False, built=None, prompt_segments: torch.Tensor | None = None):
    """The context a forward under ``mask_name`` runs in on ``model``: per-layer masks where installed (the mask in
    the chosen layers, causal elsewhere), else a no-op. Use it around the forward that passes the single mask;
    ``built``: that mask (``model_attention_mask``'s or ``packed_rows_mask``'s), reused rather than built again."""
    from contextlib import nullcontext

    from ablate.core.masks import mask_kinds, masks_by_kind

    layer_masks = installed(model)
    if layer_masks is None or mask_name == "causal":  # causal everywhere is causal in every layer
        return nullcontext() if layer_masks is None else layer_masks.stock()
    config = base_model(model).config
    build = dict(attention_mask=attention_mask, prefix_lens=prefix_lens, dtype=dtype, segments=segments,
                 positions=positions, rows=rows, prompt_segments=prompt_segments)
    if isinstance(built, dict):  # the {kind: mask} mapping of models declaring layer_types
        ablated = built
    elif built is not None and not (isinstance(built, torch.Tensor) and built.ndim == 2) \
            and len(mask_kinds(config)) == 1:  # one 4D mask (or flex BlockMask), for the one kind of layer
        ablated = {mask_kinds(config)[0]: built}
    else:  # a 2D padding mask (the model would build its own) or nothing given
        ablated = masks_by_kind(config, mask_name, **build)
    return layer_masks.apply(ablated, masks_by_kind(config, "causal", **build))


def same_layers(metrics: dict, spec: str | None) -> bool:
    """Whether an evaluation run's recorded layers (``mask_layers``: ``record``'s, resolved on its model of
    ``num_layers``) are those ``spec`` names; None: every layer."""
    recorded = metrics.get("mask_layers")
    if spec is None or recorded is None:
        return spec is None and recorded is None
    n = recorded.get("num_layers") if isinstance(recorded, dict) else None
    if type(n) is not int or n < 1:
        return False
    try:
        return recorded.get("layers") == describe(parse_layers(spec, n))
    except BadInput:
        return False
