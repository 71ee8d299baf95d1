"""Stage 2: the stage 1 evaluation with the prompt read through an ablated mask, compared with stage 1.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu && \
    ablate stage2 --model /tmp/tiny --tasks ablate_tiny --mask prefill_bidir --device cpu

The comparison is with the latest completed stage 1 run whose comparison
record (model identity, dtype, attention, each task as lm-eval resolved it and
the files it reads, settings, seed; ``ablate.stages.evaluation.comparison_key``)
equals this run's, or with ``--baseline RUN``, which is refused unless it does.
The baseline's numbers are recomputed from its samples, verified against the
digests its metrics.json records.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.gates import refuse_gated
from ablate.results.rundir import STAGE1
from ablate.stages.config import EvalConfig
from ablate.stages.evaluation import accuracy, run_eval, verified_samples

log = logging.getLogger(__name__)


def run_stage2(config: EvalConfig) -> Path:
    return run_eval(config, compare=lambda key: _finisher(find_baseline(config, key)))


def _finisher(baseline: dict):
    return lambda metrics, rows: compare(metrics, baseline, rows)


def find_baseline(config: EvalConfig, key: dict) -> dict:
    """The stage 1 run to compare with: ``--baseline`` (refused unless it matches), else the latest matching one.

    Its samples are verified against the digests it recorded (``verified_samples``): the numbers compared
    are recomputed from them, never read from its metrics.json.
    """
    from ablate.core.identity import describe, mismatch

    if config.baseline:
        run = rundir.explicit_run(config.baseline, STAGE1, "--baseline")
        differs = mismatch(key, run.metrics.get("comparison"))
        if differs:
            found = run.metrics.get("comparison") or {}
            detail = (f" (it evaluated {describe(found.get('model'))}, this run {describe(key['model'])})"
                      if "model" in differs else "")
            raise BadInput(f"--baseline {config.baseline} differs from this run in {', '.join(differs)}{detail}; "
                           "a comparison needs the same model, tasks, data and settings")
        refuse_gated(run, config.ignore_gate)
        return {"run": run, "correct": verified_samples(run)}
    run = rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE,
                        where=lambda r: r.metrics.get("comparison") == key)
    if run:
        refuse_gated(run, config.ignore_gate)
        return {"run": run, "correct": verified_samples(run)}
    where = Path(config.runs_dir) / STAGE1
    newest = rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE)
    if newest is None:
        return {"reason": f"no completed stage 1 run in {where}"}
    differs = mismatch(key, newest.metrics.get("comparison"))
    return {"reason": f"no completed stage 1 run in {where} matches this run; the latest "
                      f"({newest.run_id}) differs in {', '.join(differs)}"}


def compare(metrics: dict, baseline: dict, rows: dict | None = None) -> dict:
    """Per-task and macro delta and retention against the stage 1 run, or why there is none.

    The stage 1 numbers are recomputed from its verified samples (``baseline["correct"]``). With this run's
    per-document ``rows``, each delta gets its paired 95% bootstrap interval and an exact McNemar test
    against stage 1's samples of the same documents (``paired``).
    """
    run = baseline.get("run")
    if run is None:
        log.warning("no stage 1 baseline: %s", baseline["reason"])
        return {"run": None, "reason": baseline["reason"]}
    before = accuracy(baseline["correct"])

    def delta(now, before):
        if now is None or before is None:
            return {"acc_baseline": before, "delta": None, "retention": None}
        # Retention is undefined when the baseline is 0; never report a huge or infinite ratio.
        return {"acc_baseline": before, "delta": now - before,
                "retention": now / before if before > 0 else None}

    out = {
        "run": str(run.path),
        "run_id": run.run_id,
        "tasks": {name: delta(t["acc"], before["tasks"].get(name)) for name, t in metrics["tasks"].items()},
        "macro": delta(metrics["macro"]["acc"], before["macro"]),
    }
    if rows:
        out["paired"] = paired(run.path, rows, baseline["correct"])
    return out


def paired(stage1_dir: Path, rows: dict, correct: dict) -> dict:
    """Stage 2 minus stage 1 on the same documents: paired intervals and McNemar (ablate.results.recovery)."""
    import numpy as np

    from ablate.results.recovery import paired_difference

    before, after = {}, {}
    for task, task_rows in rows.items():
        c1 = correct[task]  # verified_samples of the stage 1 run
        c2 = {r["doc_id"]: bool(r["correct"]) for r in task_rows}
        if set(c1) != set(c2):  # the comparison record matched, so this is a damaged or edited run
            raise BadInput(f"stage 1 run {stage1_dir} scored other {task} documents than this run")
        docs = sorted(c2)
        before[task], after[task] = np.array([c1[d] for d in docs]), np.array([c2[d] for d in docs])
    return paired_difference(before, after)
