"""Everything ablate takes from lm-eval beyond its public API, and the model that reads the prompt with a mask.

    python -m pytest tests/test_harness.py tests/test_lm_eval_drift.py -q

``PrefillMaskLM`` subclasses lm-eval's ``HFLM`` and is registered as
``ablate-hf``. lm-eval hands a loglikelihood request over as
``(context tokens, continuation tokens)``; the context is the prefill. Stock HFLM
drops that boundary before the forward pass and computes a shared context once
per choice, so the request loop is re-stated here (same truncation, checks and
scoring as HFLM): each row's prefix length reaches the mask, and requests that
share a context share one forward row (ablate.core.packing). Everything else
(tokenization, task logic, generation, metrics) is lm-eval's own.
Before the first batch of a non-causal run the mask is checked on a few of the requests against
an eager reference (ablate.core.mask_check); the record is ``lm.mask_check``.

Written against lm-eval 0.4.13 (``LM_EVAL_VERSION``). The private or re-stated
surfaces, all used through this module only and each pinned by
tests/test_lm_eval_drift.py so an upgrade that changes one fails there first:

- ``HFLM._loglikelihood_tokens`` and ``HFLM._model_call``
  (lm_eval/models/huggingface.py): re-stated by ``PrefillMaskLM._loglikelihood_tokens`` and ``_forward``;
- ``HFLM._model_generate``: re-stated for non-causal masks (``ablate.core.generation``), called by upstream's
  ``generate_until`` (batching, left padding, ``until``, the output cut at the prompt's width), with
  ``stop_sequences_criteria``; split in halves on out of memory (``ablate.core.oom``);
- ``HFLM._detect_batch_size`` (``batch_size="auto"``): re-stated by ``_detect_rows``, with lm-eval's
  ``find_executable_batch_size`` and ``clear_torch_cache``;
- ``TemplateLM.loglikelihood`` and ``_encode_pair`` (lm_eval/api/model.py), not re-stated but
  relied on: they draw the prompt boundary the mask reads;
- the task index: ``TaskManager.task_index`` entries' ``kind``, ``yaml_path`` and
  ``cfg`` (lm_eval/tasks/_index.py), read by ``task_entry`` and ``single_yaml_task_folders``;
- ``lm_eval.tasks._yaml_loader.load_yaml``, called by ``read_task_yaml``;
- the sample schema of ``simple_evaluate(log_samples=True)``, read by ``sample_rows``;
- ``lm_eval.evaluator.get_git_commit_hash``, replaced by ``_quiet_git_hash``.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lm_eval
import torch
from accelerate import Accelerator, PartialState
import torch.nn.functional as F
from lm_eval import evaluator as lm_eval_evaluator
from lm_eval.api.registry import register_model
# The names upstream's loop uses, from where it takes them (they live in models/utils.py and utils_hf.py).
from lm_eval.models.huggingface import HFLM, clear_torch_cache, find_executable_batch_size, stop_sequences_criteria
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from tqdm import tqdm

from ablate.core import layer_masks
from ablate.core.generation import masked_greedy
from ablate.core.masks import check_attention_backend, get_mask, model_attention_mask
from ablate.core.oom import generate_in_halves, half, is_out_of_memory, one_row_error, record_halving
from ablate.core.packing import Row, pack, unique_tokens, unshared_tokens
from ablate.core.segments import SegmentCache
from ablate.errors import BadInput
from ablate.faults import oom_fault

log = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"
if lm_eval.__version__ != LM_EVAL_VERSION:  # pyproject allows a range; the re-stated code is from one release
    log.warning("ablate re-states lm-eval %s internals but lm-eval %s is installed; "
                "run tests/test_lm_eval_drift.py", LM_EVAL_VERSION, lm_eval.__version__)


def _quiet_git_hash() -> str | None:
    """lm-eval 0.4.13's ``get_git_commit_hash`` lets git print "fatal: not a git repository" outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# simple_evaluate records the git hash of the working directory; ablate's env.json has its own.
