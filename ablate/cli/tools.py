"""`ablate demo|tiny-model`: the offline demo and tiny models of each supported architecture.

    ablate demo --preset smoke --workdir /tmp/ablate-demo
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from ablate.cli.console import fail, quiet_libraries
from ablate.cli.tables import recovery_table, study_table, summary_table
from ablate.demo.real import REAL_PRESETS
from ablate.errors import BadInput

DEMO = REAL_PRESETS["real"]  # bench-stage3's defaults: the demo's stage 3


def demo(
    workdir: Path = typer.Option(Path("demo"), help="folder for the data, runs/, the report and STATUS.md"),
    preset: str = typer.Option("real", help="real (SmolLM2-135M-Instruct on GSM8K-built tasks: the study), "
                                            "synthetic (a tiny LM trained on a synthetic world) or smoke "
                                            "(the test suite's small synthetic one)"),
    seed: int = typer.Option(0, help="seeds the data split, the finetunes and every stage"),
    device: str = typer.Option("auto", help="real preset: cpu, cuda or auto (the synthetic presets use the CPU)"),
):
    """The whole study, offline: stage 1, stage 2 (prefill_bidir), stage 3 under both masks, stage 4, report.

    The stages are a study file the demo writes into the workdir and runs as `ablate study --config` does;
    a second run on the same workdir reuses every completed stage."""
    from ablate.demo.real import REAL_PRESETS, run_real_demo
    from ablate.demo.run import PRESETS, run_demo

    if preset not in {**REAL_PRESETS, **PRESETS}:
        fail(f"unknown preset '{preset}'; choose from {', '.join([*REAL_PRESETS, *PRESETS])}")
    quiet_libraries()
    try:
        if preset in REAL_PRESETS:
            from ablate.stages.config import check_runtime

            check_runtime("prefill_bidir", device, "auto", "sdpa")
            out = run_real_demo(workdir, preset, seed, device, echo=typer.echo)
        else:
            out = run_demo(workdir, preset, seed, echo=typer.echo)
    except BadInput as exc:
        fail(str(exc))
    metrics = {stage: json.loads((out[stage] / "metrics.json").read_text()) for stage in ("stage1", "stage2", "stage4")}
    for stage in ("stage1", "stage2", "stage4"):
        typer.echo("")
        typer.echo(summary_table(metrics[stage]) if stage != "stage4" else recovery_table(metrics[stage]))
    typer.echo("")
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "report", "plot", "status",
                "study"):
        typer.echo(f"{key:<22}{out[key]}")
    typer.echo("")
    # A reused stage took only the time to find it: the line says so.
    seconds = {name if out["how"].get(name, "ran") == "ran" else f"{name}, {out['how'][name]}": s
               for name, s in out["stage_seconds"].items()}
    typer.echo(study_table(metrics["stage1"], metrics["stage2"], metrics["stage4"], seconds))
    typer.echo(f"rerun the study: ablate study --config {out['study']}")
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



def fetch():
    """Fetch and convert the offline real assets once: SmolLM2-135M-Instruct and the GSM8K test split."""
    from ablate.core.assets import gsm8k, smollm2

    quiet_libraries()
    typer.echo(f"model  {smollm2(typer.echo)}")
    typer.echo(f"gsm8k  {gsm8k(typer.echo)}")


def bench(
    model: str = typer.Option("smollm2", help="model folder or hub id; smollm2 = the fetched SmolLM2-135M-Instruct"),
    tasks: str = typer.Option("gsm8k_next_step", help="comma-separated lm-eval tasks; gsm8k_next_step is the "
                              "demo's (GSM8K next-step rows with lm-eval's hellaswag processing)"),
    task_data: List[str] = typer.Option(None, help="TASK=FILE (repeatable); default: the study tasks read their "
                                        "fixture rows"),
    include_path: str = typer.Option(None, help="extra folder of lm-eval task YAMLs"),
    limit: int = typer.Option(100, help="documents per task"),
    repeats: int = typer.Option(2, help="runs of each, alternating"),
    batch_size: str = typer.Option("8", help="batch size for both"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"),
    attn_implementation: str = typer.Option("sdpa", help="sdpa, eager or flex_attention"),
    out: Path = typer.Option(None, help="also write the figures as JSON here"),
):
    """Stock lm-eval vs ablate on the same model and documents: wall ratio, tokens/s, identical predictions."""
    from ablate.bench import render, run_bench
    from ablate.core.assets import cache_root, gsm8k, smollm2
    from ablate.core.tasks import FIXTURE_DATA, parse_task_data
    from ablate.demo.gsm8k_tasks import write_next_step, write_task
    from ablate.results.files import write_json
    from ablate.stages.config import check_batch_size, check_runtime

    quiet_libraries()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    check_runtime("causal", device, dtype, attn_implementation)
    if limit < 1 or repeats < 1:
        fail("--limit and --repeats must be at least 1")
    check_batch_size(batch_size)
    data = parse_task_data(list(task_data or []))
    if "gsm8k_next_step" in names and include_path is None:  # the demo's task, written as the demo writes it
        folder = cache_root() / "data" / "gsm8k"
        rows = write_next_step(gsm8k(typer.echo), folder / "next_step.jsonl")
        include_path = str(write_task(folder / "tasks", rows).parent)
    data.update({t: FIXTURE_DATA[t] for t in names if t in FIXTURE_DATA and t not in data})
    model = str(smollm2(typer.echo)) if model == "smollm2" else model
    result = run_bench(model, names, data, limit, batch_size, device, dtype, attn_implementation, repeats,
                       echo=typer.echo, include_path=include_path)
    typer.echo(render(result))
    if out:
        write_json(out, result)
        typer.echo(f"wrote {out}")


def bench_stage3(
    model: str = typer.Option("smollm2", help="model folder or hub id; smollm2 = the fetched SmolLM2-135M-Instruct"),
    data: str = typer.Option(None, help="stage 3 rows (as ablate stage3 --data; 5% held out); default: the demo's "
                             "own rows for --seed, built once into the cache"),
    mask: str = typer.Option("causal,prefill_bidir", help="comma-separated training masks"),
    steps: int = typer.Option(DEMO.finetune_steps, help="optimizer steps per run (the demo's)"),
    repeats: int = typer.Option(2, help="runs of each, alternating (padded, packed, packed, padded, ...)"),
    batch_size: int = typer.Option(DEMO.batch_size, help="rows per optimizer step (the demo's)"),
    max_length: int = typer.Option(DEMO.max_length, help="tokens per row, prompt and response (the demo's)"),
    pack_length: int = typer.Option(None, help="tokens per packed sequence (default: as stage 3: the whole micro-batch under sdpa)"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"),
    attn_implementation: str = typer.Option("sdpa", help="sdpa, eager or flex_attention"),
    seed: int = typer.Option(0, help="the demo seed whose rows are used, and stage 3's seed"),
    out: Path = typer.Option(None, help="also write the figures as JSON here"),
):
    """Stage 3 on packed vs padded batches: the same rows, steps and seed; real tokens/s, padding, same losses."""
    from ablate.bench import render_stage3, run_stage3_bench
    from ablate.results.files import write_json
    from ablate.stages.config import check_runtime

    quiet_libraries()
    masks = tuple(m.strip() for m in mask.split(",") if m.strip())
    for name in masks:
        check_runtime(name, device, dtype, attn_implementation)
    if len(set(masks)) != len(masks):
        fail(f"--mask names a mask twice: {mask}")
    result = run_stage3_bench(model, data, masks, steps, repeats, batch_size, max_length, pack_length, device,
                              dtype, attn_implementation, seed, echo=typer.echo)
    typer.echo(render_stage3(result))
    if out:
        write_json(out, result)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command(epilog="Examples:\n\n  ablate demo\n\n  ablate demo --preset smoke --workdir /tmp/ablate-demo")(demo)
    app.command(epilog="Example:\n\n  ablate fetch")(fetch)
    app.command(epilog="Examples:\n\n  ablate bench\n\n  ablate bench --tasks hellaswag,piqa,arc_easy,arc_challenge,"
                "winogrande --limit 8")(bench)
    app.command("bench-stage3", epilog="Examples:\n\n  ablate bench-stage3 --steps 3\n\n  ablate bench-stage3 "
                "--mask prefill_bidir --pack-length 512 --out bench-stage3.json")(bench_stage3)
    app.command("tiny-model", epilog="Example:\n\n  ablate tiny-model --arch mistral3 --out /tmp/tiny-mistral3")(
        tiny_model)
