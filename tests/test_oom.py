"""Out of memory while scoring or generating: python -m pytest tests/test_oom.py -q

``ABLATE_FAULT_OOM_ROWS=N`` (ablate.faults) makes every forward and generate call of more than N rows raise
torch.OutOfMemoryError, so the halving retries run on CPU: the results must be those of a run without the
fault (the same rows, fewer per call), each halving recorded; at one row the run fails with one line.
"""

import json
import logging
import re

import pytest
import torch
from lm_eval.api.instance import Instance

from ablate.core.lm_eval_model import PrefillMaskLM
from ablate.core.models import load_model
from ablate.core.oom import generate_in_halves, is_out_of_memory

PAIRS = [(f"Question {n}: the cup {'did not fit in the box' * (n % 3)} because", choice)
         for n in range(6) for choice in (" it was big.", " the box was small.")]
PAIRS += [("A b c d e f g", " h"), ("To dry wet shoes,", " stuff them with newspaper overnight.")]
PROMPTS = ["Question: Mia has a red ball. What color is the ball of Mia?\nAnswer:", "The cup is", "A b c d e f g",
           "To dry wet shoes,", "She rubs shampoo into the dog's fur.", "x", "The cup did not fit in the box because"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(str(tiny_models("llama")), "cpu", "float32", "sdpa")


def scores(model, tokenizer, mask):
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, batch_size=8, device="cpu")
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]
    return lm.loglikelihood(requests, disable_tqdm=True), lm


def test_out_of_memory_is_what_accelerate_and_torch_call_it():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory."))


@pytest.mark.parametrize("mask", ["causal", "prefill_bidir"])
def test_scoring_halves_the_batch_and_gives_the_same_results(llama, mask, monkeypatch, caplog):
    model, tokenizer = llama
    expected, clean = scores(model, tokenizer, mask)
    assert clean.oom_retries == []
    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "3")
    with caplog.at_level(logging.WARNING, logger="ablate"):
        got, lm = scores(model, tokenizer, mask)
    assert got == expected  # exact: each row's logits do not depend on the other rows of its forward
    assert lm.tokens_processed == clean.tokens_processed  # no row computed twice, none skipped
    assert [(r["rows"], r["retry_rows"], r["during"]) for r in lm.oom_retries] == [
        (8, 4, "loglikelihood"), (4, 2, "loglikelihood")]  # then 2 rows a forward for the rest of the call
    lines = [r.getMessage() for r in caplog.records if r.name == "ablate.core.oom"]
    assert lines == [f"out of memory on 8 rows of {lm.oom_retries[0]['tokens']} tokens during loglikelihood: "
                     "retrying with 4",
                     f"out of memory on 4 rows of {lm.oom_retries[1]['tokens']} tokens during loglikelihood: "
                     "retrying with 2"]


def test_scoring_out_of_memory_at_one_row_is_raised(llama, monkeypatch):
    model, tokenizer = llama
    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "0")
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory on 1 row of \d+ tokens during loglikelihood"):
        scores(model, tokenizer, "causal")


def test_other_errors_are_not_retried(llama, monkeypatch):
    model, tokenizer = llama
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="causal", batch_size=8, device="cpu")

    def broken(rows):
        raise RuntimeError("an unrelated failure")

    monkeypatch.setattr(lm, "_forward", broken)
    with pytest.raises(RuntimeError, match="an unrelated failure"):
        lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=PAIRS[0], idx=0)], disable_tqdm=True)
    assert lm.oom_retries == []


def test_halves_are_joined_as_one_batch_and_padded_on_the_right():
    pad, context = 9, torch.arange(10).reshape(5, 2)
    mask = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1], [1, 1]])
    new_tokens = [1, 3, 2, 1, 1]  # row i is done after new_tokens[i] tokens
    calls = []

    def fake_generate(ids, attention, limit):
        """As transformers.generate: a batch ends with its longest row, the others padded."""
        rows = (ids[:, 0] // 2).tolist()
        calls.append(rows)
        assert torch.equal(attention, mask[rows])
        if len(rows) > limit:
            return None
        width = max(new_tokens[r] for r in rows)
        new = [[100 + r] * new_tokens[r] + [pad] * (width - new_tokens[r]) for r in rows]
        return torch.cat([ids, torch.tensor(new)], dim=1)

    whole = generate_in_halves(lambda ids, a: fake_generate(ids, a, 5), context, mask, pad)
    calls.clear()
    split = generate_in_halves(lambda ids, a: fake_generate(ids, a, 1), context, mask, pad)
    assert torch.equal(split, whole) and whole.shape == (5, 5)
    assert calls == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1], [0], [1], [2], [3, 4], [3], [4]]


def generate(model, tokenizer, mask, until, widths=None):
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, batch_size=8, device="cpu")
    if widths is not None:  # the width of each generate call that returned
        inner = lm._generate_rows

        def spied(*args):
            out = inner(*args)
            widths.append(out.shape[1])
            return out

        lm._generate_rows = spied
    kwargs = {"until": until, "max_gen_toks": 10, "do_sample": False, "temperature": 0}
    requests = [Instance("generate_until", doc={}, idx=i, arguments=(p, dict(kwargs))) for i, p in enumerate(PROMPTS)]
    return lm.generate_until(requests, disable_tqdm=True), lm


