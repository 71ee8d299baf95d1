"""``ablate study``: the whole study from one file, stage 1 to the report, resuming where it stopped.

    ablate tiny-model --out /tmp/tiny
    printf 'model: /tmp/tiny\\ntasks: [ablate_tiny]\\ndevice: cpu\\nlimit: 8\\nstage3: {data: tests/data/sft.jsonl, max_steps: 4, max_length: 64}\\n' > study.yaml
    ablate study --config study.yaml

Stage 1 -> stage 2 -> stage 3 (each mask of ``study: {masks: [...]}``, both by default) -> stage 4 -> the
report and STATUS.md, each stage configured by ``ablate.stages.study_file`` exactly as ``ablate stageN
--config`` would be. Every stage's config is resolved and checked before the first one runs. A stage
whose completed run matches what this file would run is reused, never rerun: an evaluation by its
comparison record (and stage 2 by its mask and baseline), a finetune by its resolved config, base model
identity and data digest, stage 4 by its config (which names the stage 1 and stage 3 runs it scores). A
crashed stage 3 run of the same config is resumed from its newest intact checkpoint. A gated, failed
or diverged stage stops the study with one line naming the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from ablate.core import layer_masks
from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.aggregate import PROVENANCE
from ablate.results.rundir import STAGE1, STAGE2, STAGE4
from ablate.stages import study_file

log = logging.getLogger(__name__)

TRAIN_MASKS = ("causal", "prefill_bidir")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every stage's resolved config, checked before anything runs."""

    stage1: object
    stage2: object
    stage3: dict  # mask -> FinetuneConfig
    stage4: object
    report: Path


def plan(path: str | Path) -> Plan:
    from ablate.stages.config import SECTIONS, load_eval_config, load_finetune_config, load_stage4_config

    values, _ = study_file.read(path, SECTIONS)
    extra = study_file.study_values(values)
    masks = extra.get("masks", list(TRAIN_MASKS))
    if not isinstance(masks, list) or not masks or any(m not in TRAIN_MASKS for m in masks) \
            or len(set(masks)) != len(masks):
        raise BadInput(f"--config {path}: study.masks must list stage 3 masks among {', '.join(TRAIN_MASKS)} "
                       f"(each once), got {masks!r}")
    flags = {"config_file": str(path)}
    s1 = load_eval_config(STAGE1, flags)
    s2 = load_eval_config(STAGE2, flags)
    s3 = {mask: load_finetune_config({**flags, "mask": mask}) for mask in masks}
    s4 = load_stage4_config(flags)
    dirs = {Path(c.runs_dir).resolve() for c in (s1, s2, s4, *s3.values())}
    if len(dirs) != 1:
        raise BadInput(f"--config {path}: every stage of a study writes into one runs folder; the file gives "
                       f"{', '.join(sorted(map(str, dirs)))} (set runs_dir at the top level only)")
    report = Path(extra.get("report") or Path(s1.runs_dir).parent / "RESULTS.md")
    return Plan(s1, s2, s3, s4, report)


def _same(recorded: dict | None, want: dict) -> bool:
    """A run's config.json holds every value of ``want`` (as JSON holds them: tuples are lists)."""
    want = json.loads(json.dumps({k: v for k, v in want.items() if k not in PROVENANCE}))
    return isinstance(recorded, dict) and all(recorded.get(k, object()) == v for k, v in want.items())


def _stop_unless_completed(stage: str, run) -> None:
    if run.status != rundir.COMPLETED:
        raise BadInput(f"study stopped: {stage} run {run.path} is {run.status}"
                       + (f" ({run.reason})" if run.reason else "")
                       + "; see STATUS.md, change the settings that caused it in the study file (or move the run "
                       "out of the runs folder) and run the study again")


def _eval_stage(config, stage: str, where: Callable, run: Callable, say: Callable) -> tuple[rundir.Run, str]:
    """Reuse the latest completed (or gated: it stops the study) run ``where`` accepts, else ``run(config,
    inputs)``: the tasks built to find one are the ones it evaluates (built once, ``prepare``)."""
    from ablate.stages.evaluation import prepare

    inputs = prepare(config)
    found = rundir.latest(Path(config.runs_dir), stage, statuses=rundir.USABLE,
                          where=lambda r: r.metrics.get("comparison") == inputs.key and where(r))
    return _reuse_or_run(stage, found, lambda: run(config, inputs), say)


