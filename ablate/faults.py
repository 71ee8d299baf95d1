"""Test-only fault injection: die at a named moment, or run out of memory on purpose (scoring or training).

    ABLATE_FAULT_KILL_AT=eval ablate stage1 ...        # SIGKILL itself as stage 1 starts scoring
    ABLATE_FAULT_KILL_AT=eval/TERM ablate stage1 ...   # SIGTERM instead
    ABLATE_FAULT_KILL_AT=step:5 ablate stage3 ...      # SIGKILL after stage 3's optimizer step 5
    ABLATE_FAULT_OOM_ROWS=3 ablate stage1 ...          # every forward or generate call of more than 3 rows
                                                       # raises torch.OutOfMemoryError (0: every call)
    ABLATE_FAULT_TRAIN_OOM_ROWS=2@3 ablate stage3 ...  # from optimizer step 3 on, every training micro-batch of
                                                       # more than 2 rows runs out of memory (no @: from step 1)

Production code marks its moments with ``fault_point(moment, step=None)``, its scoring calls with
``oom_fault(rows)`` and stage 3's training micro-batches with ``train_oom_fault(rows, step)``; nothing else reads
these variables. The moments:

- ``eval``: stage 1, 2 or 4 starts scoring (ablate.stages.evaluation); stage 3's evaluation after its last step
- ``step:N``: after stage 3's optimizer step N
- ``save:N``: inside stage 3's checkpoint N (weights written; optimizer and trainer_state.json not)
- ``final_save``: inside the save of ``final/`` (weights written; tokenizer and checkpoint_meta.json not)

The crash tests use the first variable to kill a stage at an exact moment instead of racing a timer; the
out-of-memory tests (tests/test_oom.py, tests/test_train_oom.py) use the others to exercise the halving retries
without a GPU.
"""

from __future__ import annotations

import os
import signal

KILL_AT, OOM_ROWS = "ABLATE_FAULT_KILL_AT", "ABLATE_FAULT_OOM_ROWS"
TRAIN_OOM_ROWS = "ABLATE_FAULT_TRAIN_OOM_ROWS"


def fault_point(moment: str, step: int | None = None) -> None:
    """Send this process the signal ``ABLATE_FAULT_KILL_AT`` names (SIGKILL by default) if it names this moment."""
    want, _, name = os.environ.get(KILL_AT, "").partition("/")
    if want == (moment if step is None else f"{moment}:{step}"):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


def oom_fault(rows: int) -> None:
    """Called with the rows of each scoring forward and generate call (ablate.core.lm_eval_model)."""
    limit = os.environ.get(OOM_ROWS, "")
    if limit and rows > int(limit):
        import torch  # only when the fault is on

        raise torch.OutOfMemoryError(f"CUDA out of memory. ({OOM_ROWS}={limit}, {rows} rows)")


def train_oom_fault(rows: int, step: int) -> None:
    """Called with the rows of each stage 3 training micro-batch and the optimizer step it belongs to."""
    limit, _, start = os.environ.get(TRAIN_OOM_ROWS, "").partition("@")
    if limit and step >= int(start or 1) and rows > int(limit):
        import torch  # only when the fault is on

        raise torch.OutOfMemoryError(f"CUDA out of memory. ({TRAIN_OOM_ROWS}={limit}, step {step}, {rows} rows)")
