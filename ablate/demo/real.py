"""The study on a real pretrained model: SmolLM2-135M-Instruct on a task built from GSM8K, CPU-sized.

    ablate demo                    # this preset ("real"): the README's main command
    ablate demo --preset smoke     # the synthetic world instead (ablate/demo/run.py)

1. ``ablate fetch``'s assets (once, cached): the model and the GSM8K test split.
2. The problems are split in two, seeded: the *evaluated* problems give the
   multiple-choice task ``gsm8k_next_step`` (``gsm8k_tasks``: which of four lines
   is the solution's next step; the distractors are lines of other evaluated
   problems; an lm-eval task YAML of its own that reuses hellaswag's processing),
   the *training* problems give stage 3's rows. ``check_disjoint`` proves the
   split instead of assuming it: no problem, question or solution line is on
   both sides.
3. Stage 3's rows are rendered by that same ``gsm8k_next_step`` task, so the
   finetuning prompt is the evaluation prompt byte for byte: prompt =
   ``doc_to_text``, response = target delimiter + the next step.
4. The stages are a study file, ``<workdir>/real-seed<N>-<digest>/study.yaml``,
   run by ``ablate study``'s own function (``ablate.demo.study``): stage 1,
   stage 2 (``prefill_bidir``), stage 3 under both masks with one budget, stage 4
   under ``prefill_bidir``, the report and STATUS.md. A second run reuses every
   completed stage. Each stage's wall time is recorded.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ablate.demo.gsm8k_tasks import TASK, next_step_rows, solution_steps, step_index, usable, write_task
from ablate.results.files import write_json, write_jsonl


@dataclass(frozen=True)
class RealPreset:
    n_eval: int  # evaluated documents (= evaluated problems), the same at every stage
    n_train: int  # stage 3 rows, one per training problem
    n_heldout: int  # stage 3 held-out rows (training problems too): its eval loss and probe
    finetune_steps: int
    batch_size: int
    learning_rate: float
    lora_r: int | None  # None: full finetune
    max_length: int
    max_steps_shown: int  # solution steps at most in a context (the task's prompts stay short)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    save_steps: int = 0  # a checkpoint every this many steps (0: at the last step only)


REAL_PRESETS = {
    "real": RealPreset(n_eval=150, n_train=144, n_heldout=32, finetune_steps=12, batch_size=12,
                       learning_rate=2e-4, lora_r=None, max_length=128, max_steps_shown=2,
                       # Warm-up and decay: at a constant 2e-4 two of three seeds' prefill_bidir finetunes spiked
                       # past the divergence rule near their end (docs/demo.md, "Across seeds").
                       lr_scheduler="cosine", warmup_steps=2, save_steps=6),
}


def split_problems(problems: list[dict], n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of the usable problems: the first ``n_eval`` are evaluated, the rest train."""
    ids = usable(problems)
    if n_eval >= len(ids):
        raise ValueError(f"{n_eval} evaluated problems leave none to train on ({len(ids)} usable)")
    random.Random(seed).shuffle(ids)
    return sorted(ids[:n_eval]), sorted(ids[n_eval:])


def training_rows(problems: list[dict], ids: list[int], n: int, seed: int,
                  max_steps_shown: int | None = None) -> list[dict]:
    """One next-step row per training problem (a random step), in HellaSwag's schema with the true step only."""
    rng = random.Random(seed)
    rows = []
    for i in rng.sample(ids, min(n, len(ids))):
        steps = solution_steps(problems[i]["answer"])
        k = step_index(rng, steps, max_steps_shown)
        rows.append({"ind": i, "activity_label": "Math", "ctx_a": problems[i]["question"],
                     "ctx_b": " ".join(steps[:k]), "endings": [steps[k]], "label": "0",
                     "source_id": f"gsm8k-test-{i}", "split": "train", "split_type": "indomain"})
    return rows


