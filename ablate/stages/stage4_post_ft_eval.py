"""Stage 4: evaluate the stage 3 models with the ablated mask and measure recovery against stage 1.

    ablate stage4                          # latest completed stage 3 run of each mask
    ablate stage4 --checkpoint runs/stage3_finetune_prefill_bidir/<run> --also-causal
    ablate stage4 --checkpoint runs/stage3_finetune_causal/<run>/checkpoints/checkpoint-200   # one checkpoint

The evaluation reuses stage 1's tasks and settings (its ``config.json``), so
every document scored in stage 4 was scored in stage 1 (and stage 2, when a
matching stage 2 run exists) and recovery is computed document by document.
The run's life cycle is ``ablate.stages.evaluation.evaluation_run``, as for
stages 1 and 2 (``accelerate launch`` too); this module chooses the models and
computes recovery. A checkpoint of a completed, gated, diverged, failed or
crashed stage 3 run is scored only when named, verified against its run's
``checkpoints/digests.json``, and recorded as one (``scored``, ``step``,
``run_status``, ``run_reason``; ``ablate.results.finetuned``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ablate.results import rundir
from ablate.results.finetuned import CHECKPOINT_OF, checkpoint_step, stage3_record, stage4_label
from ablate.results.gates import refuse_gated
from ablate.results.rundir import STAGE1, STAGE2, STAGE3_PREFIX, STAGE4
from ablate.stages.config import EvalConfig, Stage4Config
from ablate.errors import BadInput
from ablate.core import layer_masks
from ablate.core.checkpoints import verify_final
from ablate.core.identity import describe, mismatch, model_identity
from ablate.stages import stage3_resume as resume
from ablate.stages.evaluation import (check_inputs, check_lengths, comparison_key, eval_state, evaluate,
                                      evaluation_run, write_samples)
from ablate.results.recovery import head_to_head, pairs, recovery_block
from ablate.results.samples import verified_samples
from ablate.results.verified import latest_verified, verified

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finetuned:
    """A stage 3 model stage 4 scores: its run, the folder loaded (``final/`` or a named checkpoint), its identity,
    and what the run records of its training (``ablate.results.finetuned.stage3_record``)."""

    run: rundir.Run
    model_dir: Path
    identity: dict
    trained: dict

    @property
    def step(self) -> int | None:
        """The checkpoint's step; None for the run's final model."""
        return checkpoint_step(self.model_dir)

    @property
    def label(self) -> str:
        """Unique within one runs folder (``stage4_label``); ``unique_labels`` refuses what two runs folders share."""
        return stage4_label(self.trained["mask"], self.run.run_id, self.model_dir)


def unique_labels(finetunes: list[Finetuned]) -> None:
    """Refuse a model named twice, or two models that would share a label (and a samples file), in one line."""
    seen: dict[str, Finetuned] = {}
    for finetune in finetunes:
        other = seen.setdefault(finetune.label, finetune)
        if other is finetune:
            continue
        if other.model_dir.resolve() == finetune.model_dir.resolve():
            raise BadInput(f"--checkpoint names {finetune.model_dir} twice; name each model once")
        raise BadInput(f"{other.model_dir} and {finetune.model_dir} would both be scored as {finetune.label} (runs of "
                       "the same name in two runs folders): their samples would overwrite each other; score them "
                       "in separate stage 4 runs")


def stage3_runs(config: Stage4Config) -> list[Finetuned]:
    return choose_finetunes(config)[0]


def choose_finetunes(config: Stage4Config) -> tuple[list[Finetuned], list[str]]:
    """The models to score, each verified against what stage 3 recorded, and why default runs were skipped.

    By default the final model of the latest completed (or gated) run of each mask; a leaky run, and a diverged
    run newer than the one taken, are skipped, saying so. A checkpoint is scored only when named."""
    runs_dir = Path(config.runs_dir)
    if config.checkpoints:
        chosen, skipped = [_named(item) for item in config.checkpoints], []
    else:
        chosen, skipped = _defaults(runs_dir)
    out = [_finetune(run, model_dir, runs_dir, config.ignore_gate) for run, model_dir in chosen]
    unique_labels(out)
    return out, skipped


def _trained_layers(run: rundir.Run) -> str:
    """What a stage 3 run trained under beyond its mask: its layers as its summary records them (ablate.core.
    layer_masks.record; "every layer" when none), a key for ``_defaults``."""
    layers = (run.summary or {}).get("mask_layers") if isinstance(run.summary, dict) else None
    return json.dumps(layers, sort_keys=True)


def _defaults(runs_dir: Path) -> tuple[list[tuple[rundir.Run, Path]], list[str]]:
    """The latest usable run of each training: each stage 3 mask, and within it each set of layers trained under
    (--mask-layers), so a layered finetune never stands in for an every-layer one (both are scored; ``pairs``
    compares them)."""
    chosen, skipped = [], []
    for stage in rundir.stages_with_prefix(runs_dir, STAGE3_PREFIX):
        found = [r for r in rundir.find_runs(runs_dir, stage) if r.status in rundir.USABLE]
        trainings = list(dict.fromkeys(_trained_layers(r) for r in found)) or [None]
        for key in trainings:
            def of(r, key=key):
                return key is None or _trained_layers(r) == key

            run = latest_verified(runs_dir, stage, statuses=rundir.USABLE, where=of)
            if run is not None and run.summary.get("leaky"):
                skipped.append(f"skipped leaky stage 3 run {run.path} (trained with the label-leaking mask "
                               f"{run.summary.get('mask')}); name it with --checkpoint to score it anyway")
                run = latest_verified(runs_dir, stage, statuses=rundir.USABLE,
                                      where=lambda r, of=of: of(r) and not r.summary.get("leaky"))
            if run is not None:
                chosen.append((run, run.path / "final"))
        latest = max((rundir.started(r) for r, _ in chosen if r.stage == stage), default=None)
        for newer in rundir.find_runs(runs_dir, stage):
            if newer.status == rundir.DIVERGED and (latest is None or rundir.started(newer) > latest):
                skipped.append(f"skipped diverged stage 3 run {newer.path} ({newer.reason}); it has no final model: "
                               "name one of its checkpoints with --checkpoint to score that")
    if not chosen:
        raise BadInput(f"no completed stage 3 run in {runs_dir}" + (f" ({'; '.join(skipped)})" if skipped else "")
                       + "; run `ablate stage3` first")
    return chosen, skipped


def _finetune(run: rundir.Run, model_dir: Path, runs_dir: Path, ignore_gate: bool) -> Finetuned:
    """One model to score, verified: a final/ against its run's summary.json, a checkpoint against the run's
    digests.json (by ``_named``) and its base model against the run's record. BadInput, in one line."""
    if run.error or (run.summary is None and run.status not in (rundir.FAILED, rundir.CRASHED)):
        raise BadInput(f"stage 3 run {run.path} is {run.status} but its summary.json is "
                       + (f"damaged: {run.error}" if run.error else "missing") + "; restore it")
    if run.summary is not None:
        run = verified(run, runs_dir)  # its summary, config and log agree, as stage 3 wrote them
    trained = stage3_record(run)
    if model_dir.name == "final":
        refuse_gated(run, ignore_gate)
        if not model_dir.is_dir():
            raise BadInput(f"stage 3 run {run.path} has no final/ model")
        return Finetuned(run, model_dir, verify_final(model_dir, run.summary, f"stage 3 run {run.path}"), trained)
    identity = model_identity(str(model_dir))
    base = identity.get("base") or model_identity(trained["model"])  # a full checkpoint takes the base's tokenizer
    if base != trained["model_identity"]:
        raise BadInput(f"the checkpoint {model_dir} needs its base model {trained['model']}, which now holds "
                       f"{describe(base)}, but stage 3 trained on {describe(trained['model_identity'])}; restore "
                       "that base model")
    return Finetuned(run, model_dir, identity, trained)


