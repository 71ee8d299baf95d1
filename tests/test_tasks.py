"""Task and task-data checks that run before any model work: python -m pytest tests/test_tasks.py -q"""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.errors import BadInput
from ablate.core.tasks import FIXTURE_DATA, SCORED_OUTPUT_TYPES, load_tasks, parse_task_data, task_manager

PIQA_ROWS = [json.loads(line) for line in FIXTURE_DATA["piqa"].read_text().splitlines()]
WINOGRANDE_ROWS = [json.loads(line) for line in FIXTURE_DATA["winogrande"].read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build(manager, name: str, data: Path):
    return load_tasks(manager, [name], parse_task_data([f"{name}={data}"]))[name]


def acc(task, doc, pred: int) -> float:
    """What lm-eval scores for ``doc`` when the model's highest loglikelihood is on choice ``pred``."""
    n = len(task.doc_to_choice(doc))
    return task.process_results(doc, [(0.0 if i == pred else -5.0, i == pred) for i in range(n)])["acc"]


@pytest.fixture(scope="module")
def study():
    return task_manager(None, ["piqa", "winogrande"])


CUSTOM = {
    # A bare-field target naming a choice text, as many hub datasets do.
    "colors": "task: colors\ndataset_path: json\noutput_type: multiple_choice\ntest_split: test\n"
              "doc_to_text: \"{{q}}\"\ndoc_to_target: answer\ndoc_to_choice: opts\n",
    # Options in the context, one shared continuation: gold is what doc_to_text returns.
    "fill": "task: fill\ndataset_path: json\noutput_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: \"{{idx}}\"\ndoc_to_target: \"{{rest}}\"\ndoc_to_choice: \"{{[a, b]}}\"\n",
    "story": "task: story\ndataset_path: json\noutput_type: generate_until\ntest_split: test\n"
             "doc_to_text: \"{{q}}\"\ndoc_to_target: answer\n",
}


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom_tasks")
    for name, text in CUSTOM.items():
        (folder / f"{name}.yaml").write_text(text)
    (folder / "_shared_template.yaml").write_text("output_type: multiple_choice\n")  # no task: an include
    return task_manager(str(folder), list(CUSTOM))


# 1. Digit-string labels score as int labels; choice-text targets still score.

def test_digit_string_labels_score_like_int_labels(study, tmp_path):
    ints = build(study, "piqa", write_jsonl(tmp_path / "int.jsonl", PIQA_ROWS))
    str_rows = [{**r, "label": str(r["label"])} for r in PIQA_ROWS]
    strs = build(study, "piqa", write_jsonl(tmp_path / "str.jsonl", str_rows))
    assert [ints.doc_to_target(d) for d in ints.eval_docs] == [r["label"] for r in PIQA_ROWS]
    assert [strs.doc_to_target(d) for d in strs.eval_docs] == [r["label"] for r in PIQA_ROWS]
    for pred in (0, 1):
        expected = [float(r["label"] == pred) for r in PIQA_ROWS]
        assert [acc(ints, d, pred) for d in ints.eval_docs] == expected
        assert [acc(strs, d, pred) for d in strs.eval_docs] == expected


def test_choice_text_targets_still_score(custom, tmp_path):
    rows = [{"q": "Sky?", "opts": ["red", "blue", "green"], "answer": "blue"},
            {"q": "Count?", "opts": ["0", "1", "2"], "answer": "2"}]  # digit texts at their own index
    task = build(custom, "colors", write_jsonl(tmp_path / "colors.jsonl", rows))
    docs = list(task.eval_docs)
    assert [acc(task, docs[0], p) for p in range(3)] == [0.0, 1.0, 0.0]
    assert [acc(task, docs[1], p) for p in range(3)] == [0.0, 0.0, 1.0]


def test_digit_label_that_is_another_choice_text_is_refused(custom, tmp_path):
    rows = [{"q": "Which?", "opts": ["1", "2"], "answer": "1"}]
    with pytest.raises(BadInput, match=r"row 0 of its data file .*colors.jsonl has label '1', both the text "
                                        r"of choice 0 and index 1"):
        build(custom, "colors", write_jsonl(tmp_path / "colors.jsonl", rows))


# 2. Labels lm-eval would count wrong whatever the model answers.

@pytest.mark.parametrize("label,shown", [(2, "2"), (-1, "-1"), (None, "null"), ("7", "'7'"), ("x", "'x'")])
def test_unscorable_label_is_refused(label, shown, study, tmp_path):
    # One label type per file: datasets reads a column of mixed types as JSON, and "7" back as 7.
    same_type = str if isinstance(label, str) else (lambda value: value)
    rows = [{**PIQA_ROWS[0], "label": same_type(0)}, {**PIQA_ROWS[1], "label": label},
            {**PIQA_ROWS[2], "label": same_type(1)}]
    data = write_jsonl(tmp_path / "piqa.jsonl", rows)
    message = rf"^task 'piqa': row 1 of its data file {data} has label {shown}, which is not a choice index"
    with pytest.raises(BadInput, match=message):
        build(study, "piqa", data)


def test_winogrande_answer_outside_its_options(study, tmp_path):
    rows = [WINOGRANDE_ROWS[0], {**WINOGRANDE_ROWS[1], "answer": "3"}]
    with pytest.raises(BadInput, match=r"task 'winogrande': row 1 of its data file .*wg.jsonl .*KeyError: '3'"):
        build(study, "winogrande", write_jsonl(tmp_path / "wg.jsonl", rows))


def test_multiple_input_gold_index_out_of_range(custom, tmp_path):
    rows = [{"idx": i, "a": "Ann", "b": "Bob", "rest": "left."} for i in (0, 5)]
    with pytest.raises(BadInput, match=r"task 'fill': row 1 of its data file .*fill.jsonl has label 5, "
                                       r"which is not a choice index \(it has 2 choices\)"):
        build(custom, "fill", write_jsonl(tmp_path / "fill.jsonl", rows))


@pytest.mark.parametrize("rows, says", [
    # piqa: sol1/sol2 are its two choices; the same text twice is a tie that decides the score, not the model
    ([{**PIQA_ROWS[0], "sol2": PIQA_ROWS[0]["sol1"], "label": 0}, PIQA_ROWS[1]], "1 have their gold choice twice (rows 0)"),
    ([PIQA_ROWS[0], {**PIQA_ROWS[1], "sol1": "same", "sol2": "same", "label": 1},
      {**PIQA_ROWS[2], "sol1": "x", "sol2": "x", "label": 0}], "2 have their gold choice twice (rows 1, 2)"),
])
def test_documents_that_cannot_be_scored_right_or_wrong_are_refused_with_their_count(rows, says, study, tmp_path):
    data = write_jsonl(tmp_path / "piqa.jsonl", rows)
    with pytest.raises(BadInput, match=rf"task 'piqa': \d+ of {len(rows)} documents of its data file .* cannot be "
                                       rf"scored right or wrong: {re.escape(says)}"):
        build(study, "piqa", data)


def test_a_one_choice_document_is_refused(custom, tmp_path):
    rows = [{"q": "sky?", "answer": "blue", "opts": ["blue", "red"]}, {"q": "grass?", "answer": "green",
                                                                        "opts": ["green"]}]
    with pytest.raises(BadInput, match=r"1 of 2 documents .* cannot be scored right or wrong: 1 have a single "
                                       r"choice \(rows 1\)"):
        build(custom, "colors", write_jsonl(tmp_path / "colors.jsonl", rows))


# 3. Task-data files that cannot be read as rows.

def test_non_utf8_task_data(tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_bytes(json.dumps(PIQA_ROWS[0]).encode() + b"\n" + b'{"goal": "caf\xe9"}\n')
    with pytest.raises(BadInput, match=r"piqa.jsonl line 2 is not UTF-8 text \(byte 0xe9"):
        parse_task_data([f"piqa={data}"])


def test_task_data_directory(tmp_path):
    with pytest.raises(BadInput, match="--task-data file for 'piqa' is a directory"):
        parse_task_data([f"piqa={tmp_path}"])


def test_unreadable_task_data(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "piqa.jsonl", PIQA_ROWS)

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, so refuse the open itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(BadInput, match="piqa.jsonl for 'piqa' cannot be read: Permission denied"):
        parse_task_data([f"piqa={data}"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_empty_json_array(suffix, tmp_path):
    data = tmp_path / f"piqa{suffix}"
    data.write_text("[]\n")
    with pytest.raises(BadInput, match="for 'piqa' has no rows"):
        parse_task_data([f"piqa={data}"])


def test_json_array_rows_are_checked_like_lines(study, tmp_path):
    data = tmp_path / "piqa.json"
    data.write_text(json.dumps(PIQA_ROWS[:2] + [{"goal": "x", "sol1": "a", "label": 0}]))
    with pytest.raises(BadInput, match="piqa.json item 2 lacks field"):
        build(study, "piqa", data)


# 4. Include-path YAMLs that lm-eval would skip without a word.

def test_broken_include_yaml(tmp_path):
    (tmp_path / "good.yaml").write_text(CUSTOM["colors"])
    (tmp_path / "broken.yaml").write_text("task: broken\noutput_type: multiple_choice\n  doc_to_text: [\n")
    with pytest.raises(BadInput, match=r"^--include-path file .*broken.yaml: invalid YAML at line 3, column 14: "
                                       r"mapping values are not allowed"):
        task_manager(str(tmp_path), ["colors"])


@pytest.mark.parametrize("text,message", [
    ("include: missing_template.yaml\ntask: mine\n", "No such file"),
    ("- task: mine\n", "Expected YAML dict"),
    (b"task: caf\xe9\n", "UTF-8"),
])
def test_include_yaml_that_is_not_a_task(text, message, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(BadInput, match=rf"^--include-path file .*mine.yaml cannot be read as a task: .*{message}"):
        task_manager(str(tmp_path), ["mine"])


def test_include_template_without_task_is_fine(custom):
    assert "colors" in custom.all_tasks


# 5. Output types the stages cannot score.

@pytest.mark.parametrize("name,output_type", [("lambada_openai", "loglikelihood"),
                                              ("wikitext", "loglikelihood_rolling")])
def test_unscored_output_type_is_refused(name, output_type):
    assert output_type not in SCORED_OUTPUT_TYPES
    manager = task_manager(None, [name])
    with pytest.raises(BadInput, match=rf"^task '{name}' is {output_type}; ablate scores generate_until, "
                                       "multiple_choice tasks only"):
        load_tasks(manager, [name], {})


def test_generation_task_with_local_data_is_scored(custom, tmp_path):
    assert "generate_until" in SCORED_OUTPUT_TYPES
    data = write_jsonl(tmp_path / "story.jsonl", [{"q": "Once", "answer": "upon"}])
    assert build(custom, "story", data).OUTPUT_TYPE == "generate_until"


# Through the CLI: one line, exit 2, no run directory.

runner = CliRunner()


def stage1(model, runs, *args):
    return runner.invoke(app, ["stage1", "--model", str(model), "--device", "cpu", "--runs-dir", str(runs),
                               *map(str, args)])


def test_cli_refuses_a_rolling_loglikelihood_task_up_front(tiny_llama, tmp_path):
    result = stage1(tiny_llama, tmp_path / "runs", "--tasks", "wikitext")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "ablate: error: task 'wikitext' is loglikelihood_rolling; ablate scores generate_until, multiple_choice "
        "tasks only (a rolling loglikelihood has no prompt to read under a mask, and no accuracy)"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/*"))


@pytest.mark.parametrize("fault", ["non-utf8", "null label", "broken include"])
def test_cli_faults_are_one_line(fault, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "piqa.jsonl", PIQA_ROWS)
    args = ["--tasks", "piqa", "--task-data", f"piqa={data}"]
    if fault == "non-utf8":
        data.write_bytes(data.read_bytes() + b'{"goal": "\xff"}\n')
    elif fault == "null label":
        write_jsonl(data, PIQA_ROWS[:1] + [{**PIQA_ROWS[1], "label": None}])
    else:
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "bad.yaml").write_text("task: [\n")
        args += ["--include-path", tmp_path / "tasks"]
    result = stage1(tiny_llama, tmp_path / "runs", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate: error:") and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/*"))


def test_cli_string_labels_give_the_same_samples_as_int_labels(tiny_llama, tmp_path):
    """piqa rows with "label": "1" used to complete with acc 0: every string label was looked up among the choices."""
    samples = []
    for kind, rows in (("int", PIQA_ROWS), ("str", [{**r, "label": str(r["label"])} for r in PIQA_ROWS])):
        data = write_jsonl(tmp_path / f"piqa_{kind}.jsonl", rows)
        runs = tmp_path / f"runs_{kind}"
        result = stage1(tiny_llama, runs, "--tasks", "piqa", "--task-data", f"piqa={data}", "--batch-size", "4")
        assert result.exit_code == 0, result.output
        (run,) = [p for p in runs.glob("*/*") if p.is_dir()]
        samples.append([json.loads(line) for line in (run / "samples_piqa.jsonl").read_text().splitlines()])
    ints, strs = samples
    assert len(ints) == len(PIQA_ROWS) and strs == ints
    assert [s["target"] for s in strs] == [r["label"] for r in PIQA_ROWS]
    assert [s["correct"] for s in strs] == [s["pred"] == r["label"] for s, r in zip(strs, PIQA_ROWS)]