lm_eval_evaluator.get_git_commit_hash = _quiet_git_hash


# --- the task index and the YAML loader -------------------------------------------------------------


@dataclass(frozen=True)
class TaskEntry:
    """What ablate reads of one ``TaskManager.task_index`` entry."""

    kind: str  # lm-eval's Kind, lower case: "task" (one YAML), "py_task", "group" or "tag"
    yaml_path: Path | None  # None for a tag
    cfg: dict | None  # the YAML as indexed: includes merged, !function left unresolved


def task_entry(manager: TaskManager, name: str) -> TaskEntry | None:
    entry = manager.task_index.get(name)
    return None if entry is None else TaskEntry(entry.kind.name.lower(), entry.yaml_path, entry.cfg)


def single_yaml_task_folders(manager: TaskManager | None = None) -> dict[str, str]:
    """Folder of every task defined by one YAML, for ``manager`` (all of lm-eval's own tasks when None)."""
    entries = (manager or TaskManager()).task_index.items()
    return {name: str(entry.yaml_path.parent) for name, entry in entries
            if entry.kind.name == "TASK" and entry.yaml_path is not None}


def read_task_yaml(path: str | Path, resolve_functions: bool) -> dict:
    """A task YAML as lm-eval reads it: includes merged, ``!function`` imported (or left as a path string)."""
    return load_yaml(path, resolve_func=resolve_functions)


# --- the sample schema of simple_evaluate(log_samples=True) -----------------------------------------

# Keys of each ``results["samples"][task]`` entry that ``sample_row`` reads; "acc_norm" too where the task has it.
SAMPLE_KEYS = ("doc_id", "target", "arguments", "filtered_resps", "acc")
GENERATION_SAMPLE_KEYS = ("doc_id", "target", "arguments", "resps", "filtered_resps", "filter", "exact_match")


def sample_rows(samples: list[dict], primary_filter: str = "none") -> list[dict]:
    """ablate's per-document rows, in ``doc_id`` order, from one task's ``results["samples"]`` list.

    lm-eval logs a generative document once per filter (gsm8k: strict-match, flexible-extract): they
    become one row, ``correct`` being the ``primary_filter``'s exact match.
    """
    by_doc: dict[int, list[dict]] = {}
    for s in samples:
        by_doc.setdefault(s["doc_id"], []).append(s)
    return [generation_row(group, primary_filter) if _is_generation(group[0]) else sample_row(group[0])
            for _, group in sorted(by_doc.items())]


def sample_row(sample: dict) -> dict:
    logprobs = [float(r[0]) for r in sample["filtered_resps"]]
    pred = max(range(len(logprobs)), key=logprobs.__getitem__)
    contexts = [a[0] for a in sample["arguments"]]
    row = {
        "doc_id": sample["doc_id"],
        "target": sample["target"],
        "logprobs": logprobs,
        "pred": pred,
        "correct": bool(sample["acc"]),
        # Winogrande-style tasks vary the context per choice and share the continuation.
        "context": contexts[0] if len(set(contexts)) == 1 else contexts,
        "choices": [a[1] for a in sample["arguments"]],
    }
    if "acc_norm" in sample:
        row["correct_norm"] = bool(sample["acc_norm"])
    return row


def _is_generation(sample: dict) -> bool:
    return isinstance(sample["arguments"][0][1], dict)  # (context, generation kwargs)


def generation_row(samples: list[dict], primary_filter: str) -> dict:
    first = samples[0]
    filters = {s["filter"]: {"extracted": s["filtered_resps"][0], "exact_match": bool(s["exact_match"])}
               for s in samples}
    return {
        "doc_id": first["doc_id"],
        "target": first["target"],
        "prompt": first["arguments"][0][0],
        "generated": first["resps"][0][0],
        "filters": filters,
        "pred": filters[primary_filter]["extracted"],
        "correct": filters[primary_filter]["exact_match"],
    }


