"""lm-eval integration: python -m pytest tests/test_harness.py -q

The causal path must reproduce stock lm-eval HF results; the prefill_bidir path
must equal a brute-force forward with an explicit mask, request by request.
"""

import logging

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from ablate.core import lm_eval_model
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.models import load_model
from ablate.core.tasks import FIXTURE_DATA, STUDY_TASKS, load_tasks, task_manager

TASKS = [*STUDY_TASKS, "ablate_tiny"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(str(tiny_models("llama")), "cpu", "float32", "sdpa")


def evaluate(lm):
    manager = task_manager(None, TASKS)
    tasks = load_tasks(manager, TASKS, dict(FIXTURE_DATA))
    return simple_evaluate(model=lm, tasks=list(tasks.values()), log_samples=True, bootstrap_iters=0,
                           task_manager=manager)


def predictions(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]


def loglikelihoods(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0][0] for s in samples for r in s["resps"]]


def test_causal_equals_stock_lm_eval_on_the_study_tasks(llama):
    model, tokenizer = llama
    stock = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=4, device="cpu"))
    ours = evaluate(PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=4, device="cpu"))
    for task in TASKS:
        expected, got = loglikelihoods(stock, task), loglikelihoods(ours, task)
        assert len(got) == len(expected) > 0, task
        # Shared contexts reorder float32 sums (a packed row is longer than each request's): 1e-4, and the
        # same prediction for every document.
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)
        assert ours["results"][task]["acc,none"] == stock["results"][task]["acc,none"]
        assert predictions(ours, task) == predictions(stock, task)


def brute_force_loglikelihood(model, context_enc, continuation_enc):
    ids = torch.tensor([context_enc + continuation_enc])[:, :-1]
    n, p = ids.shape[1], len(context_enc)
    allowed = torch.tensor([[k <= q or (q < p and k < p) for k in range(n)] for q in range(n)])
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0], dim=-1)
    rows = logprobs[n - len(continuation_enc):]
    return float(rows.gather(1, torch.tensor(continuation_enc)[:, None]).sum())


def test_prefill_bidir_equals_brute_force_per_request(llama):
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=3, device="cpu")
    pairs = [
        ("Question: To dry wet shoes,\nAnswer:", " stuff them with newspaper overnight."),
        ("Question: To dry wet shoes,\nAnswer:", " fill them with water."),
        ("Mia has a red ball. What color is the ball of Mia?\nAnswer:", " red"),
        ("The cup did not fit in the box because the cup", " was too big."),
        ("A", " very long continuation that is longer than its context"),
    ]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    for (context, continuation), value in zip(pairs, got):
        context_enc, continuation_enc = lm._encode_pair(context, continuation)
        expected = brute_force_loglikelihood(model, context_enc, continuation_enc)
        assert value == pytest.approx(expected, abs=1e-5)
    causal = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=3, device="cpu")
    assert [ll for ll, _ in causal.loglikelihood(requests)] != pytest.approx(got, abs=1e-4)


def test_truncated_prompt_keeps_the_boundary(llama, caplog):
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2,
                       device="cpu", max_length=8)
    context = "Mia has a red ball and a blue kite. What color is the ball of Mia?\nAnswer:"
    with caplog.at_level(logging.WARNING, logger="ablate.core.lm_eval_model"):
        (value, _), = lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=(context, " red"), idx=0)])
    assert "1 of 1 requests exceed max_length 8" in caplog.text
    context_enc, continuation_enc = lm._encode_pair(context, " red")
    kept = (context_enc + continuation_enc)[-9:]
    expected = brute_force_loglikelihood(model, kept[: -len(continuation_enc)], continuation_enc)
    assert value == pytest.approx(expected, abs=1e-5)


def test_tokens_are_counted(llama):
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2, device="cpu")
    lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=("a b c", " d"), idx=0)])
    context_enc, continuation_enc = lm._encode_pair("a b c", " d")
    assert lm.tokens_processed == len(context_enc) + len(continuation_enc) - 1


def test_auto_batch_size_is_probed_under_the_mask_on_every_call(llama, monkeypatch):
    """Upstream's OOM fix: sizes found for one call's requests are not reused for the next call's."""
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size="auto",
                       max_batch_size=4, device="cpu")
    state = {"probing": False, "detections": 0, "probe_masks": []}
    detect, build = lm._detect_rows, lm_eval_model.model_attention_mask

    def counted_detect(*args):
        state["detections"] += 1
        state["probing"] = True
        try:
            return detect(*args)
        finally:
            state["probing"] = False

    def spied_build(*args, **kwargs):
        mask = build(*args, **kwargs)
        if state["probing"]:
            state["probe_masks"].append(mask)
        return mask

    monkeypatch.setattr(lm, "_detect_rows", counted_detect)
    monkeypatch.setattr(lm_eval_model, "model_attention_mask", spied_build)
    fixed = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=1, device="cpu")
    for pairs in ([("a b", " c d"), ("a", " b c")], [("a b c d e f g h", " i j"), ("x y", " z w")]):
        requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
        before = lm.tokens_processed
        got = [ll for ll, _ in lm.loglikelihood(requests)]
        assert got == pytest.approx([ll for ll, _ in fixed.loglikelihood(requests)], abs=1e-5)
        encoded = [lm._encode_pair(*pair) for pair in pairs]
        assert lm.tokens_processed - before == sum(len(c) + len(t) - 1 for c, t in encoded)  # probes not counted
    assert state["detections"] == 2
    # The probe built the run's 4D prefix mask, not the plain causal call's 2D padding mask.
    assert state["probe_masks"] and all(m.dim() == 4 for m in state["probe_masks"])


def test_requests_upstream_refuses_are_refused(llama):
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=2,
                       device="cpu", max_length=8)
    with pytest.raises(ValueError, match="empty continuation"):
        lm._loglikelihood_tokens([(("a", ""), [5], [])])
    with pytest.raises(ValueError, match="exceeds max_length 8"):
        lm._loglikelihood_tokens([(("a", " b"), [5], list(range(10, 19)))])


def test_a_shared_context_is_computed_once(llama):
    """Four choices of one question: the question goes through the model once (ablate.core.packing)."""
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=8, device="cpu")
    assert lm.logits_cache is False  # HFLM's own one-token cache stays off: the packing is the only sharing
    pairs = [("Question: a b c\nAnswer:", choice) for choice in (" A", " B", " C", " D")]
    got = lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)])
    encoded = [lm._encode_pair(*p) for p in pairs]
    assert lm.tokens_processed == len(encoded[0][0]) + sum(len(t) - 1 for _, t in encoded)
    assert lm.tokens_unshared == sum(len(c) + len(t) - 1 for c, t in encoded)
    # Unique: the question once, then each distinct prefix of the choices' inputs (" A" may be " " + "A").
    assert lm.tokens_unique == len(encoded[0][0]) + len({tuple(t[:k]) for _, t in encoded for k in range(1, len(t))})
    one_by_one = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=1, device="cpu")
    for (value, greedy), instance_pair in zip(got, pairs):
        ((alone, alone_greedy),) = one_by_one.loglikelihood([Instance("loglikelihood", doc={}, arguments=instance_pair,
                                                                       idx=0)])
        assert value == pytest.approx(alone, abs=1e-5) and greedy == alone_greedy
