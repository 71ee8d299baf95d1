"""Test-only fault injection: ``ABLATE_FAULT_KILL_AT=MOMENT[/SIGNAL]`` makes this process die at a named moment.

    ABLATE_FAULT_KILL_AT=eval ablate stage1 ...        # SIGKILL itself as stage 1 starts scoring
    ABLATE_FAULT_KILL_AT=eval/TERM ablate stage1 ...   # SIGTERM instead

The crash tests use it to kill a stage at an exact moment instead of racing a timer.
"""

from __future__ import annotations

import os
import signal


def fault_point(moment: str) -> None:
    spec = os.environ.get("ABLATE_FAULT_KILL_AT", "")
    want, _, name = spec.partition("/")
    if want == moment:
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