def _named(item: str) -> tuple[rundir.Run, Path]:
    """``--checkpoint``: a usable stage 3 run (its final/), or one intact checkpoint folder of a stage 3 run of any
    status but running."""
    path = Path(item)
    if path.parent.name == "checkpoints" and checkpoint_step(path) is not None:
        run = rundir.explicit_run(path.parent.parent, STAGE3_PREFIX, "--checkpoint", statuses=CHECKPOINT_OF,
                                  need_results=False)
        why = resume.problem(path) if path.is_dir() else "not a folder"
        if why:
            raise BadInput(f"--checkpoint {item} is not an intact checkpoint ({why})")
        return run, path
    found = rundir.load_run(path)
    if found is not None and found.stage.startswith(STAGE3_PREFIX) and found.status in CHECKPOINT_OF \
            and found.status not in rundir.USABLE:
        kept = [c.name for c in resume.intact(found.path)]
        raise BadInput(f"--checkpoint {item} is {found.status} ({found.reason}); it has no final model. Name one of "
                       f"its checkpoints to score that instead: " + (", ".join(f"{item}/checkpoints/{c}" for c in kept)
                                                                   if kept else "it kept none intact"))
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

        run = (latest_verified(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE,
                               where=lambda r: of_base(r) and r.metrics.get("seed") == seed)
               or latest_verified(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE, where=of_base))
        if run is None:
            raise BadInput(f"stage 4 needs a completed stage 1 run of the stage 3 base model ({describe(base)}) in "
                           f"{Path(config.runs_dir) / STAGE1}; run `ablate stage1` on that model first")
    refuse_gated(run, config.ignore_gate)
    return run


