"""Prefix sharing for loglikelihood requests: each context once, its continuations side by side.

    python -m pytest tests/test_packing.py -q

A multiple-choice document asks lm-eval for ``(context, choice)`` loglikelihoods
that share the context. ``pack`` puts each distinct context once in a row,
followed by every continuation that shares it (all but its last token, which is
only ever a target). In the forward pass a continuation attends to the context
and causally to itself only, with position ids continuing from the context's
length (``ablate.core.masks.model_attention_mask`` with ``segments`` and
``positions``), so its logits are those of the unshared request. Under a mask
that lets the context read what follows it (``full_bidir``) nothing is shared.

Requests that lm-eval truncates (longer than ``max_length``) keep their own row:
their effective context depends on the continuation's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One forward row: a context and the distinct continuations that share it."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)  # the request indices scored by each continuation
    context_segments: list[int] | None = None  # each context token's prompt segment (segment_bidir), else None

    def tokens(self) -> list[int]:
        return self.context + [t for cont in self.continuations for t in cont[:-1]]

    def layout(self) -> tuple[list[int], list[int]]:
        """Per token: its segment (0 the context, j for continuation j) and its position id."""
        n = len(self.context)
        segments, positions = [0] * n, list(range(n))
        for j, cont in enumerate(self.continuations, 1):
            segments += [j] * (len(cont) - 1)
            positions += range(n, n + len(cont) - 1)
        return segments, positions

    def score_indices(self) -> list[list[int]]:
        """For each continuation, the row indices whose logits predict its tokens."""
        out, start = [], len(self.context)
        for cont in self.continuations:
            out.append([len(self.context) - 1] + list(range(start, start + len(cont) - 1)))
            start += len(cont) - 1
        return out


def pack(requests: list[tuple[list[int], list[int]]], max_length: int, share: bool,
         segments: list[list[int]] | None = None) -> tuple[list[Row], int]:
    """Rows for ``(context, continuation)`` token pairs, longest first; also how many were truncated.

    Truncation is lm-eval's: the last ``max_length + 1`` tokens of context + continuation, the last
    of which is only a target, and the prompt boundary moves with the cut. ``segments``: each context's
    token segments (``ablate.core.segments``), cut with it.
    """
    rows: dict[object, Row] = {}
    truncated = 0
    for i, (context, continuation) in enumerate(requests):
        full = context + continuation
        if len(full) > max_length + 1:
            truncated += 1
            window = full[-(max_length + 1):]
            context = window[: len(window) - len(continuation)]
            key = ("own", i)
        else:
            key = tuple(context) if share else ("own", i)
        own = None if segments is None else list(segments[i][len(segments[i]) - len(context):])
        row = rows.setdefault(key, Row(list(context), context_segments=own))
        if continuation in row.continuations:  # the same choice twice: computed once
            row.requests[row.continuations.index(continuation)].append(i)
        else:
            row.continuations.append(list(continuation))
            row.requests.append([i])
    ordered = sorted(rows.values(), key=lambda r: (-len(r.tokens()), r.tokens()))
    return ordered, truncated


def unshared_tokens(requests: list[tuple[list[int], list[int]]], max_length: int) -> int:
    """Tokens one forward per request processes (stock lm-eval's cost)."""
    return sum(min(len(c) + len(t), max_length + 1) - 1 for c, t in requests)


def unique_tokens(rows: list[Row]) -> int:
    """Distinct token prefixes over every request's input: the least any evaluation must compute."""
    nodes: dict[tuple[int, int], int] = {}
    for row in rows:
        for cont in row.continuations:
            node = -1
            for token in row.context + cont[:-1]:
                node = nodes.setdefault((node, token), len(nodes))
    return len(nodes)
