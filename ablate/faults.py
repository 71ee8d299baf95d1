"""Test-only fault injection: make this process die at a named moment, or run out of memory on purpose.

    ABLATE_FAULT_KILL_AT=eval ablate stage1 ...        # SIGKILL itself as stage 1 starts scoring
    ABLATE_FAULT_KILL_AT=eval/TERM ablate stage1 ...   # SIGTERM instead
    ABLATE_FAULT_OOM_ROWS=3 ablate stage1 ...          # every forward or generate call of more than 3 rows
                                                       # raises torch.OutOfMemoryError (0: every call)

The crash tests use the first to kill a stage at an exact moment instead of racing a timer; the
out-of-memory tests (tests/test_oom.py) use the second to exercise the halving retries without a GPU.
"""

from __future__ import annotations

import os
import signal


def fault_point(moment: str) -> None:
    spec = os.environ.get("ABLATE_FAULT_KILL_AT", "")
    want, _, name = spec.partition("/")
    if want == moment:
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


def oom_fault(rows: int) -> None:
    """Called with the rows of each scoring forward and generate call (ablate.core.lm_eval_model)."""
    limit = os.environ.get("ABLATE_FAULT_OOM_ROWS", "")
    if limit and rows > int(limit):
        import torch  # only when the fault is on

        raise torch.OutOfMemoryError(f"CUDA out of memory. (ABLATE_FAULT_OOM_ROWS={limit}, {rows} rows)")
