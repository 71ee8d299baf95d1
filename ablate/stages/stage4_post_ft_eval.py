"""Stage 4: evaluate the stage 3 models with the ablated mask and measure recovery against stage 1.

    ablate stage4                          # latest completed stage 3 run of each mask
    ablate stage4 --checkpoint runs/stage3_finetune_prefill_bidir/<run> --also-causal

The evaluation reuses stage 1's tasks and settings (its ``config.json``), so
every document scored in stage 4 was scored in stage 1 (and stage 2, when a
matching stage 2 run exists) and recovery is computed document by document.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ablate.results import rundir
from ablate.results.environment import environment
from ablate.results.gates import refuse_gated
from ablate.results.rundir import STAGE1, STAGE2, STAGE3_PREFIX, STAGE4
from ablate.stages.config import EvalConfig, Stage4Config
from ablate.errors import BadInput
from ablate.core.checkpoints import verify_final
from ablate.core.identity import describe, mismatch, model_identity
from ablate.stages import stage3_resume as resume
from ablate.stages.evaluation import check_inputs, comparison_key, evaluate, write_samples
from ablate.results.recovery import macro_recovery, paired_difference, task_recovery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finetuned:
    """A stage 3 model stage 4 scores: its run, the folder loaded (``final/`` or a named checkpoint), its identity."""

    run: rundir.Run
    model_dir: Path
    identity: dict

    @property
    def label(self) -> str:
        tail = "" if self.model_dir.name == "final" else f"-{self.model_dir.name}"
        return f"{self.run.summary['mask']}-{self.run.run_id}{tail}"


def stage3_runs(config: Stage4Config) -> list[Finetuned]:
    return choose_finetunes(config)[0]


def choose_finetunes(config: Stage4Config) -> tuple[list[Finetuned], list[str]]:
    """The models to score, each verified against what stage 3 recorded, and why default runs were skipped."""
    runs_dir, skipped = Path(config.runs_dir), []
    if config.checkpoints:
        chosen = [_named(item) for item in config.checkpoints]
    else:
        chosen = []
        for stage in rundir.stages_with_prefix(runs_dir, STAGE3_PREFIX):
            run = rundir.latest(runs_dir, stage, statuses=rundir.USABLE)
            if run is not None and (run.summary or {}).get("leaky"):
                skipped.append(f"skipped leaky stage 3 run {run.path} (trained with the label-leaking mask "
                               f"{run.summary.get('mask')}); name it with --checkpoint to score it anyway")
                run = rundir.latest(runs_dir, stage, statuses=rundir.USABLE,
                                    where=lambda r: not (r.summary or {}).get("leaky"))
            if run is not None:
                chosen.append((run, run.path / "final"))
        if not chosen:
            raise BadInput(f"no completed stage 3 run in {runs_dir}" + (f" ({'; '.join(skipped)})" if skipped else "")
                           + "; run `ablate stage3` first")
    out = []
    for run, model_dir in chosen:
        refuse_gated(run, config.ignore_gate)
        if not (run.summary or {}).get("model_identity"):
            raise BadInput(f"stage 3 run {run.path} does not record the identity of its base model "
                           "(made by an older ablate); rerun stage 3")
        if model_dir.name == "final":
            if not model_dir.is_dir():
                raise BadInput(f"stage 3 run {run.path} has no final/ model")
            identity = verify_final(model_dir, run.summary, f"stage 3 run {run.path}")
        else:
            identity = model_identity(str(model_dir))
            if identity.get("base", run.summary["model_identity"]) != run.summary["model_identity"]:
                raise BadInput(f"the LoRA checkpoint {model_dir} sits on {describe(identity['base'])}, but stage 3 "
                               f"trained it on {describe(run.summary['model_identity'])}; restore that base model")
        out.append(Finetuned(run, model_dir, identity))
    return out, skipped


def _named(item: str) -> tuple[rundir.Run, Path]:
    """``--checkpoint``: a usable stage 3 run (its final/), or one checkpoint folder of a finished (even diverged) one."""
    path = Path(item)
    if path.parent.name == "checkpoints" and path.name.startswith("checkpoint-"):
        run = rundir.explicit_run(path.parent.parent, STAGE3_PREFIX, "--checkpoint",
                                  statuses=(*rundir.USABLE, rundir.DIVERGED))
        why = resume.problem(path) if path.is_dir() else "not a folder"
        if why:
            raise BadInput(f"--checkpoint {item} is not an intact checkpoint ({why})")
        return run, path
    found = rundir.load_run(path)
    if found is not None and found.status == rundir.DIVERGED:
        last = (found.summary or {}).get("last_good_checkpoint")
        raise BadInput(f"--checkpoint {item} is diverged ({found.reason}); its final weights are not a result. "
                       f"Name one of its checkpoints to score that instead"
                       + (f" (last good: {last})" if last else " (it kept none)"))
    return rundir.explicit_run(path, STAGE3_PREFIX, "--checkpoint"), path / "final"


def find_stage1(config: Stage4Config, base: dict, seed: int | None = None) -> rundir.Run:
    """The stage 1 run of the base model: ``--stage1-run`` (refused unless it is), else the newest, same seed first."""
    if config.stage1_run:
        run = rundir.explicit_run(config.stage1_run, STAGE1, "--stage1-run")
        found = (run.metrics.get("comparison") or {}).get("model")
        if found != base:
            raise BadInput(f"--stage1-run {config.stage1_run} evaluated {describe(found)}, but the stage 3 runs "
                           f"finetuned {describe(base)}; recovery needs the baseline of the same model")
    else:
        def of_base(r):
            return (r.metrics.get("comparison") or {}).get("model") == base

        run = (rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE,
                             where=lambda r: of_base(r) and r.metrics.get("seed") == seed)
               or rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE, where=of_base))
        if run is None:
            raise BadInput(f"stage 4 needs a completed stage 1 run of the stage 3 base model ({describe(base)}) in "
                           f"{Path(config.runs_dir) / STAGE1}; run `ablate stage1` on that model first")
    refuse_gated(run, config.ignore_gate)
    return run


def find_stage2(config: Stage4Config, stage1: rundir.Run) -> tuple[rundir.Run | None, str | None]:
    key = stage1.metrics["comparison"]
    run = rundir.latest(Path(config.runs_dir), STAGE2,
                        where=lambda r: r.metrics.get("comparison") == key and r.metrics.get("mask") == config.mask)
    if run:
        return run, None
    return None, f"no completed stage 2 run with mask {config.mask} matches stage 1 run {stage1.run_id}"


def recovery_block(rows: dict, stage1: rundir.Run, stage2: rundir.Run | None, chance: dict) -> dict:
    from ablate.stages.evaluation import verified_samples

    # The baselines' numbers come from their samples, checked against the digests their runs recorded.
    s1 = verified_samples(stage1)
    s2 = verified_samples(stage2) if stage2 else None
    per_task, arrays = {}, {}
    for task, task_rows in rows.items():
        c4 = {r["doc_id"]: r["correct"] for r in task_rows}
        if task not in s1 or (s2 is not None and task not in s2):
            raise BadInput(f"task {task}: stage 1 or stage 2 records no samples for it; rerun them together")
        c1 = s1[task]
        c2 = s2[task] if s2 is not None else None
        if set(c1) != set(c4) or (c2 is not None and set(c2) != set(c4)):
            raise BadInput(f"task {task}: stage 4 scored other documents than stages 1/2; rerun them together")
        docs = sorted(c4)
        a1, a4 = np.array([c1[d] for d in docs]), np.array([c4[d] for d in docs])
        a2 = np.array([c2[d] for d in docs]) if c2 is not None else None
        per_task[task] = task_recovery(a1, a2, a4, chance[task])
        arrays[task] = (a1, a2, a4)
    return {"tasks": per_task, "macro": macro_recovery(per_task, arrays)}


def head_to_head(results: list[dict], correct: dict) -> dict | None:
    """The ``prefill_bidir``-finetuned model against the causal-finetuned one, both under this stage's mask.

    The study's question in one comparison: at the same budget, does training with the mask beat training
    without it? Paired over the same documents (``ablate.results.recovery.paired_difference``: causal-
    finetuned = before, mask-finetuned = after). None unless exactly one checkpoint of each mask was scored.
    """
    by_mask: dict[str, list[dict]] = {}
    for entry in results:
        by_mask.setdefault(entry["train_mask"], []).append(entry)
    others = sorted(set(by_mask) - {"causal"})
    if len(by_mask.get("causal", [])) != 1 or len(others) != 1 or len(by_mask[others[0]]) != 1:
        return None
    causal, masked = by_mask["causal"][0]["label"], by_mask[others[0]][0]["label"]
    arrays = [{t: np.array([c[t][d] for d in sorted(c[t])]) for t in c} for c in (correct[causal], correct[masked])]
    return {"before": causal, "after": masked, **paired_difference(*arrays)}


def run_stage4(config: Stage4Config) -> Path:
    from ablate.core.models import load_model, load_tokenizer, resolve_device

    started = time.time()
    device = resolve_device(config.device)
    finetunes, skipped = choose_finetunes(config)
    for why in skipped:
        log.warning("stage 4 %s", why)
    runs = [f.run for f in finetunes]
    bases = {json.dumps(r.summary["model_identity"], sort_keys=True) for r in runs}
    if len(bases) != 1:
        raise BadInput("the stage 3 runs start from different models; run stage 4 once per base model with --checkpoint")
    seeds = {(r.config or {}).get("seed") for r in runs}
    stage1 = find_stage1(config, runs[0].summary["model_identity"], seeds.pop() if len(seeds) == 1 else None)
    stage2, stage2_reason = find_stage2(config, stage1)
    settings = dict(stage1.config or {})
    if not settings:
        raise BadInput(f"stage 1 run {stage1.path} has no readable config.json")
    settings.update(tasks=tuple(settings["tasks"]), task_data=tuple(settings["task_data"]))
    eval_config = EvalConfig(**{**settings, "stage": STAGE4, "mask": config.mask, "device": config.device,
                                "dtype": config.dtype, "attn_implementation": config.attn_implementation,
                                "batch_size": config.batch_size or settings["batch_size"],
                                "runs_dir": config.runs_dir, "baseline": None})
    manager, task_data, tasks = check_inputs(eval_config)
    recorded = stage1.metrics["comparison"]
    key = comparison_key(eval_config, task_data, recorded["model"])
    if key != recorded:
        raise BadInput(f"stage 1 run {stage1.path} was made on other task data or settings than its config.json "
                       f"now gives ({', '.join(mismatch(key, recorded))} differ; a --task-data file changed?)")
    rundir.check_writable(Path(config.runs_dir), STAGE4)

    run_dir = rundir.new_run_dir(Path(config.runs_dir), STAGE4)
    results, correct = [], {}
    with rundir.active(run_dir):
        rundir.write_json(run_dir / "config.json", {**config.__dict__, "evaluation": eval_config.to_dict()})
        rundir.write_json(run_dir / "env.json", environment(device))
        for why in skipped:
            log.info("stage 4 %s", why)  # in run.log too
        for finetune in finetunes:
            run, summary, label = finetune.run, finetune.run.summary, finetune.label
            log.info("stage 4: %s (trained with %s) under %s", finetune.model_dir, summary["mask"], config.mask)
            # A Trainer checkpoint holds no tokenizer; stage 3 never changes the base model's.
            tokenizer = None if finetune.model_dir.name == "final" else load_tokenizer(summary["model"])
            model, tokenizer = load_model(str(finetune.model_dir), device, config.dtype, config.attn_implementation,
                                          tokenizer)
            ablated = evaluate(eval_config, model, tokenizer, device, config.mask, tasks, manager)
            write_samples(run_dir, ablated["rows"], prefix=f"{label}_")
            correct[label] = {t: {r["doc_id"]: r["correct"] for r in rows} for t, rows in ablated["rows"].items()}
            chance = {t: m["chance"] for t, m in ablated["tasks"].items()}
            entry = {
                "label": label,
                "checkpoint": str(run.path),
                "checkpoint_uid": run.uid,
                "model_dir": str(finetune.model_dir),
                "model_identity": finetune.identity,
                "train_mask": summary["mask"],
                "train_seed": (run.config or {}).get("seed"),
                "leaky": summary.get("leaky", False),
                "save_format": (summary.get("save") or {}).get("format"),
                "tasks": ablated["tasks"],
                "macro": ablated["macro"],
                "timing": ablated["timing"],
                "oom_retries": ablated["oom_retries"],
                "recovery": recovery_block(ablated["rows"], stage1, stage2, chance),
                "causal": None,
            }
            if config.also_causal:
                causal = evaluate(eval_config, model, tokenizer, device, "causal", tasks, manager)
                write_samples(run_dir, causal["rows"], prefix=f"{label}_causal_")
                entry["causal"] = {"tasks": causal["tasks"], "macro": causal["macro"], "timing": causal["timing"],
                                   "oom_retries": causal["oom_retries"]}
            results.append(entry)
            del model
        metrics = {
            "stage": STAGE4,
            "run_id": run_dir.name,
            "status": rundir.COMPLETED,
            "mask": config.mask,
            "stage1_run": str(stage1.path),
            "stage1_uid": stage1.uid,
            "stage2_run": str(stage2.path) if stage2 else None,
            "stage2_reason": stage2_reason,
            "comparison": key,
            "checkpoints": results,
            "skipped": skipped,
            "head_to_head": head_to_head(results, correct),
            "timing": {"wall_seconds": round(time.time() - started, 3)},
        }
        rundir.write_json(run_dir / "metrics.json", metrics)
        rundir.set_status(run_dir, rundir.COMPLETED)
    return run_dir
