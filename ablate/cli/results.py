"""`ablate status|report|aggregate|masks`: what the run directories say, regenerated on demand.

    ablate status --runs-dir runs
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ablate.cli.console import fail
from ablate.errors import BadInput


def _runs(runs_dir: str) -> Path:
    if not runs_dir.strip():
        fail("--runs-dir must name a folder, got ''")
    if not Path(runs_dir).is_dir():
        fail(f"runs folder '{runs_dir}' does not exist")
    return Path(runs_dir)


def status(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Optional[Path] = typer.Option(None, help="where to write (default: STATUS.md beside the runs folder)"),
):
    """Regenerate STATUS.md from the run directories."""
    from ablate.results.status import write_status

    typer.echo(f"wrote {write_status(_runs(runs_dir), out)}")


def report(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Path = typer.Option(Path("docs/RESULTS.md"), help="the report to write; the plot goes beside it"),
):
    """Write the recovery report (markdown and a PNG plot) from the run directories."""
    from ablate.results.report import write_report

    typer.echo(f"wrote {write_report(_runs(runs_dir), out)}")


def aggregate(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Optional[Path] = typer.Option(None, help="also write the aggregate as JSON here"),
    across_data: bool = typer.Option(False, "--across-data", help=(
        "also pool runs whose documents differ, each seed its own draw of the task's data (ablate demo --seed N): "
        "same task processing and number of documents, other files")),
):
    """Mean, standard deviation and n across seeds, per task and macro, and of the paired comparisons
    (stage 2 minus stage 1, stage 4's head-to-head) with each seed's interval."""
    from ablate.results.aggregate import aggregate as collect, render
    from ablate.results.rundir import write_json

    damaged: list[str] = []
    rows = collect(_runs(runs_dir), damaged, across_data=across_data)
    typer.echo(render(rows, damaged))
    if out:
        write_json(out, rows)
        typer.echo(f"wrote {out}")


def masks(
    mask_file: str = typer.Argument(None, help="FILE.py:NAME: what the probes decide about a mask from a file"),
):
    """List the registered attention masks, or show what a mask from a file is (docs/masks.md)."""
    from ablate.core.masks import MASKS

    if mask_file is not None:
        from ablate.core.mask_files import resolve
        from ablate.core.user_masks import parse

        if parse(mask_file) is None:
            raise BadInput(f"'{mask_file}' is not FILE.py:NAME")
        spec = MASKS[resolve(mask_file, None)[0]]
        typer.echo(f"{spec.name}: {spec.description}")
        for what, value in (("leaks labels (refused in training)", spec.leaks_labels),
                            ("shares contexts (prefix-shared evaluation)", spec.shares_context),
                            ("causal after the prompt (can generate)", spec.causal_continuation),
                            ("reads segments", spec.needs_segments)):
            typer.echo(f"  {what:<45}{'yes' if value else 'no'}")
        return
    for spec in MASKS.values():
        flag = "  [leaks labels in training]" if spec.leaks_labels else ""
        typer.echo(f"{spec.name:<15}{spec.description}{flag}")
    typer.echo("FILE.py:NAME   a mask function from a file (ablate masks FILE.py:NAME shows what it is)")



def register(app: typer.Typer) -> None:
    app.command(epilog="Example:\n\n  ablate status --runs-dir runs")(status)
    app.command(epilog="Example:\n\n  ablate report --runs-dir runs --out docs/RESULTS.md")(report)
    app.command(epilog="Example:\n\n  ablate aggregate --runs-dir runs --out runs/aggregate.json\n\n"
                        "  ablate aggregate --runs-dir demo/runs --across-data   # the demo's seeds")(aggregate)
    app.command(epilog="Example:\n\n  ablate masks\n\n  ablate masks tests/data/user_masks.py:prompt_window")(masks)
