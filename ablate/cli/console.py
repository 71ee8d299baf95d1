"""What every command shares on the console: the one-line error, quiet libraries, STATUS.md refresh.

    ablate stage1 --limit nan   # -> "ablate: error: --limit must be a finite number, got nan", exit 2
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from ablate.errors import BadInput


def fail(message: str) -> None:
    """Refuse bad input from a command's own checks: ``ablate.cli`` prints the one line and exits 2."""
    raise BadInput(message)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (so captured output holds the log lines too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A full disk makes every log handler fail; the run's own error says it once, not a traceback per record.
    logging.raiseExceptions = False
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        # The run log gets lm-eval's INFO lines; the console only its warnings and ablate's own lines.
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("ablate"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("ablate").setLevel(logging.INFO)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # per-split bars for small local files are noise; lm-eval keeps its own
    # The per-tensor loading bar would stand before a refusal's one line; ablate logs "loading MODEL" instead.
    transformers.utils.logging.disable_progress_bar()


def refresh_status(runs_dir: str | None) -> None:
    """Regenerate STATUS.md beside the runs folder; a stage's result never depends on this succeeding.

    Called when a stage ends, completed or not; not after bad input, which writes nothing.
    """
    from ablate.results.status import write_status

    failing = sys.exc_info()[1]  # the stage's own error, if it raised
    if isinstance(failing, (BadInput, typer.Exit)):
        return
    runs = Path(runs_dir or "runs")
    if runs.is_dir():
        try:
            write_status(runs)
        except Exception as exc:  # noqa: BLE001 - report, never mask the stage's own outcome
            if failing is None:  # a stage that failed (a full disk) says so in its own one line
                typer.echo(f"ablate: warning: could not refresh STATUS.md: {exc}", err=True)
