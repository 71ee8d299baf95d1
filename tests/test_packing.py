"""Prefix-shared scoring equals one request at a time: python -m pytest tests/test_packing.py -q

Every supported architecture (sliding windows included), both masks, sdpa and
eager: requests sharing a context are packed into one row, and each request's
loglikelihood must equal a brute-force forward of that request alone with an
explicit 4D mask built by hand (not by the code under test).
"""

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.masks import mask_kinds as _mask_kinds
from ablate.core.models import load_model
from ablate.core.packing import Row, pack, unique_tokens, unshared_tokens

SLIDING = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
ARCHS = [("llama", {}), ("mistral", {"sliding_window": 4}), ("ministral3", {}), ("qwen2", SLIDING),
         ("qwen3", SLIDING), ("mistral3", {})]
PAIRS = [
    ("Question: To dry wet shoes,\nAnswer:", " stuff them with newspaper overnight."),
    ("Question: To dry wet shoes,\nAnswer:", " fill them with water."),
    ("Question: To dry wet shoes,\nAnswer:", " put them in the oven at full heat for a day."),
    ("Mia has a red ball. What color is the ball of Mia?\nAnswer:", " red"),
    ("Mia has a red ball. What color is the ball of Mia?\nAnswer:", " blue"),
    ("Mia has a red ball. What color is the ball of Mia?\nAnswer:", " red"),  # the same request twice
    ("The cup did not fit in the box because the cup", " was too big."),
    ("A", " very long continuation that is longer than its context"),
]


def brute_force(model, context_enc, continuation_enc, mask_name):
    ids = torch.tensor([context_enc + continuation_enc])[:, :-1]
    n, p = ids.shape[1], len(context_enc)
    config = model.config
    window = getattr(config, "sliding_window", None)

    def allowed(kind):
        grid = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for k in range(n):
                causal = k <= q and (kind != "sliding_attention" or q - k < window)
                grid[q, k] = causal or (mask_name == "prefill_bidir" and q < p and k < p)
        return torch.where(grid, 0.0, torch.finfo(torch.float32).min)[None, None]

    masks = {kind: allowed(kind) for kind in _mask_kinds(config)}
    mask = masks if getattr(config, "layer_types", None) else next(iter(masks.values()))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0], dim=-1)
    rows = logprobs[n - len(continuation_enc):]
    return float(rows.gather(1, torch.tensor(continuation_enc)[:, None]).sum())


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("mask", ["causal", "prefill_bidir"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_rows_equal_one_request_at_a_time(tiny_models, arch, overrides, mask, impl):
    model, tokenizer = load_model(str(tiny_models(arch, **overrides)), "cpu", "float32", impl)
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, batch_size=2, device="cpu")
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    encoded = [lm._encode_pair(*pair) for pair in PAIRS]
    for (context_enc, continuation_enc), value in zip(encoded, got):
        assert value == pytest.approx(brute_force(model, context_enc, continuation_enc, mask), abs=1e-4)
    assert lm.tokens_processed < lm.tokens_unshared  # the shared contexts went through once
    if overrides.get("sliding_window"):  # the window bites: some inputs are longer than it
        assert max(len(c) + len(t) for c, t in encoded) > overrides["sliding_window"] + 1


def test_pack_groups_by_context_and_keeps_truncated_requests_alone():
    requests = [([1, 2, 3], [7]), ([1, 2, 3], [8, 9]), ([1, 2, 3], [7]), ([4], [5, 6]), ([1, 2, 3, 4, 5], [6, 7])]
    rows, truncated = pack(requests, max_length=5, share=True)
    assert truncated == 1
    by_context = {tuple(r.context): r for r in rows}
    shared = by_context[(1, 2, 3)]
    assert shared.continuations == [[7], [8, 9]] and shared.requests == [[0, 2], [1]]
    assert shared.tokens() == [1, 2, 3, 8]
    assert shared.layout() == ([0, 0, 0, 2], [0, 1, 2, 3])
    assert shared.score_indices() == [[2], [2, 3]]
    # lm-eval's truncation: the last max_length + 1 tokens, the prompt boundary moving with them.
    assert by_context[(2, 3, 4, 5)].continuations == [[6, 7]]
    assert unshared_tokens(requests, 5) == 3 + 4 + 3 + 2 + 5
    assert unique_tokens(rows) == 4 + 2 + 5  # 1 2 3 then 8; 4 5; and the truncated row's 2 3 4 5 6
    unshared, _ = pack(requests, max_length=5, share=False)
    assert all(len(r.continuations) == 1 for r in unshared if r.requests != [[0, 2]])


def test_a_row_is_scored_at_the_context_end_then_its_own_tokens():
    row = Row([5, 6], [[1, 2, 3], [4]], [[0], [1]])
    assert row.tokens() == [5, 6, 1, 2]
    assert row.score_indices() == [[1, 2, 3], [1]]
