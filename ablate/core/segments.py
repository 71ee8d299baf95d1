"""The prompt's segments, for ``segment_bidir``: each prompt token's segment index.

    python -c "from transformers import AutoTokenizer; from ablate.core.segments import token_segments; \
t = AutoTokenizer.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct'); \
print(token_segments(t, t('Q: 1+1?\\n\\nA: 2\\n\\nQ: 2+2?')['input_ids'], '\\n\\n'))"

A prompt is cut after every occurrence of a separator (evaluation: the task's lm-eval ``fewshot_delimiter``,
so each few-shot example is a segment and the document's own question the last; stage 3:
``--segment-separator``), or at the boundaries of a list of strings (stage 3: ``--segment-field``). A
separator belongs to the segment it ends. A token belongs to the segment its last character is in: token
boundaries and text boundaries need not meet (a BPE token may span one), and a token that ends a segment's
text stays in it.

The masks read token ids, so the segments are found from the tokens themselves: their text (the
tokenizer's decode) is tokenized again with character offsets, and the two token sequences must be equal;
else the boundaries cannot be placed on these tokens and the run refuses (one line) rather than guess.
Only fast (Rust) tokenizers give offsets.
"""

from __future__ import annotations

from bisect import bisect_left

from ablate.errors import BadInput


def separator_ends(text: str, separator: str) -> list[int]:
    """Character offsets just after each (non-overlapping) occurrence of ``separator`` in ``text``."""
    if not separator:
        raise BadInput("the segment separator is empty")
    ends, at = [], text.find(separator)
    while at >= 0:
        ends.append(at + len(separator))
        at = text.find(separator, at + len(separator))
    return ends


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(f"mask 'segment_bidir' needs a fast tokenizer (character offsets); "
                       f"{type(tokenizer).__name__} is not one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def text_segments(tokenizer, text: str, ends: list[int]) -> tuple[list[int], list[int]]:
    """``text``'s tokens (no special tokens added) and each one's segment, the text being cut at ``ends``
    (character offsets; a boundary at the text's end starts no segment)."""
    ids, offsets = _offsets(tokenizer, text)
    cuts = sorted(e for e in set(ends) if 0 < e < len(text))
    return ids, [bisect_left(cuts, end) for _, end in offsets]


def token_segments(tokenizer, ids: list[int], separator: str) -> list[int]:
    """Each of ``ids``' segments when their text is cut after every ``separator``. BadInput when the text does
    not tokenize back to ``ids`` (the boundaries could not be placed on these tokens)."""
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again, segments = text_segments(tokenizer, text, separator_ends(text, separator))
    if again != ids:
        first = next((i for i, (a, b) in enumerate(zip(again, ids)) if a != b), min(len(again), len(ids)))
        raise BadInput(f"mask 'segment_bidir': a prompt of {len(ids)} tokens does not tokenize back to itself "
                       f"from its text (first difference at token {first}), so its segments cannot be placed; "
                       "a prompt cut inside a character (truncation) does this: raise --max-length")
    return segments


class SegmentCache:
    """``token_segments`` per distinct token sequence (evaluation scores each context several times)."""

    def __init__(self, tokenizer, separator: str):
        self.tokenizer, self.separator = tokenizer, separator
        self._known: dict[tuple[int, ...], list[int]] = {}
        self.prompts = 0  # distinct prompts segmented
        self.segments = 0  # their segments, summed

    def __call__(self, ids: list[int]) -> list[int]:
        key = tuple(ids)
        if key not in self._known:
            segments = token_segments(self.tokenizer, ids, self.separator)
            self._known[key] = segments
            self.prompts += 1
            self.segments += (max(segments) + 1) if segments else 0
        return self._known[key]

    def record(self) -> dict:
        """What metrics.json records: the separator and how many segments a prompt had on average."""
        return {"source": "fewshot_delimiter", "separator": self.separator, "prompts": self.prompts,
                "mean_segments": round(self.segments / self.prompts, 3) if self.prompts else None}

    def left_padded(self, context, attention_mask):
        """Each row's prompt segments, left-padded with -1 as generation's prompt batch is."""
        import torch

        return torch.tensor([[-1] * int((~real.bool()).sum()) + self(row[real.bool()].tolist())
                             for row, real in zip(context, attention_mask)], device=context.device)


def training_record(separator: str | None, field: str | None, examples: list) -> dict:
    """Stage 3's record of where its prompts were cut and how many segments they had (``summary.json``)."""
    counts = [max(e.prompt_segments, default=-1) + 1 for e in examples]
    source = {"source": "--segment-field", "field": field} if field else \
        {"source": "--segment-separator", "separator": separator}
    return {**source, "prompts": len(counts), "mean_segments": round(sum(counts) / len(counts), 3) if counts else None}
