"""What stage 4 takes from a stage 3 run, and how it names what it scored.

    python -c "from ablate.results.finetuned import stage4_label; print(stage4_label('causal', 'RUN', 'RUN/checkpoints/checkpoint-200'))"

A stage 4 entry scores a stage 3 run's ``final/`` (a completed or gated run) or
one of its checkpoints (``RUN/checkpoints/checkpoint-N`` of a completed, gated,
diverged, failed or crashed run, named with ``--checkpoint``): ``scored`` says
which, ``step`` the checkpoint's step. The stage (``ablate.stages.stage4_post_ft_eval``)
and the reader that verifies its metrics.json (``ablate.results.verified``) both
take the training mask, leakage, seed and base model from ``stage3_record`` and
the label from ``stage4_label``.
"""

from __future__ import annotations

from pathlib import Path

from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.samples import config_digest, mask_leaks

SCORED = ("final", "checkpoint")  # what a stage 4 entry scored: a stage 3 run's final/, or one of its checkpoints
# The runs a checkpoint may be scored of: any that stage 3 has finished or given up on.
CHECKPOINT_OF = (rundir.COMPLETED, rundir.GATED, rundir.DIVERGED, rundir.FAILED, rundir.CRASHED)


def checkpoint_step(model_dir: Path) -> int | None:
    """N of a stage 3 checkpoint folder ``checkpoints/checkpoint-N``; None for anything else (``final/``)."""
    model_dir = Path(model_dir)
    step = model_dir.name.removeprefix("checkpoint-")
    return int(step) if model_dir.parent.name == "checkpoints" and step != model_dir.name and step.isdigit() else None


def stage4_label(mask: str, run_id: str, model_dir: Path) -> str:
    """A stage 4 entry's label, and its samples files' prefix: training mask, run folder and, for a checkpoint, its
    folder name. Unique within one runs folder, as the run store reads a stage 3 run only in its mask's folder."""
    return f"{mask}-{run_id}" + ("" if Path(model_dir).name == "final" else f"-{Path(model_dir).name}")


def stage3_record(run: rundir.Run) -> dict:
    """What stage 4 takes from a stage 3 run: ``mask``, ``leaky``, ``seed``, ``model`` (the base model as named) and
    ``model_identity`` (its identity). From its summary.json (verified by the caller); a run that ended without
    one (failed, crashed) from its config.json, checked against the digest its run.json recorded at the start, and
    its run.json. BadInput, in one line, when they cannot be trusted."""
    config, info = run.config, run.info or {}
    if not isinstance(config, dict):
        raise BadInput(f"stage 3 run {run.path} has no readable config.json; restore it")
    if run.summary is not None:
        summary = run.summary
        record = {k: summary.get(k) for k in ("mask", "mask_layers", "leaky", "model", "model_identity")}
    else:
        if config.get("mask_layers") is not None:  # only a summary records the layers as resolved on the model
            raise BadInput(f"stage 3 run {run.path} trained under --mask-layers {config['mask_layers']} and has no "
                           "summary.json, which records the layers it resolved; resume it to score it")
        if config_digest(config) != info.get("config_sha256"):
            raise BadInput(f"{Path(run.path) / 'config.json'} holds other settings than stage 3 started with (its "
                           "run.json records their digest); restore it")
        mask = config.get("mask")
        record = {"mask": mask, "mask_layers": None, "leaky": mask_leaks(mask, config), "model": config.get("model"),
                  "model_identity": info.get("model_identity")}
    record["seed"] = config.get("seed")
    if run.stage != rundir.STAGE3_PREFIX + str(record["mask"]) or not isinstance(record["leaky"], bool):
        raise BadInput(f"stage 3 run {run.path} records the training mask {record['mask']!r}, not that of its "
                       f"folder {run.stage}; restore it")
    if not record["model_identity"] or not record["model"]:
        raise BadInput(f"stage 3 run {run.path} does not record its base model and its identity; rerun stage 3")
    return record


def trained_with(entry: dict) -> str:
    """A stage 4 entry's training mask in words, with its layers when it trained under --mask-layers
    (``prefill_bidir in layers 0-9 of 30``): what its results are shown and compared under."""
    layers = entry.get("train_mask_layers")
    if isinstance(layers, dict):
        return f"{entry['train_mask']} in layers {layers.get('layers')} of {layers.get('num_layers')}"
    return str(entry["train_mask"])
