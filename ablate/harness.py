"""The lm-eval model that reads the prompt (the "prefill") with a named attention mask.

    python -m pytest tests/test_harness.py -q

``PrefillMaskLM`` subclasses lm-eval's ``HFLM`` and is registered as
``ablate-hf``. lm-eval hands a loglikelihood request over as
``(context tokens, continuation tokens)``; the context is the prefill. Stock HFLM
drops that boundary before the forward pass, so the request loop is re-stated
here (same truncation, batching order, padding and scoring as HFLM) with the
one difference that each row's prefix length reaches the mask. Everything else
(tokenization, task logic, generation, metrics) is lm-eval's own.
"""

from __future__ import annotations

import subprocess

import torch
import torch.nn.functional as F
from lm_eval import evaluator as lm_eval_evaluator
from lm_eval.api.registry import register_model
from lm_eval.models import huggingface as lm_eval_hf
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ablate.masks import check_attention_backend, get_mask, model_attention_mask


def _quiet_git_hash() -> str | None:
    """lm-eval 0.4.13's ``get_git_commit_hash`` lets git print "fatal: not a git repository" outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# simple_evaluate records the git hash of the working directory; ablate's env.json has its own.
lm_eval_evaluator.get_git_commit_hash = _quiet_git_hash


@register_model("ablate-hf")
class PrefillMaskLM(HFLM):
    def __init__(self, pretrained, mask: str = "causal", **kwargs):
        get_mask(mask)
        if mask != "causal":
            # lm-eval's one-token logits cache shares a forward pass between requests whose
            # context+continuation agree but whose prompt boundary may differ.
            kwargs["logits_cache"] = False
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)
        check_attention_backend(mask, self.model.config._attn_implementation)
        self.mask = mask
        self.tokens_processed = 0

    def _model_call(self, inps, attn_mask=None, labels=None, prefix_lens=None, lengths=None):
        if prefix_lens is None:  # lm-eval's own calls (batch-size probing): plain causal
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        padding = torch.arange(inps.shape[1], device=inps.device)[None, :] < lengths[:, None]
        mask = model_attention_mask(self.model.config, self.mask, padding, prefix_lens, self.model.dtype)
        self.tokens_processed += int(lengths.sum())
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(input_ids=inps, attention_mask=mask).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        res = []
        reorder = lm_eval_hf.Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        batch_size = self.batch_size if self.batch_size != "auto" else (override_bs or 0)
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and len(reorder) and not override_bs else None
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc=f"loglikelihood ({self.mask})")
        for chunk in reorder.get_batched(n=batch_size, batch_fn=batch_fn):
            inps, prefix_lens, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in chunk:
                # Same left truncation as HFLM; the last token is only ever a target.
                full = (context_enc + continuation_enc)[-(self.max_length + 1):]
                inp = full[:-1]
                inps.append(torch.tensor(inp, dtype=torch.long, device=self.device))
                # Prompt tokens still inside the window after truncation.
                prefix_lens.append(max(len(inp) - len(continuation_enc) + 1, 0))
                cont_toks_list.append(continuation_enc)
            lengths = torch.tensor([len(x) for x in inps], device=self.device)
            batched = lm_eval_hf.pad_and_concat(int(lengths.max()), inps, padding_side="right")
            logits = self._model_call(
                batched,
                prefix_lens=torch.tensor(prefix_lens, device=self.device),
                lengths=lengths,
            )
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for (request_str, _, _), row, inplen, cont_toks in zip(chunk, logprobs, lengths.tolist(), cont_toks_list):
                row = row[inplen - len(cont_toks): inplen].unsqueeze(0)
                cont = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                is_greedy = bool((row.argmax(dim=-1) == cont).all())
                answer = (float(torch.gather(row, 2, cont.unsqueeze(-1)).sum()), is_greedy)
                res.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return reorder.get_original(res)