def find_stage2(config: Stage4Config, stage1: rundir.Run) -> tuple[rundir.Run | None, str | None]:
    key = stage1.metrics["comparison"]
    run = latest_verified(Path(config.runs_dir), STAGE2,
                          where=lambda r: r.metrics.get("comparison") == key and r.metrics.get("mask") == config.mask
                          and layer_masks.same_layers(r.metrics, config.mask_layers))
    if run:
        return run, None
    layers = f" in layers {config.mask_layers}" if config.mask_layers else ""
    return None, f"no completed stage 2 run with mask {config.mask}{layers} matches stage 1 run {stage1.run_id}"


def stage4_eval_config(config: Stage4Config, stage1: rundir.Run) -> EvalConfig:
    """Stage 1's tasks and settings (its config.json) under this stage's mask, device, dtype and batch size."""
    settings = dict(stage1.config or {})
    if not settings:
        raise BadInput(f"stage 1 run {stage1.path} has no readable config.json")
    settings.update(tasks=tuple(settings["tasks"]), task_data=tuple(settings["task_data"]))
    return EvalConfig(**{**settings, "stage": STAGE4, "mask": config.mask, "mask_layers": config.mask_layers,
                         "device": config.device,
                         "dtype": config.dtype, "attn_implementation": config.attn_implementation,
                         "batch_size": config.batch_size or settings["batch_size"],
                         "runs_dir": config.runs_dir, "baseline": None})


