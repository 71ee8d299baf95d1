"""`ablate demo|tiny-model`: the offline demo and tiny models of each supported architecture.

    ablate demo --preset smoke --workdir /tmp/ablate-demo
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ablate.cli.console import fail, quiet_libraries
from ablate.cli.tables import recovery_table, summary_table
from ablate.errors import BadInput


def demo(
    workdir: Path = typer.Option(Path("demo"), help="folder for the world, the model, runs/, the report and STATUS.md"),
    preset: str = typer.Option("full", help="full (the documented demo) or smoke (the test suite's small one)"),
    seed: int = typer.Option(0, help="seeds the world, the pretraining and every stage"),
):
    """Offline demo on CPU: a synthetic world, a tiny LM trained from scratch, all four stages, the report."""
    from ablate.demo.run import PRESETS, run_demo

    if preset not in PRESETS:
        fail(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
    quiet_libraries()
    try:
        out = run_demo(workdir, preset, seed, echo=typer.echo)
    except BadInput as exc:
        fail(str(exc))
    for stage in ("stage1", "stage2", "stage4"):
        typer.echo("")
        metrics = json.loads((out[stage] / "metrics.json").read_text())
        typer.echo(summary_table(metrics) if stage != "stage4" else recovery_table(metrics))
    typer.echo("")
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "report", "plot", "status"):
        typer.echo(f"{key:<22}{out[key]}")
    typer.echo(f"demo finished in {out['seconds']:.0f} s")


def tiny_model(
    out: Path = typer.Option(..., help="folder to write the model into (must not exist)"),
    arch: str = typer.Option("llama", help="llama, mistral, ministral3, qwen2, qwen3 or mistral3"),
    seed: int = typer.Option(0, help="initialisation seed"),
):
    """Build a tiny random model of a real architecture offline (for tests and smoke runs)."""
    from ablate.core.tiny import build_tiny_model

    quiet_libraries()
    if out.exists():
        fail(f"{out} already exists; choose a new folder")
    try:
        path = build_tiny_model(out, arch=arch, seed=seed)
    except BadInput as exc:
        fail(str(exc))
    typer.echo(f"tiny {arch} model written to {path}")



def register(app: typer.Typer) -> None:
    app.command(epilog="Examples:\n\n  ablate demo\n\n  ablate demo --preset smoke --workdir /tmp/ablate-demo")(demo)
    app.command("tiny-model", epilog="Example:\n\n  ablate tiny-model --arch mistral3 --out /tmp/tiny-mistral3")(
        tiny_model)