def render(rows_file: Path, tasks_dir: Path) -> list[dict]:
    """Prompt/response pairs exactly as the evaluated task shows them: doc_to_text, target delimiter + the choice."""
    from ablate.core.tasks import load_tasks, task_manager

    task = load_tasks(task_manager(str(tasks_dir), [TASK]), [TASK], {TASK: rows_file}, scored=False)[TASK]
    out = []
    for doc in task.eval_docs:
        choice = task.doc_to_choice(doc)[task.doc_to_target(doc)]
        out.append({"prompt": task.doc_to_text(doc), "response": task.config.target_delimiter + choice})
    return out


def check_disjoint(problems: list[dict], evaluated: list[dict], train: list[dict]) -> dict:
    """No evaluated problem, question or solution line occurs in the training rows; raises if one does."""
    eval_ids = {r["ind"] for r in evaluated}
    train_ids = {r["ind"] for r in train}
    eval_questions = {problems[i]["question"].strip() for i in eval_ids}
    train_questions = {problems[i]["question"].strip() for i in train_ids}
    eval_lines = {e for r in evaluated for e in r["endings"]} | {
        line for i in eval_ids for line in solution_steps(problems[i]["answer"])}
    train_lines = {line for i in train_ids for line in solution_steps(problems[i]["answer"])}
    shared = {"problems": sorted(eval_ids & train_ids), "questions": sorted(eval_questions & train_questions),
              "solution_lines": sorted(eval_lines & train_lines)}
    if shared["problems"] or shared["questions"]:
        raise RuntimeError(f"the evaluated and training GSM8K problems overlap: {shared}")
    # Short lines recur across different problems ("She has 5 apples." is possible): counted and shown, and
    # none of them may be an evaluated document's right answer.
    answers = {r["endings"][int(r["label"])] for r in evaluated}
    leaked = sorted(answers & train_lines)
    if leaked:
        raise RuntimeError(f"{len(leaked)} evaluated answers occur in training solutions, e.g. {leaked[0]!r}")
    return {"evaluated_problems": len(eval_ids), "training_problems": len(train_ids),
            "shared_problems": len(shared["problems"]), "shared_questions": len(shared["questions"]),
            "evaluated_answers_in_training": len(leaked),
            "solution_lines_in_both": len(shared["solution_lines"]), "examples_of_lines_in_both":
            shared["solution_lines"][:5]}


def build(workdir: Path, gsm8k_file: Path, preset: RealPreset, seed: int) -> dict:
    """Write the evaluated rows, their task YAML, stage 3's rows (train + held out) and split.json; returns
    their paths."""
    problems = [json.loads(line) for line in Path(gsm8k_file).read_text().splitlines() if line.strip()]
    eval_ids, train_ids = split_problems(problems, preset.n_eval, seed)
    evaluated = next_step_rows(problems, preset.n_eval, seed, among=eval_ids, max_steps_shown=preset.max_steps_shown)
    train = training_rows(problems, train_ids, preset.n_train + preset.n_heldout, seed, preset.max_steps_shown)
    split = check_disjoint(problems, evaluated, train)
    out = Path(workdir)
    paths = {"eval": out / "next_step_eval.jsonl", "tasks": out / "tasks",
             "train_docs": out / "next_step_train_docs.jsonl", "train": out / "finetune.jsonl",
             "heldout": out / "finetune_heldout.jsonl", "split": out / "split.json"}
    write_jsonl(paths["eval"], evaluated)
    paths["task_yaml"] = write_task(paths["tasks"], paths["eval"])
    write_jsonl(paths["train_docs"], train)
    pairs = render(paths["train_docs"], paths["tasks"])
    write_jsonl(paths["train"], pairs[: preset.n_train])
    write_jsonl(paths["heldout"], pairs[preset.n_train:])
    write_json(paths["split"], {**split, "seed": seed, "source": str(gsm8k_file), "preset": asdict(preset),
                                "evaluated_ids": eval_ids, "training_ids_used": sorted(r["ind"] for r in train)})
    return paths