@pytest.mark.parametrize("mask", ["causal", "prefill_bidir"])
def test_generation_splits_the_batch_and_gives_the_same_text(llama, mask, monkeypatch):
    model, tokenizer = llama
    free, _ = generate(model, tokenizer, mask, [])
    # A stop string from most rows' own text, met at different steps: the halves end at different lengths
    # and the shorter ones are padded on the right.
    stops = [m.group() for text in free[1:] if (m := re.search(r"[A-Za-z]{3}", text[2:]))]
    assert len(stops) >= 4
    expected, clean = generate(model, tokenizer, mask, stops)
    assert clean.oom_retries == [] and expected != free
    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "2")
    widths = []
    got, lm = generate(model, tokenizer, mask, stops, widths)
    assert got == expected
    # 7 rows -> 4 + 3 -> 2 + 2 + 2 + 1
    assert [(r["rows"], r["retry_rows"], r["during"]) for r in lm.oom_retries] == [
        (7, 4, "generate_until"), (4, 2, "generate_until"), (3, 2, "generate_until")]
    assert len(widths) == 4 and len(set(widths)) > 1  # the halves' outputs were joined with padding


def test_generation_out_of_memory_at_one_row_is_raised(llama, monkeypatch):
    model, tokenizer = llama
    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "0")
    with pytest.raises(torch.OutOfMemoryError, match="out of memory on 1 row of .* during generate_until"):
        generate(model, tokenizer, "prefill_bidir", ["\n\n"])


# A generative task of the project's own: 8 new tokens a document, where gsm8k asks for 256.
GEN_TASK = """task: oom_gen
dataset_path: json
dataset_name: null
output_type: generate_until
test_split: test
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 8, do_sample: false, temperature: 0.0}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""


@pytest.fixture
def gen_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "oom_gen.yaml").write_text(GEN_TASK)
    data = tmp_path / "oom_gen.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "red"}) + "\n" for q in PROMPTS[:3]))
    return ["--include-path", str(folder), "--task-data", f"oom_gen={data}"]


def stage1(tiny_llama, runs, gen_task):
    from ablate.cli import main

    return main(["stage1", "--model", str(tiny_llama), "--tasks", "ablate_tiny,oom_gen", *gen_task,
                 "--limit", "3", "--batch-size", "8", "--device", "cpu", "--runs-dir", str(runs)])


def test_stage1_records_the_retries_in_metrics_and_the_run_log(tiny_llama, tmp_path, gen_task, monkeypatch):
    assert stage1(tiny_llama, tmp_path / "clean", gen_task) == 0
    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "2")
    assert stage1(tiny_llama, tmp_path / "oom", gen_task) == 0
    (clean,), (oom,) = (list((tmp_path / r / "stage1_baseline_eval").iterdir()) for r in ("clean", "oom"))
    m_clean, m_oom = (json.loads((d / "metrics.json").read_text()) for d in (clean, oom))
    assert m_clean["oom_retries"] == []
    during = [(r["during"], r["rows"], r["retry_rows"]) for r in m_oom["oom_retries"]]
    # ablate_tiny: 3 documents x 4 choices share 3 contexts: 3 rows; oom_gen: one batch of 3 prompts.
    assert during == [("loglikelihood", 3, 2), ("generate_until", 3, 2)]
    assert m_oom["tasks"] == m_clean["tasks"]
    for name in ("samples_ablate_tiny.jsonl", "samples_oom_gen.jsonl"):
        assert (oom / name).read_text() == (clean / name).read_text()
    # Every evaluation run records its peak memory (ablate.core.memory); a measurement the reader does not verify.
    from ablate.results import rundir
    from ablate.results.verified import verified_metrics

    parameter_bytes = sum(p.numel() * p.element_size() for p in load_model(str(tiny_llama), "cpu", "float32",
                                                                           "sdpa")[0].parameters())
    memory = m_oom["peak_memory"]
    assert memory["measure"] == "cpu_peak_rss" and memory["bytes"] == memory["cpu_peak_rss_bytes"] > parameter_bytes
    assert memory["cuda_max_allocated_bytes"] is None and memory["cpu_peak_rss_since"] == "run start"
    assert verified_metrics(rundir.load_run(oom), tmp_path / "oom")["peak_memory"] == memory
    log = (oom / "run.log").read_text()
    for r in m_oom["oom_retries"]:
        assert (f"WARNING ablate.core.oom: out of memory on {r['rows']} rows of {r['tokens']} tokens during "
                f"{r['during']}: retrying with {r['retry_rows']}") in log


def test_stage1_fails_with_one_line_when_one_row_does_not_fit(tiny_llama, tmp_path, gen_task, monkeypatch, capsys):
    from ablate.results import rundir

    monkeypatch.setenv("ABLATE_FAULT_OOM_ROWS", "0")
    assert stage1(tiny_llama, tmp_path / "runs", gen_task) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ablate: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("ablate: error: OutOfMemoryError: out of memory on 1 row of ")
    assert "even after halving the batch" in errors[0]
    (run,) = (tmp_path / "runs" / "stage1_baseline_eval").iterdir()
    status, reason = rundir.read_status(run)
    assert status == rundir.FAILED and reason.startswith("OutOfMemoryError: out of memory on 1 row of ")
    assert "out of memory on 3 rows of" in (run / "run.log").read_text()
