"""Multiple-choice tasks built from real GSM8K text, in the hub schema of lm-eval's own tasks.

    python -c "from ablate.core.assets import gsm8k; from ablate.demo.gsm8k_tasks import write_next_step, \
write_task; write_task('/tmp/tasks', write_next_step(gsm8k(), '/tmp/gsm8k_next_step.jsonl', n=100, seed=0))"
    lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct \
        --include_path /tmp/tasks --tasks gsm8k_next_step          # the same task in stock lm-eval

``gsm8k_next_step``: a GSM8K problem and the first steps of its worked solution;
which of four sentences is the next step? The right one is the solution's own
next line; the three others are solution lines of other problems. Rows are
written in HellaSwag's hub schema (``ctx_a``, ``ctx_b``, ``activity_label``,
``endings``, ``label``) and ``write_task`` gives the task its own lm-eval YAML,
which ``include:``s the installed ``hellaswag`` YAML (its ``process_docs``,
prompt, choices and metrics) and reads the rows from the demo's file. It is not
HellaSwag: only HellaSwag's processing, on GSM8K text.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ablate.results.files import write_jsonl, write_text

TASK = "gsm8k_next_step"
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "<<16-3-4=9>>9" reads "9"


def solution_steps(answer: str) -> list[str]:
    """The worked solution's lines, without the calculator annotations and the final ``#### N`` line."""
    lines = [CALCULATOR.sub("", line).strip() for line in answer.split("\n")]
    return [line for line in lines if line and not line.startswith("####")]


def usable(problems: list[dict]) -> list[int]:
    """Indices of the problems whose worked solution has at least two steps (a context step and a next one)."""
    return [i for i, p in enumerate(problems) if len(solution_steps(p["answer"])) >= 2]


def step_index(rng: random.Random, steps: list[str], max_steps_shown: int | None) -> int:
    """Which step is the answer: a random one with a step after it, at most ``max_steps_shown`` steps in."""
    last = len(steps) - 1 if max_steps_shown is None else min(len(steps) - 1, max_steps_shown + 1)
    return rng.randrange(0, last)


def next_step_rows(problems: list[dict], n: int, seed: int, among: list[int] | None = None,
                   max_steps_shown: int | None = None) -> list[dict]:
    """``n`` next-step rows; with ``among``, questions and distractor lines come from those problems only;
    ``max_steps_shown`` caps the solution steps in the context (shorter prompts, cheaper to score)."""
    rng = random.Random(seed)
    allowed = set(usable(problems)) if among is None else set(among) & set(usable(problems))
    usable_ = [(i, p) for i, p in enumerate(problems) if i in allowed]
    pool = [(i, step) for i, p in usable_ for step in solution_steps(p["answer"])]
    rows = []
    for i, problem in rng.sample(usable_, min(n, len(usable_))):
        steps = solution_steps(problem["answer"])
        k = step_index(rng, steps, max_steps_shown)  # context: the question and k steps; the answer: step k
        distractors = []
        while len(distractors) < 3:
            j, step = rng.choice(pool)
            if j != i and step not in distractors and step != steps[k]:
                distractors.append(step)
        endings = distractors[:]
        label = rng.randrange(4)
        endings.insert(label, steps[k])
        rows.append({"ind": i, "activity_label": "Math", "ctx_a": problem["question"],
                     "ctx_b": " ".join(steps[:k]), "endings": endings, "label": str(label),
                     "source_id": f"gsm8k-test-{i}", "split": "test", "split_type": "indomain"})
    return rows


def write_next_step(gsm8k_jsonl: Path, out: Path, n: int = 200, seed: int = 0) -> Path:
    problems = [json.loads(line) for line in Path(gsm8k_jsonl).read_text().splitlines() if line.strip()]
    write_jsonl(Path(out), next_step_rows(problems, n, seed))
    return Path(out)


def write_task(folder: Path, rows: Path) -> Path:
    """``folder/gsm8k_next_step.yaml``: lm-eval's installed ``hellaswag`` task, renamed, reading ``rows``.

    Pass ``folder`` as ``--include-path``. lm-eval resolves an absolute ``include:`` and the hellaswag YAML's
    ``!function utils.process_docs`` beside that YAML (lm_eval/tasks/_yaml_loader.py, 0.4.13).
    """
    import yaml

    from ablate.core.lm_eval_model import task_entry
    from ablate.core.tasks import task_manager

    entry = task_entry(task_manager(None, ["hellaswag"]), "hellaswag")
    if entry is None or entry.yaml_path is None:
        raise RuntimeError("this lm-eval has no single-YAML hellaswag task to build gsm8k_next_step on")
    config = {"include": str(Path(entry.yaml_path).resolve()), "task": TASK, "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": str(Path(rows).resolve())}},
              "training_split": None, "validation_split": "validation", "test_split": None}
    out = Path(folder) / f"{TASK}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    about = ("# Written by ablate.demo.gsm8k_tasks.write_task: GSM8K next-step rows (which line is the next step\n"
             "# of the worked solution?) scored with lm-eval's hellaswag processing. Not HellaSwag.\n")
    write_text(out, about + yaml.safe_dump(config, sort_keys=False))
    return out
