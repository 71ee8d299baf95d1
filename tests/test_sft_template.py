"""Stage 3 on GSM8K-style rows in lm-eval's gsm8k prompt: python -m pytest tests/test_sft_template.py -q

The finetuning prompt is rendered from ``--prompt-template`` / ``--response-template``
and split into prompt and response tokens the way lm-eval splits a context and its
continuation (``TemplateLM._encode_pair``), so training and evaluation read the same tokens.
"""

import json
import types

import pytest
from lm_eval.api.model import TemplateLM

from ablate.cli import main
from ablate.core.assets import GSM8K, MARKER, SMOLLM2, cache_root
from ablate.core.models import load_tokenizer
from ablate.core.sft_data import RowFormat, load_rows, tokenize
from ablate.errors import BadInput
from ablate.stages.config import load_finetune_config

PROMPT, RESPONSE = "Question: {question}\nAnswer:", " {answer}"  # lm-eval's gsm8k doc_to_text, target_delimiter
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]


def encode_pair(tokenizer, context: str, continuation: str):
    """lm-eval's own split of a context and continuation (the causal backend), for this tokenizer."""
    lm = types.SimpleNamespace(backend="causal",
                               tok_encode=lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    return TemplateLM._encode_pair(lm, context, continuation)


def examples(rows, tokenizer, fmt):
    return tokenize(rows, tokenizer, fmt, max_length=2048, split_range=(0.25, 0.75), truncate_prompts=False, seed=0)


def test_the_gsm8k_template_gives_lm_evals_prompt_and_the_loss_on_the_answer(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    fmt = RowFormat(prompt_template=PROMPT, response_template=RESPONSE)
    for row, e in zip(GSM8K_ROWS, examples(GSM8K_ROWS, tokenizer, fmt)):
        context, target = f"Question: {row['question']}\nAnswer:", " " + row["answer"]
        decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
        assert e.input_ids[0] == tokenizer.bos_token_id
        assert decode(e.input_ids[1:e.prefix_len]) == context
        assert e.labels[:e.prefix_len] == [-100] * e.prefix_len
        assert e.labels[e.prefix_len:] == e.input_ids[e.prefix_len:]
        assert decode(e.labels[e.prefix_len:-1]) == target and e.labels[-1] == tokenizer.eos_token_id
        assert (e.input_ids[1:e.prefix_len], e.input_ids[e.prefix_len:-1]) == encode_pair(tokenizer, context, target)


def test_a_prompt_ending_in_a_space_splits_otherwise_than_lm_eval(tiny_llama):
    # lm-eval moves a context's trailing spaces into the continuation: the space belongs in the response template.
    tokenizer = load_tokenizer(str(tiny_llama))
    row = GSM8K_ROWS[0]
    (e,) = examples([row], tokenizer, RowFormat(prompt_template=PROMPT + " ", response_template="{answer}"))
    context, target = encode_pair(tokenizer, f"Question: {row['question']}\nAnswer: ", row["answer"])
    assert e.input_ids[1:e.prefix_len] != context and e.input_ids[e.prefix_len:-1] != target


def test_a_real_bpe_tokenizer_splits_every_gsm8k_row_as_lm_eval():
    model, data = cache_root() / "models" / SMOLLM2["name"], cache_root() / "data" / "gsm8k" / "test.jsonl"
    if not (model / MARKER).is_file() or not data.is_file():
        pytest.skip("SmolLM2 and GSM8K are not cached; `ablate fetch` brings them")
    tokenizer = load_tokenizer(str(model))
    rows = load_rows(str(data), RowFormat(prompt_template=PROMPT, response_template=RESPONSE))
    assert len(rows) == GSM8K["rows"]
    got = examples(rows, tokenizer, RowFormat(prompt_template=PROMPT, response_template=RESPONSE))
    bos = int(tokenizer.bos_token_id is not None)
    differ = [i for i, (row, e) in enumerate(zip(rows, got))
              if (e.input_ids[bos:e.prefix_len], e.input_ids[e.prefix_len:-1])
              != encode_pair(tokenizer, f"Question: {row['question']}\nAnswer:", " " + row["answer"])]
    assert not differ, f"{len(differ)} rows split otherwise than lm-eval, first {differ[0]}"


def test_stage3_trains_on_gsm8k_rows_through_the_cli(tiny_llama, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS * 3))
    runs = tmp_path / "runs"
    # What a shell passes for 'Question: {question}\nAnswer:': a backslash and an n.
    code = main(["stage3", "--model", str(tiny_llama), "--data", str(data), "--device", "cpu",
                 "--prompt-template", "Question: {question}\\nAnswer:", "--response-template", RESPONSE,
                 "--max-steps", "2", "--save-steps", "2", "--warmup-steps", "0", "--batch-size", "2",
                 "--max-length", "256", "--eval-fraction", "0.2", "--runs-dir", str(runs)])
    assert code == 0, capsys.readouterr().err
    (run,) = (runs / "stage3_finetune_prefill_bidir").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2 and summary["n_eval"] == 1
    assert summary["leakage_guard"]["passed"] and summary["probe"]["after"]["n_samples"] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["prompt_template"] == PROMPT and config["response_template"] == RESPONSE


@pytest.mark.parametrize("flags,message", [
    ({"prompt_template": "Question: {question\nAnswer:"},
     "--prompt-template 'Question: {question\\nAnswer:': unmatched '{'"),
    ({"prompt_template": "Question: question}"}, "Single '}' encountered"),
    ({"prompt_template": "Question: {}"}, "positional field {}"),
    ({"response_template": " {0}"}, "--response-template ' {0}': positional field {0}"),
    ({"response_template": " {answer:d}"}, "Unknown format code 'd'"),
    ({"response_template": " {answer!x}"}, "Unknown conversion specifier x"),
    ({"prompt_template": "{question.upper}"}, "reads an attribute or index"),
    ({"prompt_template": PROMPT, "text_field": "text"}, "do not go with --text-field"),
])
def test_a_malformed_template_is_refused_in_one_line(flags, message):
    with pytest.raises(BadInput) as raised:
        load_finetune_config({"model": "m", "data": "d.jsonl", "device": "cpu", **flags})
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("fmt,message", [
    (RowFormat(prompt_template="Question: {qestion}\nAnswer:", response_template=RESPONSE),
     "lacks field(s) qestion named by --prompt-template 'Question: {qestion}\\nAnswer:' (it has question, answer)"),
    (RowFormat(prompt_template=PROMPT), "lacks field(s) response (it has question, answer)"),
    (RowFormat(prompt_template=PROMPT, response_template="{question:>{answer}}"), "row 0: --response-template"),
    (RowFormat(prompt_template=PROMPT, response_template="{answer:.0}"), "row 0: --response-template '{answer:.0}' "
                                                                         "renders an empty response"),
])
def test_rows_the_templates_cannot_fill_are_refused(tmp_path, fmt, message):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    with pytest.raises(BadInput) as raised:
        load_rows(str(data), fmt)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_without_templates_the_fields_are_read_as_they_are(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "response": " 4", "other": 1}) + "\n")
    fmt = RowFormat()
    (row,) = load_rows(str(data), fmt)
    assert row == {"prompt": "2+2=", "response": " 4"} and fmt.render(row, "row 0") == ("2+2=", " 4")