def run_stage4(config: Stage4Config) -> Path | None:
    """Score the chosen models into a new stage 4 run; under ``accelerate launch`` rank 0 writes it and the other
    ranks (each scoring its share of the documents) return None."""
    from ablate.core.models import check_resolved, load_model, load_tokenizer, resolve_device

    started = time.time()
    device = resolve_device(config.device)
    state = eval_state(device)
    finetunes, skipped = choose_finetunes(config)
    for why in skipped:
        log.warning("stage 4 %s", why)
    bases = {json.dumps(f.trained["model_identity"], sort_keys=True) for f in finetunes}
    if len(bases) != 1:
        raise BadInput("the stage 3 runs start from different models; run stage 4 once per base model with --checkpoint")
    seeds = {f.trained["seed"] for f in finetunes}
    stage1 = find_stage1(config, finetunes[0].trained["model_identity"], seeds.pop() if len(seeds) == 1 else None)
    stage2, stage2_reason = find_stage2(config, stage1)
    # The baselines' numbers come from their samples, checked against the digests their runs recorded.
    s1, s2 = verified_samples(stage1), verified_samples(stage2) if stage2 else None
    stage1, stage2 = verified(stage1, config.runs_dir), stage2 and verified(stage2, config.runs_dir)
    eval_config = stage4_eval_config(config, stage1)
    manager, task_data, tasks = check_inputs(eval_config)
    recorded = stage1.metrics["comparison"]
    key = comparison_key(eval_config, task_data, recorded["model"], tasks, manager, device)
    if key != recorded:
        raise BadInput(f"stage 1 run {stage1.path} was made on other task data or settings than its config.json "
                       f"now gives ({', '.join(mismatch(key, recorded))} differ; a --task-data file changed?)")
    rundir.check_writable(Path(config.runs_dir), STAGE4)

    def load(finetune):
        # A Trainer checkpoint holds no tokenizer; stage 3 never changes the base model's.
        tokenizer = None if finetune.model_dir.name == "final" else load_tokenizer(finetune.trained["model"])
        model, tokenizer = load_model(str(finetune.model_dir), device, config.dtype, config.attn_implementation,
                                      tokenizer)
        check_resolved(model, key, str(finetune.model_dir))
        check_lengths(eval_config, tasks, tokenizer)
        layer_masks.check_spec(config.mask_layers, model)  # its layers exist, before the run folder does
        return model, tokenizer

    # Every model loads, resolves as asked and fits --max-length before the run folder exists; the first is kept.
    for finetune in finetunes[1:]:
        load(finetune)
    loaded = load(finetunes[0])
    record = {**config.__dict__, "evaluation": eval_config.to_dict()}
    with evaluation_run(record, STAGE4, config.runs_dir, state, device) as run:
        for why in skipped:
            log.info("stage 4 %s", why)  # in run.log too
        results, correct, ablated_layers = [], {}, None
        for finetune in finetunes:
            log.info("stage 4: %s (trained with %s) under %s", finetune.model_dir, finetune.trained["mask"],
                     config.mask)
            (model, tokenizer), loaded = loaded or load(finetune), None
            ablated = evaluate(eval_config, model, tokenizer, device, config.mask, tasks, manager, config.mask_layers)
            causal = (evaluate(eval_config, model, tokenizer, device, "causal", tasks, manager)
                      if config.also_causal else None)
            del model
            if ablated is None:  # another rank: its documents went to rank 0, which writes the run
                continue
            entry = _entry(run.path, finetune, ablated, causal, s1, s2)
            correct[entry["label"]] = {t: {r["doc_id"]: r["correct"] for r in rows}
                                       for t, rows in ablated["rows"].items()}
            results.append(entry)
            ablated_layers = ablated["mask_layers"]
        if not run.is_main:
            return None
        run.metrics = {
            "stage": STAGE4,
            "run_id": run.path.name,
            "status": rundir.COMPLETED,
            "mask": config.mask,
            "mask_layers": ablated_layers,
            "stage1_run": str(stage1.path),
            "stage1_uid": stage1.uid,
            "stage2_run": str(stage2.path) if stage2 else None,
            "stage2_uid": stage2.uid if stage2 else None,
            "stage2_reason": stage2_reason,
            "comparison": key,
            "checkpoints": results,
            "skipped": skipped,
            "head_to_head": head_to_head(results, correct),
            # every two trainings against each other (ablate.results.recovery.pairs), for more than two models
            "pairs": pairs(results, correct),
            "timing": {"wall_seconds": round(time.time() - started, 3)},
        }
    return run.path


def _entry(run_dir: Path, finetune: Finetuned, ablated: dict, causal: dict | None, s1: dict, s2: dict | None) -> dict:
    """One scored model's block of metrics.json: what it is, its results under the mask, recovery."""
    run, label, summary = finetune.run, finetune.label, finetune.run.summary or {}
    checkpoint = finetune.step is not None
    chance = {t: m["chance"] for t, m in ablated["tasks"].items()}
    return {
        "label": label,
        "checkpoint": str(run.path),  # the stage 3 run
        "checkpoint_uid": run.uid,
        "model_dir": str(finetune.model_dir),
        "model_identity": finetune.identity,
        # The run's final model, or a checkpoint of it: its step, and the run's status and reason when scored.
        "scored": "checkpoint" if checkpoint else "final",
        "step": finetune.step,
        "run_status": str(run.status),
        "run_reason": run.reason or None,
        "train_mask": finetune.trained["mask"],
        "train_mask_layers": finetune.trained["mask_layers"],  # None: trained under the mask in every layer
        "train_seed": finetune.trained["seed"],
        "leaky": finetune.trained["leaky"],
        "save_format": None if checkpoint else (summary.get("save") or {}).get("format"),
        "tasks": ablated["tasks"],
        "macro": ablated["macro"],
        "samples": write_samples(run_dir, ablated["rows"], prefix=f"{label}_"),  # what a reader verifies it against
        "timing": ablated["timing"],
        "oom_retries": ablated["oom_retries"],
        # the runtime check of the mask on this model (ablate.core.mask_check): with --mask-layers, its layers
        "mask_check": ablated.get("mask_check"),
        # segment masks: where the evaluation prompts were cut (ablate.core.segments)
        **({"segments": ablated["segments"]} if ablated.get("segments") else {}),
        "recovery": recovery_block(ablated["rows"], s1, s2, chance),
        "causal": None if causal is None else {
            "tasks": causal["tasks"], "macro": causal["macro"], "timing": causal["timing"],
            "oom_retries": causal["oom_retries"],
            "samples": write_samples(run_dir, causal["rows"], prefix=f"{label}_causal_")},
    }