# --- the model -------------------------------------------------------------------------------------


def _check_request(context_enc: list[int], continuation_enc: list[int], max_length: int) -> None:
    # Upstream asserts these; a raise survives python -O, and a longer continuation would slice the wrong logits.
    if not context_enc or not continuation_enc:
        raise ValueError(f"loglikelihood request with an empty {'context' if not context_enc else 'continuation'}")
    if len(continuation_enc) > max_length:
        raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds max_length {max_length}")


@register_model("ablate-hf")
class PrefillMaskLM(HFLM):
    def __init__(self, pretrained, mask: str = "causal", mask_layers: str | None = None,
                 segment_separator: str | None = None, **kwargs):
        self.spec = get_mask(mask)
        if self.spec.needs_segments and not segment_separator:
            raise BadInput(f"mask '{mask}' needs the prompt's segments: the tasks' few-shot delimiter")
        if mask_layers is not None and mask == "causal":
            raise BadInput("--mask-layers chooses the layers of a mask other than causal; the causal mask is "
                           "causal in every layer")
        # HFLM's one-token logits cache would share a forward pass between requests whose prompt boundary
        # may differ; the re-stated loop shares contexts itself (ablate.core.packing), so the flag is off.
        super().__init__(pretrained=pretrained, backend="causal", logits_cache=False, **kwargs)
        state = PartialState(cpu=self.device.type == "cpu")
        if state.num_processes > 1:
            # HFLM takes a preloaded model for one process; under `accelerate launch` each process holds the
            # model and lm-eval splits the documents by rank and gathers the results (its data-parallel mode).
            self.accelerator = Accelerator(cpu=self.device.type == "cpu")
            self._rank, self._world_size = state.process_index, state.num_processes
        check_attention_backend(mask, self.model.config._attn_implementation)
        self.mask = mask
        # The mask in these layers only, causal elsewhere (ablate.core.layer_masks); None: every layer.
        self.mask_layers = layer_masks.install(self.model, mask_layers)
        self.tokens_processed = 0  # tokens that went through the model (padding excluded)
        self.tokens_unique = 0  # distinct token prefixes of the requests' inputs: the least any loop computes
        self.tokens_unshared = 0  # what one forward per request (stock lm-eval) would process
        self.tokens_prompted = 0  # generation: prompt tokens prefilled (padding excluded)
        self.decode_positions = 0  # generation: rows x decoding steps of every batch
        self.oom_retries: list[dict] = []  # one entry per halving after an out-of-memory error (ablate.core.oom)
        self.mask_check: dict | None = None  # the runtime mask check (ablate.core.mask_check), non-causal runs
        # segment_bidir: each prompt's segments, cut after every few-shot delimiter (ablate.core.segments)
        self.segments = SegmentCache(self.tokenizer, segment_separator) if self.spec.needs_segments else None

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        """Logits of packed rows (right-padded), under this run's mask."""
        oom_fault(len(rows))
        return self._logits(rows, self.mask)

    def _logits(self, rows: list[Row], mask_name: str) -> torch.Tensor:
        layouts = [row.layout() for row in rows]
        lengths = [len(seg) for seg, _ in layouts]
        width = max(lengths)

        def padded(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values], device=self.device)

        ids = padded([row.tokens() for row in rows], 0)
        segments, positions = padded([seg for seg, _ in layouts], -1), padded([pos for _, pos in layouts], 0)
        padding = torch.arange(width, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        prefix_lens = torch.tensor([len(row.context) for row in rows], device=self.device)
        prompt_segments = None
        if rows[0].context_segments is not None:
            prompt_segments = padded([row.context_segments for row in rows], -1)
        mask = model_attention_mask(self.model.config, mask_name, padding, prefix_lens, self.model.dtype,
                                    segments=segments, positions=positions, prompt_segments=prompt_segments)
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ), layer_masks.forward_masks(self.model, mask_name, padding, prefix_lens, self.model.dtype,
                                     segments=segments, positions=positions, built=mask,
                                     prompt_segments=prompt_segments):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    def _check_mask_once(self, pairs: list[tuple[list[int], list[int]]]) -> None:
        """Before the first batch of a non-causal run: its mask on a few of these rows, through ``_logits``."""
        if self.mask == "causal" or self.mask_check is not None:
            return
        from ablate.core.mask_check import check_mask, check_rows, row_segments

        def forward(rows, mask_name):  # one continuation per row: the plain (unpacked) layout
            return self._logits([Row(row[0][:row[1]], [row[0][row[1]:] + [0]], context_segments=row_segments(row))
                                 for row in rows], mask_name)

        segments = [self.segments(prompt) for prompt, _ in pairs] if self.segments else None
        try:
            self.mask_check = check_mask(self.model, self.mask, check_rows(pairs, segments=segments), forward,
                                         self.mixed_precision_dtype)
        except BadInput as exc:
            self.mask_check = getattr(exc, "result", None) or {"mask": self.mask, "passed": False, "error": str(exc)}
            raise
        record = self.mask_check
        log.info("mask check (%s, %s, %s): %s", record["mask"], record["backend"], record["dtype"],
                 "skipped: " + record["skipped"] if record["passed"] is None else
                 f"passed, max diff {record['max_diff']:.3g} <= tolerance {record['tolerance']:.3g}")

    def _or_out_of_memory(self, call, during: str, rows: int, tokens: int):
        """``call()``; None after an out-of-memory error on more than one row (recorded: the caller halves)."""
        try:
            return call()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if rows == 1:
                raise one_row_error(during, tokens) from exc
        clear_torch_cache()  # outside the except block: its traceback holds the failed batch's tensors
        record_halving(self.oom_retries, during, rows, tokens)
        return None

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """Upstream's ``generate_until`` calls this once per batch; out of memory, the batch goes in halves."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        self._check_mask_once([(row[real.bool()].tolist(), []) for row, real in zip(context, attention_mask)])

        def generate(ids, mask):
            # A fresh copy of the kwargs per attempt: upstream's _model_generate edits them in place.
            return self._or_out_of_memory(
                lambda: self._generate_rows(ids, mask, max_length, stop, dict(generation_kwargs)),
                "generate_until", *ids.shape)

        out = generate_in_halves(generate, context, attention_mask, self.tokenizer.pad_token_id)
        self.tokens_prompted += int(attention_mask.sum())
        self.decode_positions += (out.shape[1] - context.shape[1]) * out.shape[0]
        return out

    def _generate_rows(self, context, attention_mask, max_length: int, stop: list[str], generation_kwargs: dict):
        """Re-states ``HFLM._model_generate`` (lm-eval 0.4.13): the prompt is prefilled under the mask.

        The causal mask takes upstream's own path (``transformers.generate``), so it matches stock lm-eval token
        for token; any other mask decodes greedily from a cache prefilled with it (ablate.core.generation).
        """
        oom_fault(context.shape[0])
        if self.mask == "causal":
            return super()._model_generate(context, max_length, stop, attention_mask=attention_mask,
                                           **generation_kwargs)
        if not self.spec.causal_continuation:  # decoding from the cache is causal (ablate.core.generation)
            raise BadInput(f"mask '{self.mask}' is not causal after the prompt: generation cannot decode under it")
        if generation_kwargs.get("do_sample") or (generation_kwargs.get("temperature") or 0) > 0:
            raise ValueError(f"sampling under mask '{self.mask}' is not supported: greedy decoding only "
                             "(do_sample false, temperature 0)")
        unsupported = sorted(set(generation_kwargs) - {"do_sample", "temperature", "top_p", "top_k"})
        if unsupported:  # they would change greedy decoding; silently dropping them would be a different run
            raise ValueError(f"generation kwargs {unsupported} are not supported under mask '{self.mask}'")
        eos = self.model.generation_config.eos_token_id
        prompt_segments = self.segments.left_padded(context, attention_mask) if self.segments is not None else None
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            return masked_greedy(
                self.model, self.mask, context, attention_mask, max_length - context.shape[1],
                stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0]),
                self.tokenizer.pad_token_id, [eos] if isinstance(eos, int) else list(eos or []),
                prompt_segments=prompt_segments)

    def _detect_rows(self, row: Row) -> int:
        """``batch_size="auto"``: the most rows like ``row`` (the longest of the call) that fit (lm-eval's search)."""
        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def probe(batch_size: int):
            for _ in range(2):  # as upstream, more than once: allocator growth shows on the second pass
                F.log_softmax(self._forward([row] * batch_size), dim=-1, dtype=self.softmax_dtype)
            return batch_size

        try:
            size = probe()
        except RuntimeError as exc:
            if "No executable batch size found" not in str(exc):
                raise
            size = 1
        clear_torch_cache()
        return size

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Re-states ``HFLM._loglikelihood_tokens`` of lm-eval 0.4.13 (lm_eval/models/huggingface.py).

        Same truncation (left, the prompt boundary moving with it), checks and scoring as upstream;
        different on purpose: requests sharing a context are packed into one row and the context is
        computed once (upstream's "TODO: ... lumps together requests with the same context");
        each row's prompt length reaches the mask; the batch size counts rows; ``auto`` is detected
        afresh on every call (upstream's out-of-memory fix, lm-eval issue #1678) for the call's
        longest row; the causal branch only (the backend is always "causal"); out of memory, the batch is
        halved and the call goes on with the smaller size (ablate.core.oom).
        """
        pairs = []
        for _, context_enc, continuation_enc in requests:
            _check_request(context_enc, continuation_enc, self.max_length)
            pairs.append((context_enc, continuation_enc))
        self._check_mask_once(pairs)
        segments = [self.segments(context) for context, _ in pairs] if self.segments else None
        rows, truncated = pack(pairs, self.max_length, share=self.spec.shares_context, segments=segments)
        self.tokens_unique += unique_tokens(rows)
        self.tokens_unshared += unshared_tokens(pairs, self.max_length)
        if self.batch_size == "auto":
            size = override_bs or (self._detect_rows(rows[0]) if rows else 1)
        else:
            size = self.batch_size
        res: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc=f"loglikelihood ({self.mask})")
        start = 0
        while start < len(rows):
            batch = rows[start: start + size]
            logits = self._or_out_of_memory(lambda: self._forward(batch), "loglikelihood", len(batch),
                                            max(len(row.tokens()) for row in batch))
            if logits is None:  # out of memory: the same rows, fewer per forward, for the rest of the call
                size = half(len(batch))
                continue
            start += len(batch)
            self.tokens_processed += sum(len(row.tokens()) for row in batch)
            # As upstream: skip "virtual tokens" a prompt-tuning adapter puts in front of the logits.
            offset = logits.shape[1] - max(len(row.tokens()) for row in batch)
            for row, row_logits in zip(batch, logits, strict=True):
                for cont, indices, members in zip(row.continuations, row.score_indices(), row.requests, strict=True):
                    picked = F.log_softmax(row_logits[[i + offset for i in indices]], dim=-1, dtype=self.softmax_dtype)
                    target = torch.tensor(cont, dtype=torch.long, device=self.device)
                    answer = (float(picked.gather(1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all()))
                    for i in members:
                        res[i] = answer
                        request_str = requests[i][0]
                        if request_str is not None:  # None: a loglikelihood_rolling window, cached per document
                            self.cache_hook.add_partial("loglikelihood", request_str, answer)
                        pbar.update(1)
        pbar.close()
        if truncated:
            log.warning("%d of %d requests exceed max_length %d: their prompts were truncated from the left",
                        truncated, len(requests), self.max_length)
        return res
