"""The few-shot variant of the demo's task behind docs/masks.md "On the real model: segments of a few-shot prompt".

    .venv/bin/ablate fetch
    .venv/bin/python scripts/experiments/segments_fewshot.py /tmp/segexp/data
    C="--model ~/.cache/ablate/models/SmolLM2-135M-Instruct --tasks gsm8k_next_step_fewshot \
       --include-path /tmp/segexp/data/tasks --num-fewshot 3 --device cpu --batch-size 32 --runs-dir /tmp/segexp/runs"
    .venv/bin/ablate stage1 $C
    .venv/bin/ablate stage2 --mask prefill_bidir $C
    .venv/bin/ablate stage2 --mask segment_bidir $C

The demo's 150 evaluated gsm8k_next_step rows (seed 0) are the validation split; next-step rows of 200 of the
demo's training problems (disjoint: checked) are the train split the few-shot examples are drawn from.
"""
import json
import sys
from pathlib import Path

import yaml

from ablate.core.assets import gsm8k
from ablate.core.lm_eval_model import task_entry
from ablate.core.tasks import task_manager
from ablate.demo.gsm8k_tasks import next_step_rows
from ablate.demo.real import REAL_PRESETS, check_disjoint, split_problems, training_rows
from ablate.results.files import write_jsonl

TASK = "gsm8k_next_step_fewshot"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    preset = REAL_PRESETS["real"]
    problems = [json.loads(line) for line in Path(gsm8k()).read_text().splitlines() if line.strip()]
    eval_ids, train_ids = split_problems(problems, preset.n_eval, 0)
    evaluated = next_step_rows(problems, preset.n_eval, 0, among=eval_ids, max_steps_shown=preset.max_steps_shown)
    train = training_rows(problems, train_ids, 200, 0, preset.max_steps_shown)
    print(check_disjoint(problems, evaluated, train))  # raises if they share a problem, question or answer
    write_jsonl(out / "eval.jsonl", evaluated)
    write_jsonl(out / "train.jsonl", train)
    entry = task_entry(task_manager(None, ["hellaswag"]), "hellaswag")
    config = {"include": str(Path(entry.yaml_path).resolve()), "task": TASK, "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(out / "train.jsonl"),
                                                                      "validation": str(out / "eval.jsonl")}},
              "training_split": "train", "validation_split": "validation", "test_split": None,
              "fewshot_split": "train"}
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
