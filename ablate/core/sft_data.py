"""Stage 3 training data: prompt/response pairs, tokenized with loss on the response only.

    python -c "from ablate.core.sft_data import load_rows; print(load_rows('data.jsonl', 'prompt', 'response', None)[:2])"

Every example becomes ``input_ids``, ``labels`` (-100 on the prompt) and
``prefix_len`` (the number of prompt tokens, which the mask reads). Plain text
(``--text-field``) is split at a random point into prompt and response: a
prefix-LM objective. The same examples and loss serve both masks, so a causal
and a ``prefill_bidir`` run differ only by the mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ablate.errors import BadInput

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(data: str, prompt_field: str, response_field: str, text_field: str | None) -> list[dict]:
    """Rows from a local JSONL/JSON/Parquet/CSV file or a Hugging Face dataset id (train split)."""
    import datasets

    path = Path(data).expanduser()
    try:
        if path.suffix in LOADERS or path.exists():
            if not path.is_file():
                raise BadInput(f"--data file not found: {data}")
            if path.suffix not in LOADERS:
                raise BadInput(f"--data {data}: unsupported format '{path.suffix}' (use {', '.join(LOADERS)})")
            if path.suffix != ".parquet" and not _has_text(path):
                raise BadInput(f"--data {data} has no rows")
            ds = datasets.load_dataset(LOADERS[path.suffix], data_files={"train": str(path)}, split="train")
        else:
            ds = datasets.load_dataset(data, split="train")
    except BadInput:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files or an unreachable hub
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot read --data {data}: {first}") from None
    if len(ds) == 0:
        raise BadInput(f"--data {data} has no rows")
    needed = [text_field] if text_field else [prompt_field, response_field]
    missing = [f for f in needed if f not in ds.column_names]
    if missing:
        raise BadInput(f"--data {data} lacks field(s) {', '.join(missing)} (it has {', '.join(ds.column_names)})")
    rows = ds.select_columns(needed).to_list()
    for i, row in enumerate(rows):
        for f in needed:
            if not isinstance(row[f], str) or (f != prompt_field and not row[f].strip()):
                raise BadInput(f"--data {data} row {i}: field '{f}' must be a non-empty string")
    return rows


def _has_text(path: Path) -> bool:
    with open(path) as fh:
        return any(line.strip() for line in fh)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    prefix_len: int


def tokenize(rows: list[dict], tokenizer, prompt_field: str, response_field: str, text_field: str | None,
             max_length: int, split_range: tuple[float, float], truncate_prompts: bool, seed: int) -> list[Tokenized]:
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, too_long = [], []
    for i, row in enumerate(rows):
        if text_field:
            ids = tokenizer(row[text_field], add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                raise BadInput(f"--data row {i}: text has fewer than 2 tokens, nothing to split")
            lo, hi = split_range
            cut = min(max(1, int(len(ids) * rng.uniform(lo, hi))), len(ids) - 1)
            prompt, response = ids[:cut], ids[cut:] + eos
        else:
            prompt = tokenizer(row[prompt_field], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[response_field], add_special_tokens=False)["input_ids"] + eos
        prompt = bos + prompt
        # Keep at least one response token inside the window.
        room = max_length - 1
        if len(prompt) > room:
            if not truncate_prompts:
                too_long.append((i, len(prompt)))
                continue
            prompt = prompt[-room:]  # keep the prompt's end, next to the response
        response = response[: max_length - len(prompt)]
        out.append(Tokenized(prompt + response, [-100] * len(prompt) + response, len(prompt)))
    if too_long:
        first, length = too_long[0]
        raise BadInput(
            f"{len(too_long)} prompt(s) do not fit --max-length {max_length} with a response token "
            f"(first: row {first}, {length} tokens); pass --truncate-prompts to drop their first tokens "
            "(responses are cut at the end)"
        )
    return out


def split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    if len(examples) < 2:
        raise BadInput("--data needs at least 2 usable rows (one for training, one held out)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class Collator:
    """Right-pads a batch; carries ``prefix_len`` so the trainer can build the mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)

        def pad(key, value):
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])

        return {
            "input_ids": pad("input_ids", self.pad),
            "labels": pad("labels", -100),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch]),
            "prefix_len": torch.tensor([b["prefix_len"] for b in batch]),
        }
