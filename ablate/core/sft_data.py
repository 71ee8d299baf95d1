"""Stage 3 training data: prompt/response pairs, tokenized with loss on the response only.

    python -c "from ablate.core.sft_data import RowFormat, load_rows; print(load_rows('data.jsonl', RowFormat())[:2])"

Every example becomes ``input_ids``, ``labels`` (-100 on the prompt) and
``prefix_len`` (the number of prompt tokens, which the mask reads). A row's
prompt and response are two fields as they are, or ``str.format`` templates over
its fields (``--prompt-template "Question: {question}\nAnswer:"``, lm-eval's gsm8k
prompt). Plain text (``--text-field``) is split at a random point into prompt and
response: a prefix-LM objective. The same examples and loss serve both masks, so
a causal and a ``prefill_bidir`` run differ only by the mask.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from ablate.errors import BadInput

from ablate.core.tasks import LOADERS  # the one table of file formats `datasets` reads


def template_fields(template: str, option: str) -> list[str]:
    """The row fields a ``str.format`` template names; BadInput for a template no row of strings can fill."""
    names = _named(template, option)
    try:  # conversions and format specs, checked on empty strings (every field a row supplies is a string)
        template.format_map(dict.fromkeys(names, ""))
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{option} {template!r}: {exc}") from None
    return names


def _named(template: str, option: str) -> list[str]:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # an unbalanced brace
        raise BadInput(f"{option} {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    names: list[str] = []
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise BadInput(f"{option} {template!r}: positional field {{{name}}}; name a field of the rows, "
                           "e.g. {question}")
        if "." in name or "[" in name:
            raise BadInput(f"{option} {template!r}: field {{{name}}} reads an attribute or index; "
                           "name a field of the rows as it is")
        names += [n for n in [name] + (_named(spec, option) if spec else []) if n not in names]
    return names


@dataclass(frozen=True)
class RowFormat:
    """How a row becomes a prompt and a response: two fields as they are, templates over its fields, or plain text."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str | None = None
    prompt_template: str | None = None
    response_template: str | None = None
    segment_separator: str | None = None  # segment_bidir: the prompt's segments end after each occurrence
    segment_field: str | None = None  # segment_bidir: a field holding the prompt as a list of its segments

    def __post_init__(self):
        if self.text_field and self.templates():
            raise BadInput("--prompt-template and --response-template shape prompt/response rows; "
                           "they do not go with --text-field")
        if self.segment_field and (self.text_field or self.prompt_template is not None):
            raise BadInput("--segment-field holds the prompt itself (its segments, joined); it does not go with "
                           "--text-field or --prompt-template")
        if self.segment_field and self.segment_separator is not None:
            raise BadInput("give the prompt's segments once: --segment-separator or --segment-field")
        for option, template in self.templates():
            template_fields(template, option)

    def templates(self) -> list[tuple[str, str]]:
        return [(option, t) for option, t in (("--prompt-template", self.prompt_template),
                                               ("--response-template", self.response_template)) if t is not None]

    def fields(self) -> list[str]:
        """The fields read from each row."""
        if self.text_field:
            return [self.text_field]
        prompt = template_fields(self.prompt_template, "--prompt-template") if self.prompt_template is not None \
            else [self.segment_field or self.prompt_field]
        response = template_fields(self.response_template, "--response-template") \
            if self.response_template is not None else [self.response_field]
        return list(dict.fromkeys(prompt + response))

    def render(self, row: dict, where: str) -> tuple[str, str]:
        """The prompt and response text of a prompt/response row (``where`` names the row in errors)."""
        prompt = "".join(row[self.segment_field]) if self.segment_field else \
            _fill("--prompt-template", self.prompt_template, self.prompt_field, row, where)
        return prompt, _fill("--response-template", self.response_template, self.response_field, row, where)

    def segment_ends(self, row: dict, prompt: str) -> list[int] | None:
        """Where the prompt's segments end (character offsets), or None when rows are not cut into segments."""
        if self.segment_field:
            ends, at = [], 0
            for piece in row[self.segment_field]:
                at += len(piece)
                ends.append(at)
            return ends
        if self.segment_separator is not None:
            from ablate.core.segments import separator_ends

            return separator_ends(prompt, self.segment_separator)
        return None


def _fill(option: str, template: str | None, field: str, row: dict, where: str) -> str:
    if template is None:
        return row[field]
    try:
        return template.format_map(row)
    except (ValueError, TypeError) as exc:  # a format spec nested from the row's own values
        raise BadInput(f"{where}: {option} {template!r}: {' '.join(str(exc).split())}") from None


def load_rows(data: str, fmt: RowFormat) -> list[dict]:
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
    needed = fmt.fields()
    missing = [f for f in needed if f not in ds.column_names]
    if missing:
        named = [f"{option} {t!r}" for option, t in fmt.templates() if set(template_fields(t, option)) & set(missing)]
        raise BadInput(f"--data {data} lacks field(s) {', '.join(missing)}"
                       + (f" named by {' and '.join(named)}" if named else "")
                       + f" (it has {', '.join(ds.column_names)})")
    rows = ds.select_columns(needed).to_list()
    for i, row in enumerate(rows):
        where = f"--data {data} row {i}"
        for f in needed:
            if f == fmt.segment_field:
                if not isinstance(row[f], list) or not row[f] or not all(isinstance(x, str) for x in row[f]):
                    raise BadInput(f"{where}: field '{f}' must be a non-empty list of strings (the prompt's segments)")
            elif not isinstance(row[f], str):
                raise BadInput(f"{where}: field '{f}' must be a string")
        text = row[fmt.text_field] if fmt.text_field else fmt.render(row, where)[1]
        if not text.strip():
            field = fmt.text_field or (fmt.response_field if fmt.response_template is None else None)
            raise BadInput(f"{where}: field '{field}' must be a non-empty string" if field else
                           f"{where}: --response-template {fmt.response_template!r} renders an empty response")
    return rows


