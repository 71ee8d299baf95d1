"""A run's log file: ablate's, lm-eval's and transformers' records copied into ``run.log`` while a stage runs.

    python -c "from ablate.results.runlog import run_log; import logging; cm = run_log('/tmp/x.log'); cm.__enter__(); logging.getLogger('ablate').info('hi'); cm.__exit__(None, None, None)"
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def run_log(path: Path):
    """Copy ablate's and lm-eval's log records (INFO and up) and transformers' (at its own level) into the run's log."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("ablate", "lm_eval", "transformers")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    for lg in loggers[:2]:  # transformers' INFO would also reach its own console handler
        lg.setLevel(min(lg.level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