def study_values(model: Path, paths: dict, preset: RealPreset, seed: int, device: str, workdir: Path) -> dict:
    """Every stage's settings, as the study file holds them (the rest are the package's stage YAMLs)."""
    return {
        "model": str(model), "tasks": [TASK], "include_path": str(paths["tasks"]), "device": device, "seed": seed,
        "batch_size": 8,  # evaluation rows per batch; stage 3 has its own below
        "runs_dir": str(workdir / "runs"),
        "stage2": {"mask": "prefill_bidir"},
        "stage3": {"data": str(paths["train"]), "eval_data": str(paths["heldout"]), "max_steps": preset.finetune_steps,
                   "learning_rate": preset.learning_rate, "lr_scheduler": preset.lr_scheduler,
                   "warmup_steps": preset.warmup_steps,
                   "batch_size": preset.batch_size, "gradient_accumulation_steps": 1,
                   "logging_steps": max(1, preset.finetune_steps // 10), "save_steps": preset.save_steps or preset.finetune_steps,
                   "max_length": preset.max_length, "truncate_prompts": True, "lora_r": preset.lora_r,
                   "probe_samples": 8},
        "stage4": {"mask": "prefill_bidir", "also_causal": False},
        "study": {"masks": ["causal", "prefill_bidir"], "report": str(workdir / "docs" / "RESULTS.md")},
    }


def run_real_demo(workdir: Path, preset_name: str = "real", seed: int = 0, device: str = "auto",
                  echo=print, preset: RealPreset | None = None) -> dict:
    """The study end to end under ``workdir``; ``preset`` overrides the named one (the tests' small budget)."""
    from ablate.core.assets import gsm8k, smollm2
    from ablate.demo.study import run_demo_study
    from ablate.errors import BadInput

    preset = preset or REAL_PRESETS[preset_name]
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise BadInput(f"--workdir {workdir} exists and is not a folder")
    started = time.time()
    seconds: dict[str, float] = {}

    def timed(name: str, call):
        echo(f"\n== {name} ==")
        begin = time.time()
        result = call()
        seconds[name] = round(time.time() - begin, 1)
        echo(f"{name}: {seconds[name]:.0f} s" + (f", {result}" if isinstance(result, Path) else ""))
        return result

    model = timed("fetch", lambda: smollm2(echo))
    data = gsm8k(echo)
    workdir = Path(workdir).resolve()
    # One folder per preset and seed, named by the preset's digest too: a changed budget never rewrites the
    # files (data, task YAML, study file) an earlier run's config.json points at.
    digest = hashlib.sha256(json.dumps(asdict(preset), sort_keys=True).encode()).hexdigest()[:8]
    world = workdir / f"{preset_name}-seed{seed}-{digest}"
    paths = timed("build tasks", lambda: build(world, data, preset, seed))
    split = json.loads(paths["split"].read_text())
    echo(f"{split['evaluated_problems']} evaluated problems -> {paths['eval']} (task {TASK}: {paths['task_yaml']}); "
         f"{split['training_problems']} training problems -> {paths['train']} and {paths['heldout']}; "
         "no problem, question or evaluated answer on both sides")
    about = [f"The real demo's study (ablate demo --preset {preset_name} --seed {seed}), written by "
             "ablate/demo/real.py.",
             f"SmolLM2-135M-Instruct on {TASK}: GSM8K next-step rows (which line is the solution's next step?)",
             "scored with lm-eval's hellaswag processing; stage 3 trains on disjoint GSM8K problems."]
    out = run_demo_study(world / "study.yaml", study_values(model, paths, preset, seed, device, workdir), about,
                         echo)
    out["split"] = paths["split"]
    out["stage_seconds"] = {**seconds, **out["stage_seconds"]}
    out["seconds"] = round(time.time() - started, 1)
    write_json(workdir / f"demo-{preset_name}-seed{seed}.json",
               {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()})
    return out
