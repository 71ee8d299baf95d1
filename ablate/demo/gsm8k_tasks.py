"""Multiple-choice tasks built from real GSM8K text, in the hub schema of lm-eval's own tasks.

    python -c "from ablate.core.assets import gsm8k; from ablate.demo.gsm8k_tasks import write_next_step; \
print(write_next_step(gsm8k(), '/tmp/gsm8k_next_step.jsonl', n=100, seed=0))"

``next_step``: a GSM8K problem and the first steps of its worked solution; which
of four sentences is the next step? The right one is the solution's own next
line; the three others are solution lines of other problems. Rows are written in
HellaSwag's hub schema (``ctx_a``, ``ctx_b``, ``activity_label``, ``endings``,
``label``), so ``--tasks hellaswag --task-data hellaswag=FILE`` scores them with
lm-eval's real HellaSwag prompt, preprocessing and metrics: a HellaSwag-style
task (four endings, a context longer than the endings) on real text.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ablate.results.files import write_jsonl

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
