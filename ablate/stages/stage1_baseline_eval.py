"""Stage 1: the baseline, lm-evaluation-harness with the causal mask.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu

Study settings live in ``stage1_baseline_eval.yaml`` beside this module.
"""

from __future__ import annotations

from pathlib import Path

from ablate.stages.config import EvalConfig
from ablate.stages.evaluation import EvalInputs, run_eval


def run_stage1(config: EvalConfig, inputs: EvalInputs | None = None) -> Path:
    """``inputs``: what ``ablate.stages.evaluation.prepare(config)`` built (``ablate study``), else built here."""
    return run_eval(config, inputs=inputs)
