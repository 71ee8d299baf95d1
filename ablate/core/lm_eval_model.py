"""Everything ablate takes from lm-eval beyond its public API, and the model that reads the prompt with a mask.

    python -m pytest tests/test_harness.py tests/test_lm_eval_drift.py -q

``PrefillMaskLM`` subclasses lm-eval's ``HFLM`` and is registered as
``ablate-hf``. lm-eval hands a loglikelihood request over as
``(context tokens, continuation tokens)``; the context is the prefill. Stock HFLM
drops that boundary before the forward pass, so the request loop is re-stated
here (same truncation, batching order, padding and scoring as HFLM) with the
one difference that each row's prefix length reaches the mask. Everything else
(tokenization, task logic, generation, metrics) is lm-eval's own.

Written against lm-eval 0.4.13 (``LM_EVAL_VERSION``). The private or re-stated
surfaces, all used through this module only and each pinned by
tests/test_lm_eval_drift.py so an upgrade that changes one fails there first:

- ``HFLM._loglikelihood_tokens`` and ``HFLM._model_call``
  (lm_eval/models/huggingface.py): re-stated by ``PrefillMaskLM``;
- ``Collator`` (lm_eval/models/utils.py) and ``pad_and_concat`` (lm_eval/models/utils_hf.py);
- ``TemplateLM.loglikelihood`` and ``_encode_pair`` (lm_eval/api/model.py), not re-stated but
  relied on: they draw the prompt boundary the mask reads;
- ``HFLM._batch_scheduler``, ``HFLM._detect_batch_size`` and ``HFLM.batch_sizes``
  (``batch_size="auto"``), which call back into ``_model_call``;
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
import torch.nn.functional as F
from lm_eval import evaluator as lm_eval_evaluator
from lm_eval.api.registry import register_model
# The names upstream's loop uses, from where it takes them (they live in models/utils.py and utils_hf.py).
from lm_eval.models.huggingface import HFLM, Collator, pad_and_concat
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from tqdm import tqdm

from ablate.core.masks import check_attention_backend, get_mask, model_attention_mask

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


def sample_rows(samples: list[dict]) -> list[dict]:
    """ablate's per-document rows, in ``doc_id`` order, from one task's ``results["samples"]`` list."""
    return [sample_row(s) for s in sorted(samples, key=lambda s: s["doc_id"])]


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


# --- the model -------------------------------------------------------------------------------------


def _longest_first(req):
    """HFLM's ``_collate`` sort key: longest first (an out-of-memory shows at once), then by tokens."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _check_request(context_enc: list[int], continuation_enc: list[int], max_length: int) -> None:
    # Upstream asserts these; a raise survives python -O, and a longer continuation would slice the wrong logits.
    if not context_enc or not continuation_enc:
        raise ValueError(f"loglikelihood request with an empty {'context' if not context_enc else 'continuation'}")
    if len(continuation_enc) > max_length:
        raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds max_length {max_length}")


@register_model("ablate-hf")
class PrefillMaskLM(HFLM):
    def __init__(self, pretrained, mask: str = "causal", **kwargs):
        get_mask(mask)
        # The re-stated loop never shares a forward pass between requests (HFLM's one-token logits cache
        # would, for requests whose prompt boundary may differ); the flag is pinned off so HFLM says so.
        super().__init__(pretrained=pretrained, backend="causal", logits_cache=False, **kwargs)
        check_attention_backend(mask, self.model.config._attn_implementation)
        self.mask = mask
        self.tokens_processed = 0

    def _model_call(self, inps, attn_mask=None, labels=None, prefix_lens=None, lengths=None):
        """Re-states HFLM._model_call (lm-eval 0.4.13) with the mask; attn_mask/labels are seq2seq-only."""
        probe = prefix_lens is None
        if probe:
            # HFLM._detect_batch_size (batch_size="auto") probes with full rows and no boundary. Probe under
            # this run's mask, whole row as prompt: the plain causal call would not build the 4D mask the
            # real batches need, and could settle on a size that then runs out of memory.
            lengths = torch.full((inps.shape[0],), inps.shape[1], device=inps.device)
            prefix_lens = lengths
        padding = torch.arange(inps.shape[1], device=inps.device)[None, :] < lengths[:, None]
        mask = model_attention_mask(self.model.config, self.mask, padding, prefix_lens, self.model.dtype)
        if not probe:
            self.tokens_processed += int(lengths.sum())
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(input_ids=inps, attention_mask=mask).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Re-states ``HFLM._loglikelihood_tokens`` of lm-eval 0.4.13 (lm_eval/models/huggingface.py).

        Differences, all deliberate: each row's prompt length reaches ``_model_call``; the causal
        branch only (the backend is always "causal": upstream's seq2seq branch is left out); no
        one-token logits cache (see ``__init__``); truncation is logged once per call, not per request.
        """
        res = []
        reorder = Collator(requests, sort_fn=_longest_first)
        n_reordered = len(reorder)
        if self.batch_size != "auto":
            batch_size = self.batch_size
        else:
            batch_size = override_bs if override_bs is not None else 0
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and n_reordered > 0 and not override_bs else None
        if batch_fn is not None:
            # Upstream's out-of-memory fix (lm-eval issue #1678): detect afresh for this call's requests,
            # not reuse a size found for an earlier call's shorter ones.
            self.batch_sizes = {}
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc=f"loglikelihood ({self.mask})")
        truncated = 0
        for chunk in reorder.get_batched(n=batch_size, batch_fn=batch_fn):
            inps, prefix_lens, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in chunk:
                _check_request(context_enc, continuation_enc, self.max_length)
                full = context_enc + continuation_enc
                truncated += len(full) > self.max_length + 1
                # Left truncation as HFLM; the last token is only ever a target.
                inp = full[-(self.max_length + 1):][:-1]
                inps.append(torch.tensor(inp, dtype=torch.long, device=self.device))
                # Prompt tokens still inside the window (at least one: the continuation fits in max_length).
                prefix_lens.append(len(inp) - len(continuation_enc) + 1)
                cont_toks_list.append(continuation_enc)
            lengths = torch.tensor([len(x) for x in inps], device=self.device)
            padding_len = int(lengths.max())
            batched = pad_and_concat(padding_len, inps, padding_side="right")
            logits = self._model_call(
                batched,
                prefix_lens=torch.tensor(prefix_lens, device=self.device),
                lengths=lengths,
            )
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for (request_str, _, _), row, inplen, cont_toks in zip(
                chunk, logprobs, lengths.tolist(), cont_toks_list, strict=True
            ):
                # As upstream: skip "virtual tokens" a prompt-tuning adapter puts in front of the logits.
                end = inplen + (row.shape[0] - padding_len)
                row = row[end - len(cont_toks): end].unsqueeze(0)
                cont = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                is_greedy = bool((row.argmax(dim=-1) == cont).all())
                answer = (float(torch.gather(row, 2, cont.unsqueeze(-1)).sum()), is_greedy)
                res.append(answer)
                if request_str is not None:  # None: a loglikelihood_rolling window, cached per document
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        if truncated:
            log.warning("%d of %d requests exceed max_length %d: their prompts were truncated from the left",
                        truncated, len(requests), self.max_length)
        return reorder.get_original(res)