def data_identity(data: str, eval_data: str | None = None) -> dict:
    """What the training data was: a local file's sha256, or a dataset id (not digested)."""
    from ablate.core.identity import file_digest

    def one(name):
        path = Path(name).expanduser()
        return {"sha256": file_digest(path)} if path.is_file() else {"hub": name}

    return {"data": one(data), "eval_data": one(eval_data) if eval_data else None}


def _has_text(path: Path) -> bool:
    with open(path) as fh:
        return any(line.strip() for line in fh)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    prefix_len: int
    # segment_bidir: each prompt token's segment (ablate.core.segments); None for masks that read none
    prompt_segments: tuple[int, ...] | None = None


def tokenize(rows: list[dict], tokenizer, fmt: RowFormat, max_length: int, split_range: tuple[float, float],
             truncate_prompts: bool, seed: int) -> list[Tokenized]:
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, too_long = [], []
    segmented = fmt.segment_separator is not None or fmt.segment_field is not None
    for i, row in enumerate(rows):
        segments: list[int] = []
        if fmt.text_field:
            text = row[fmt.text_field]
            ids, segments = _tokens(tokenizer, text, fmt.segment_ends(row, text))
            if len(ids) < 2:
                raise BadInput(f"--data row {i}: text has fewer than 2 tokens, nothing to split")
            lo, hi = split_range
            cut = min(max(1, int(len(ids) * rng.uniform(lo, hi))), len(ids) - 1)
            prompt, response, segments = ids[:cut], ids[cut:] + eos, segments[:cut]
        else:
            # Prompt and response are encoded apart: the prompt's tokens are what the model reads at evaluation.
            prompt_text, response_text = fmt.render(row, f"--data row {i}")
            prompt, segments = _tokens(tokenizer, prompt_text, fmt.segment_ends(row, prompt_text))
            response = tokenizer(response_text, add_special_tokens=False)["input_ids"] + eos
        prompt, segments = bos + prompt, [0] * len(bos) + segments
        # Keep at least one response token inside the window.
        room = max_length - 1
        if len(prompt) > room:
            if not truncate_prompts:
                too_long.append((i, len(prompt)))
                continue
            # keep the prompt's end, next to the response (none when room is 0)
            prompt, segments = prompt[len(prompt) - room:], segments[len(segments) - room:]
        response = response[: max_length - len(prompt)]
        out.append(Tokenized(prompt + response, [-100] * len(prompt) + response, len(prompt),
                             tuple(segments) if segmented else None))
    if too_long:
        first, length = too_long[0]
        raise BadInput(
            f"{len(too_long)} prompt(s) do not fit --max-length {max_length} with a response token "
            f"(first: row {first}, {length} tokens); pass --truncate-prompts to drop their first tokens "
            "(responses are cut at the end)"
        )
    return out


def _tokens(tokenizer, text: str, ends: list[int] | None) -> tuple[list[int], list[int]]:
    """``text``'s tokens and, cut at ``ends`` (character offsets), each one's segment (ablate.core.segments;
    [] when not cut)."""
    if ends is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"], []
    from ablate.core.segments import text_segments

    return text_segments(tokenizer, text, ends)


def supervised_tokens(examples: list[Tokenized]) -> int:
    """Positions the loss is computed on: labels other than -100 after the first token (the model shifts by one)."""
    return sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)


def supervised_logits(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The positions whose next token is supervised in any row (``logits_to_keep``) and each row's target there
    (``shift_labels``, -100 where that row has none), or None when no position is: the loss needs the language
    model head at these positions only. ``labels`` is ``[rows, length]``, unshifted, as the model takes it."""
    wanted = labels[:, 1:] != -100
    keep = wanted.any(0).nonzero().flatten()
    if keep.numel() == 0:
        return None
    return keep, labels[:, 1:][:, keep].contiguous()


def refuse_unsupervised(examples: list[Tokenized], n_rows: int, what: str, max_length: int) -> int:
    """The supervised token count of ``examples``; BadInput before step 1 when there is none to learn from."""
    n = supervised_tokens(examples)
    if n == 0:
        raise BadInput(f"{what}: {n_rows} row(s) give {len(examples)} example(s) with 0 supervised (response) "
                       f"tokens at --max-length {max_length}; training would change nothing (raise --max-length)")
    return n


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

        out = {
            "input_ids": pad("input_ids", self.pad),
            "labels": pad("labels", -100),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch]),
            "prefix_len": torch.tensor([b["prefix_len"] for b in batch]),
        }
        if batch[0].get("prompt_segments") is not None:  # segment_bidir: -1 past each prompt
            out["prompt_segments"] = torch.tensor([list(b["prompt_segments"]) + [-1] * (n - len(b["prompt_segments"]))
                                                   for b in batch])
        return out
