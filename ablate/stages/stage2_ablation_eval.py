"""Stage 2: the stage 1 evaluation with the prompt read through an ablated mask, compared with stage 1.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu && \
    ablate stage2 --model /tmp/tiny --tasks ablate_tiny --mask prefill_bidir --device cpu

The comparison is with the latest completed stage 1 run whose comparison
record (model identity, dtype, attention, each task as lm-eval resolved it and
the files it reads, settings, seed; ``ablate.stages.evaluation.comparison_key``)
equals this run's, or with ``--baseline RUN``, which is refused unless it does.
The baseline's numbers are recomputed from its samples, verified against the
digests its metrics.json records; the ``baseline`` block is built by
``ablate.results.recovery.baseline_block``, which every reader calls again on
the samples before showing a number of it (``ablate.results.verified``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.gates import refuse_gated
from ablate.results.rundir import STAGE1
from ablate.stages.config import EvalConfig
from ablate.results.recovery import baseline_block
from ablate.results.samples import verified_samples
from ablate.results.verified import latest_verified, verified
from ablate.stages.evaluation import EvalInputs, run_eval

log = logging.getLogger(__name__)


def run_stage2(config: EvalConfig, inputs: EvalInputs | None = None, loaded=None) -> Path:
    """``inputs``: what ``ablate.stages.evaluation.prepare(config)`` built (``ablate study``), else built here;
    ``loaded``: the model and tokenizer already loaded (``ablate sweep``)."""
    return run_eval(config, compare=lambda key: _finisher(find_baseline(config, key)), inputs=inputs, loaded=loaded)


def _finisher(baseline: dict):
    return lambda metrics, rows: baseline_block(metrics, baseline, rows)


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
        correct = verified_samples(run)
        return {"run": verified(run, Path(config.runs_dir)), "correct": correct}  # every number of it, too
    run = latest_verified(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE,
                          where=lambda r: r.metrics.get("comparison") == key)
    if run:
        refuse_gated(run, config.ignore_gate)
        correct = verified_samples(run)
        return {"run": verified(run, Path(config.runs_dir)), "correct": correct}  # every number of it, too
    where = Path(config.runs_dir) / STAGE1
    newest = rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE)
    if newest is None:
        return {"reason": f"no completed stage 1 run in {where}"}
    differs = mismatch(key, newest.metrics.get("comparison"))
    return {"reason": f"no completed stage 1 run in {where} matches this run; the latest "
                      f"({newest.run_id}) differs in {', '.join(differs)}"}
