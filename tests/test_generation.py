"""Generation under a mask: python -m pytest tests/test_generation.py -q

Causal: the loop equals transformers' greedy generate on a left-padded batch, token for token, and
lm-eval's generate_until through ablate equals stock HFLM. prefill_bidir: equals a brute-force
reference that recomputes the full masked forward (prompt block bidirectional, generated tokens
causal) at every step, one prompt at a time with no padding.
"""

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from ablate.core.generation import masked_greedy
from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.models import load_model

SLIDING = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
PROMPTS = ["Question: Mia has a red ball. What color is the ball of Mia?\nAnswer:", "The cup is", "A b c d e f g"]


@pytest.fixture(scope="module", params=[("llama", {}), ("qwen2", SLIDING)], ids=["llama", "qwen2-sliding"])
def model(request, tiny_models):
    arch, overrides = request.param
    return load_model(str(tiny_models(arch, **overrides)), "cpu", "float32", "sdpa")


def left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def brute_force(model, prompt_ids: list[int], steps: int, bidir: bool) -> list[int]:
    ids, p = list(prompt_ids), len(prompt_ids)
    for _ in range(steps):
        n = len(ids)
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (k <= q) | (bidir & (q < p) & (k < p))
        config = model.config
        if getattr(config, "layer_types", None):
            window = config.sliding_window
            sliding = allowed & ((q - k < window) | (bidir & (q < p) & (k < p)))
            masks = {"full_attention": allowed, "sliding_attention": sliding}
            mask = {kind: torch.where(m, 0.0, torch.finfo(torch.float32).min)[None, None] for kind, m in masks.items()}
        else:
            mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[p:]


def test_causal_loop_equals_transformers_generate(model):
    lm, tokenizer = model
    ids, attention = left_padded(tokenizer, PROMPTS)
    expected = lm.generate(input_ids=ids, attention_mask=attention, max_new_tokens=8, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=[], min_new_tokens=8)
    got = masked_greedy(lm, "causal", ids, attention, 8, None, tokenizer.pad_token_id, [])
    assert torch.equal(got, expected)


def test_prefill_bidir_equals_recomputing_the_masked_forward_every_step(model):
    lm, tokenizer = model
    ids, attention = left_padded(tokenizer, PROMPTS)
    got = masked_greedy(lm, "prefill_bidir", ids, attention, 8, None, tokenizer.pad_token_id, [])
    causal = masked_greedy(lm, "causal", ids, attention, 8, None, tokenizer.pad_token_id, [])
    assert not torch.equal(got, causal)  # the mask changed what was generated
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert got[row, ids.shape[1]:].tolist() == brute_force(lm, prompt_ids, 8, bidir=True)


def test_generate_until_through_lm_eval(model):
    lm, tokenizer = model
    requests = [Instance("generate_until", doc={}, idx=i,
                         arguments=(prompt, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0}))
                for i, prompt in enumerate(PROMPTS)]
    stock = HFLM(pretrained=lm, tokenizer=tokenizer, backend="causal", batch_size=3, device="cpu")
    causal = PrefillMaskLM(pretrained=lm, tokenizer=tokenizer, mask="causal", batch_size=3, device="cpu")
    assert causal.generate_until(requests) == stock.generate_until(requests)
    bidir = PrefillMaskLM(pretrained=lm, tokenizer=tokenizer, mask="prefill_bidir", batch_size=3, device="cpu")
    texts = bidir.generate_until(requests)
    for text, prompt in zip(texts, PROMPTS):
        expected = bidir.tok_decode(brute_force(lm, bidir.tok_encode(prompt), 6, bidir=True))
        for stop in ("\n\n", tokenizer.decode(lm.generation_config.eos_token_id)):  # lm-eval adds the EOS text
            expected = expected.split(stop)[0]
        assert text == expected


def test_sampling_under_a_prefix_mask_is_refused(model):
    lm, tokenizer = model
    bidir = PrefillMaskLM(pretrained=lm, tokenizer=tokenizer, mask="prefill_bidir", batch_size=1, device="cpu")
    request = Instance("generate_until", doc={}, idx=0,
                       arguments=("a b", {"until": ["\n"], "max_gen_toks": 3, "do_sample": True, "temperature": 0.7}))
    with pytest.raises(ValueError, match="greedy decoding only"):
        bidir.generate_until([request])


def test_gsm8k_through_stage1_and_stage2(tiny_llama, tmp_path):
    import json

    from ablate.cli import main

    rows = [{"question": f"Tom has {n} apples and buys {n + 1} more. How many apples does he have?",
             "answer": f"He has {n} + {n + 1} = {2 * n + 1} apples.\n#### {2 * n + 1}"} for n in range(4)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_llama), "--tasks", "gsm8k", "--task-data", f"gsm8k={data}", "--num-fewshot", "0",
              "--limit", "3", "--device", "cpu", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0
    assert main(["stage2", "--mask", "prefill_bidir", *common]) == 0
    (s1,) = (runs / "stage1_baseline_eval").iterdir()
    (s2,) = (runs / "stage2_ablation_eval").iterdir()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (s1, s2))
    task = m1["tasks"]["gsm8k"]
    assert task["metric"] == "exact_match,strict-match" and task["chance"] == 0.0 and task["n"] == 3
    assert set(task["exact_match"]) == {"strict-match", "flexible-extract"}
    assert task["acc"] == task["exact_match"]["strict-match"]["exact_match"]
    assert m1["macro"]["of"] == {"gsm8k": "exact_match,strict-match"}
    timing = m1["timing"]  # no loglikelihood work: generation is counted on its own
    assert timing["tokens"] == 0 and timing["tokens_per_second"] is None
    assert timing["generation"]["prompt_tokens"] > 0 and timing["generation"]["decode_positions"] > 0
    assert m2["baseline"]["run_id"] == s1.name and m2["baseline"]["tasks"]["gsm8k"]["acc_baseline"] == task["acc"]
    samples = [json.loads(line) for line in (s1 / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == [0, 1, 2]
    for sample, row in zip(samples, rows):
        assert sample["prompt"].startswith("Question: " + row["question"]) and sample["target"] == row["answer"]
        assert set(sample["filters"]) == {"strict-match", "flexible-extract"} and isinstance(sample["generated"], str)
        assert sample["correct"] == sample["filters"]["strict-match"]["exact_match"]
    assert sum(s["correct"] for s in samples) / 3 == pytest.approx(task["acc"])


def test_status_and_report_name_exact_match_for_generative_tasks(tiny_llama, tmp_path):
    import json

    from ablate.cli import main
    from ablate.results.report import write_report
    from ablate.results.status import render

    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"})
                    + "\n")
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_llama), "--tasks", "gsm8k,ablate_tiny", "--task-data", f"gsm8k={data}",
              "--num-fewshot", "0", "--limit", "1", "--device", "cpu", "--runs-dir", str(runs)]
    assert main(["stage1", *common]) == 0 and main(["stage2", *common]) == 0
    status = render(runs)
    assert "Macro score (accuracy; exact match for generative tasks)" in status
    assert "- gsm8k (exact_match,strict-match): `" in status and "- ablate_tiny: `" in status
    report = write_report(runs, tmp_path / "RESULTS.md").read_text()
    assert "| gsm8k (exact_match,strict-match) |" in report and "| ablate_tiny |" in report