def _reuse_or_run(stage: str, found, run: Callable, say: Callable) -> tuple[rundir.Run, str]:
    """``found`` (a run of this study's stage), else what ``run()`` makes; the study stops unless completed."""
    how = "reused" if found is not None else "ran"
    if found is None:
        found = rundir.load_run(run())
    say(f"{stage}: {'reusing' if how == 'reused' else 'ran'} {found.path} ({found.status})")
    _stop_unless_completed(stage, found)
    return found, how


def _stage3(config, say: Callable) -> tuple[rundir.Run, str]:
    from ablate.core.identity import model_identity
    from ablate.core.sft_data import data_identity
    from ablate.stages.stage3_finetune import run_stage3

    want = config.to_dict()
    identity = {"model_identity": model_identity(config.model),
                "data_identity": data_identity(config.data, config.eval_data)}

    def ours(r):
        return _same(r.config, want) and all((r.info or {}).get(k) == v for k, v in identity.items())

    runs = [r for r in rundir.find_runs(Path(config.runs_dir), config.stage) if ours(r)]
    last = runs[-1] if runs else None
    how = "ran" if last is None else "resumed" if last.status in (rundir.CRASHED, rundir.FAILED) \
        and last.summary is None else "reused"
    if last is None:
        last = rundir.load_run(run_stage3(config))
        say(f"{config.stage}: ran {last.path} ({last.status})")
    elif last.status in (rundir.CRASHED, rundir.FAILED) and last.summary is None:
        say(f"{config.stage}: resuming {last.path} ({last.status})")
        from ablate.stages.stage3_resume import decide

        plan = decide(config.mask, config.runs_dir, last.path)
        last = rundir.load_run(run_stage3(plan.config, resume=plan))
    else:  # it ended (completed, gated, diverged): the same config and seed would end the same way again
        say(f"{config.stage}: reusing {last.path} ({last.status})")
    _stop_unless_completed(config.stage, last)
    return last, how


def _stage4(config, say: Callable) -> tuple[rundir.Run, str]:
    from ablate.stages.stage4_post_ft_eval import run_stage4

    want = dataclasses.asdict(config)
    found = rundir.latest(Path(config.runs_dir), STAGE4, where=lambda r: _same(r.config, want))
    return _reuse_or_run(STAGE4, found, lambda: run_stage4(config), say)


def run_study(path: str | Path, say: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every stage of the study in ``path``; returns each stage's run folder and the report."""
    from ablate.results.report import write_report
    from ablate.results.status import write_status
    from ablate.stages.stage1_baseline_eval import run_stage1
    from ablate.stages.stage2_ablation_eval import run_stage2

    p = plan(path)
    runs_dir = Path(p.stage1.runs_dir)
    done, how, seconds = {}, {}, {}

    def timed(stage: str, call) -> None:
        begin = time.time()
        done[stage], how[stage] = call()
        seconds[stage] = round(time.time() - begin, 1)

    timed(STAGE1, lambda: _eval_stage(p.stage1, STAGE1, lambda r: True, run_stage1, say))
    s2 = dataclasses.replace(p.stage2, baseline=str(done[STAGE1].path))
    timed(STAGE2, lambda: _eval_stage(
        s2, STAGE2, lambda r: r.metrics.get("mask") == s2.mask and layer_masks.same_layers(r.metrics, s2.mask_layers)
        and (r.metrics.get("baseline") or {}).get("run") == str(done[STAGE1].path), run_stage2, say))
    for config in p.stage3.values():
        timed(config.stage, lambda: _stage3(config, say))
    s4 = dataclasses.replace(p.stage4, stage1_run=str(done[STAGE1].path),
                             checkpoints=tuple(str(done[c.stage].path) for c in p.stage3.values()))
    timed(STAGE4, lambda: _stage4(s4, say))
    out = {stage: run.path for stage, run in done.items()}
    out["seconds"] = seconds  # each stage's wall time in this call (a reused stage: the time to find it)
    out["how"] = how  # each stage: ran, reused or resumed
    out["report"] = write_report(runs_dir, p.report)
    out["status"] = write_status(runs_dir)
    return out
