"""The `ablate` command line: parses flags, calls the stage functions, prints where results went.

    ablate --help
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ablate.console import fail as _fail
from ablate.console import quiet_libraries as _quiet_libraries
from ablate.console import refresh_status as _refresh_status
from ablate.errors import BadInput

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Staged attention-mask ablation studies on Hugging Face decoder LMs.",
)

EVAL_EPILOG_1 = """Example (offline, CPU):\n
  ablate tiny-model --out /tmp/tiny\n
  ablate stage1 --model /tmp/tiny --tasks ablate_tiny,piqa --task-data piqa=ablate/task_data/piqa.jsonl --device cpu\n
Study settings:\n
  ablate stage1 --model mistralai/Ministral-3-3B-Base-2512 --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande"""

EVAL_EPILOG_2 = """Example (offline, CPU):\n
  ablate stage2 --mask prefill_bidir --model /tmp/tiny --tasks ablate_tiny --device cpu\n
Study settings:\n
  ablate stage2 --mask prefill_bidir --model mistralai/Ministral-3-3B-Base-2512 --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande"""


def _eval_command(stage: str, flags: dict) -> None:
    from ablate.config import load_eval_config
    from ablate.evaluation import run_stage1, run_stage2

    _quiet_libraries()
    try:
        config = load_eval_config(stage, flags)
        run_dir = (run_stage1 if stage.startswith("stage1") else run_stage2)(config)
    except BadInput as exc:
        _fail(str(exc))
    finally:
        _refresh_status(flags.get("runs_dir"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    typer.echo(summary_table(metrics))
    if metrics["status"] == "gated":
        typer.echo(f"GATED: {(run_dir / 'status.txt').read_text().splitlines()[1]}")
    typer.echo(f"run directory: {run_dir}")


def summary_table(metrics: dict) -> str:
    baseline = metrics.get("baseline") or {}
    lines = [f"{metrics['stage']}  model={metrics['model']}  mask={metrics['mask']}"]
    header = f"{'task':<16}{'acc':>9}{'stderr':>9}{'chance':>8}{'n':>7}"
    if baseline.get("run"):
        header += f"{'stage1':>9}{'delta':>9}{'retention':>10}"
    lines.append(header)

    def fmt(x, width, digits=4):
        return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'n/a':>{width}}"

    rows = list(metrics["tasks"].items()) + [("macro", metrics["macro"])]
    for name, t in rows:
        line = f"{name:<16}{fmt(t['acc'], 9)}{fmt(t.get('acc_stderr'), 9)}{fmt(t['chance'], 8, 3)}"
        line += f"{t.get('n', ''):>7}"
        if baseline.get("run"):
            b = baseline["macro"] if name == "macro" else baseline["tasks"][name]
            line += f"{fmt(b['acc_baseline'], 9)}{fmt(b['delta'], 9)}{fmt(b['retention'], 10, 3)}"
        lines.append(line)
    if baseline and not baseline.get("run"):
        lines.append(f"no stage 1 comparison: {baseline['reason']}")
    return "\n".join(lines)


def _opt(name: str, help: str | None = None, cls_name: str = "EvalConfig"):
    """A stage option whose help text is the config field's own (ablate/config.py)."""
    from dataclasses import fields

    import ablate.config

    text = help or next(f.metadata["help"] for f in fields(getattr(ablate.config, cls_name)) if f.name == name)
    return typer.Option(None, help=text)


@app.command(epilog=EVAL_EPILOG_1)
def stage1(
    model: Optional[str] = _opt("model"),
    tasks: Optional[str] = _opt("tasks", "comma-separated lm-eval task names"),
    include_path: Optional[str] = _opt("include_path"),
    task_data: Optional[List[str]] = _opt("task_data"),
    limit: Optional[float] = _opt("limit"),
    num_fewshot: Optional[int] = _opt("num_fewshot"),
    batch_size: Optional[str] = _opt("batch_size"),
    max_length: Optional[int] = _opt("max_length"),
    device: Optional[str] = _opt("device"),
    dtype: Optional[str] = _opt("dtype"),
    attn_implementation: Optional[str] = _opt("attn_implementation"),
    seed: Optional[int] = _opt("seed"),
    runs_dir: Optional[str] = _opt("runs_dir"),
):
    """Stage 1: baseline lm-eval evaluation with the causal mask."""
    _eval_command("stage1_baseline_eval", dict(locals()))


@app.command(epilog=EVAL_EPILOG_2)
def stage2(
    mask: Optional[str] = _opt("mask", "mask over the prompt: prefill_bidir (default), full_bidir, causal"),
    model: Optional[str] = _opt("model"),
    tasks: Optional[str] = _opt("tasks", "comma-separated lm-eval task names"),
    include_path: Optional[str] = _opt("include_path"),
    task_data: Optional[List[str]] = _opt("task_data"),
    limit: Optional[float] = _opt("limit"),
    num_fewshot: Optional[int] = _opt("num_fewshot"),
    batch_size: Optional[str] = _opt("batch_size"),
    max_length: Optional[int] = _opt("max_length"),
    device: Optional[str] = _opt("device"),
    dtype: Optional[str] = _opt("dtype"),
    attn_implementation: Optional[str] = _opt("attn_implementation"),
    seed: Optional[int] = _opt("seed"),
    runs_dir: Optional[str] = _opt("runs_dir"),
    baseline: Optional[str] = _opt("baseline"),
    ignore_gate: Optional[bool] = typer.Option(None, "--ignore-gate", help="compare with a gated stage 1 run anyway"),
):
    """Stage 2: the same evaluation with the prompt read through an ablated mask, compared with stage 1."""
    _eval_command("stage2_ablation_eval", dict(locals()))


def _ft_opt(name: str, help: str | None = None):
    return _opt(name, help, "FinetuneConfig")


STAGE3_EPILOG = """Example (offline, CPU):\n
  ablate tiny-model --out /tmp/tiny\n
  ablate stage3 --mask prefill_bidir --model /tmp/tiny --data tests/data/sft.jsonl --max-steps 20 --device cpu\n
Study settings:\n
  ablate stage3 --mask prefill_bidir --model mistralai/Ministral-3-3B-Base-2512 --data <dataset> --max-steps 2000\n
  ablate stage3 --mask causal --model mistralai/Ministral-3-3B-Base-2512 --data <dataset> --max-steps 2000\n
Continue a killed run from its latest checkpoint:\n
  ablate stage3 --mask prefill_bidir --resume"""


@app.command(epilog=STAGE3_EPILOG)
def stage3(
    mask: Optional[str] = _ft_opt("mask"),
    model: Optional[str] = _ft_opt("model"),
    data: Optional[str] = _ft_opt("data"),
    prompt_field: Optional[str] = _ft_opt("prompt_field"),
    response_field: Optional[str] = _ft_opt("response_field"),
    text_field: Optional[str] = _ft_opt("text_field"),
    split_range: Optional[str] = _ft_opt("split_range"),
    eval_data: Optional[str] = _ft_opt("eval_data"),
    eval_fraction: Optional[float] = _ft_opt("eval_fraction"),
    max_length: Optional[int] = _ft_opt("max_length"),
    truncate_prompts: Optional[bool] = typer.Option(None, "--truncate-prompts", help="drop the first tokens of "
                                                    "prompts that do not fit (default: refuse)"),
    max_steps: Optional[int] = _ft_opt("max_steps"),
    learning_rate: Optional[float] = _ft_opt("learning_rate"),
    lr_scheduler: Optional[str] = _ft_opt("lr_scheduler"),
    warmup_steps: Optional[int] = _ft_opt("warmup_steps"),
    batch_size: Optional[int] = _ft_opt("batch_size"),
    gradient_accumulation_steps: Optional[int] = _ft_opt("gradient_accumulation_steps"),
    max_grad_norm: Optional[float] = _ft_opt("max_grad_norm"),
    logging_steps: Optional[int] = _ft_opt("logging_steps"),
    save_steps: Optional[int] = _ft_opt("save_steps"),
    eval_steps: Optional[int] = _ft_opt("eval_steps"),
    save_total_limit: Optional[int] = _ft_opt("save_total_limit"),
    spike_factor: Optional[float] = _ft_opt("spike_factor"),
    probe_samples: Optional[int] = _ft_opt("probe_samples"),
    lora_r: Optional[int] = _ft_opt("lora_r"),
    lora_alpha: Optional[int] = _ft_opt("lora_alpha"),
    lora_dropout: Optional[float] = _ft_opt("lora_dropout"),
    lora_target_modules: Optional[str] = _ft_opt("lora_target_modules"),
    allow_label_leakage: Optional[bool] = typer.Option(None, "--allow-label-leakage", help="diagnosis only: "
                                                       "train even when the mask leaks labels (marked leaky)"),
    device: Optional[str] = _ft_opt("device"),
    dtype: Optional[str] = _ft_opt("dtype"),
    attn_implementation: Optional[str] = _ft_opt("attn_implementation"),
    seed: Optional[int] = _ft_opt("seed"),
    runs_dir: Optional[str] = _ft_opt("runs_dir"),
    resume: bool = typer.Option(False, "--resume", help="continue the latest unfinished run of this mask "
                                "from its latest checkpoint, with its saved config"),
    run_dir: Optional[Path] = typer.Option(None, help="with --resume: the run directory to continue"),
):
    """Stage 3: finetune with the causal or prompt-bidirectional mask, loss on the response only."""
    from ablate.config import load_finetune_config

    _quiet_libraries()
    flags = dict(locals())
    for key in ("resume", "run_dir", "load_finetune_config"):
        flags.pop(key, None)
    try:
        from ablate.config import STAGE3_PREFIX
        from ablate.finetune import run_stage3
        from ablate.resume import find_resumable, resumable_run, saved_config

        if resume:
            # Only a failed or crashed run (of --mask, when given) is continued; anything else is refused untouched.
            ignored = sorted(k for k, v in flags.items() if v is not None and k not in ("mask", "runs_dir"))
            if ignored:
                raise BadInput("--resume continues a run with its saved config; drop "
                               + ", ".join("--" + k.replace("_", "-") for k in ignored))
            if run_dir:
                target = resumable_run(run_dir, STAGE3_PREFIX + (mask or ""))
            else:
                target = find_resumable(Path(runs_dir or "runs"), STAGE3_PREFIX + (mask or "prefill_bidir"))
            config = saved_config(target)
            runs_dir = config.runs_dir
            typer.echo(f"resuming {target} with its saved config")
            out = run_stage3(config, resume_dir=target)
        else:
            if run_dir:
                raise BadInput("--run-dir only goes with --resume")
            out = run_stage3(load_finetune_config(flags))
    except BadInput as exc:
        _fail(str(exc))
    finally:
        _refresh_status(runs_dir)
    summary = json.loads((out / "summary.json").read_text())
    if summary["leaky"]:
        typer.echo("LEAKY: this run trained with a mask that lets supervised positions see their labels")
    for key in ("status", "train_loss", "eval_loss", "train_steps_per_second", "global_step"):
        typer.echo(f"{key:<24}{summary[key]}")
    typer.echo(f"{'grad_norm last/max':<24}{summary['grad_norm']['last']} / {summary['grad_norm']['max']}")
    for when in ("before", "after"):
        p = summary["probe"][when]
        typer.echo(f"probe {when:<18}loss[{summary['mask']}]={p['loss_mask']:.4f}  loss[causal]={p['loss_causal']:.4f}")
    if summary["save"]:
        typer.echo(f"{'saved as':<24}{summary['save']['format']} in {summary['save']['path']}")
    typer.echo(f"run directory: {out}")


STAGE4_EPILOG = """Examples:\n
  ablate stage4                      # the latest completed stage 3 run of each mask\n
  ablate stage4 --checkpoint runs/stage3_finetune_prefill_bidir/20260214-201019 --also-causal"""


@app.command(epilog=STAGE4_EPILOG)
def stage4(
    checkpoint: Optional[List[str]] = typer.Option(None, help="stage 3 run directory (repeatable; default: the "
                                                   "latest completed run of each mask)"),
    mask: str = typer.Option("prefill_bidir", help="mask to evaluate the finetuned models with"),
    also_causal: bool = typer.Option(False, "--also-causal", help="also evaluate each model with the causal mask"),
    stage1_run: Optional[str] = typer.Option(None, help="stage 1 run to compare with (default: latest matching)"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16"),
    attn_implementation: str = typer.Option("sdpa", help="sdpa, eager or flex_attention"),
    batch_size: Optional[str] = typer.Option(None, help="batch size (default: stage 1's)"),
    runs_dir: str = typer.Option("runs", help="where runs are read and written"),
    ignore_gate: bool = typer.Option(False, "--ignore-gate", help="start from gated stage 1 or stage 3 runs anyway"),
):
    """Stage 4: evaluate the finetuned models with the ablated mask; recovery against stages 1 and 2."""
    from ablate.post_finetune import Stage4Config, run_stage4

    _quiet_libraries()
    try:
        out = run_stage4(Stage4Config(
            checkpoints=tuple(checkpoint or ()), mask=mask, also_causal=also_causal, stage1_run=stage1_run,
            device=device, dtype=dtype, attn_implementation=attn_implementation, batch_size=batch_size,
            runs_dir=runs_dir, ignore_gate=ignore_gate))
    except BadInput as exc:
        _fail(str(exc))
    finally:
        _refresh_status(runs_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    typer.echo(recovery_table(metrics))
    typer.echo(f"run directory: {out}")


def _num(x, digits=3):
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def _ci(pair):
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]" if pair else ""


def recovery_table(metrics: dict) -> str:
    lines = [f"stage 4 under {metrics['mask']}; stage 1: {metrics['stage1_run']}; "
             f"stage 2: {metrics['stage2_run'] or 'none (' + str(metrics['stage2_reason']) + ')'}"]
    for entry in metrics["checkpoints"]:
        lines.append(f"\n{entry['label']}{'  [LEAKY]' if entry['leaky'] else ''}")
        lines.append(f"{'task':<16}{'s1':>7}{'s2':>7}{'s4':>7}  {'retention':<22}{'gap_closed':<22}p(s4 vs s2)")
        rec = entry["recovery"]
        for name, r in [*rec["tasks"].items(), ("macro", rec["macro"])]:
            p = r["vs_stage2"]["p_value"] if r.get("vs_stage2") else None
            lines.append(f"{name:<16}{_num(r['acc_stage1']):>7}{_num(r['acc_stage2']):>7}{_num(r['acc_stage4']):>7}  "
                         f"{(_num(r['retention']) + ' ' + _ci(r['retention_ci95'])):<22}"
                         f"{(_num(r['gap_closed']) + ' ' + _ci(r['gap_closed_ci95'])):<22}{_num(p)}")
    return "\n".join(lines)


@app.command(epilog="Example:\n\n  ablate status --runs-dir runs")
def status(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Optional[Path] = typer.Option(None, help="where to write (default: STATUS.md beside the runs folder)"),
):
    """Regenerate STATUS.md from the run directories."""
    from ablate.status import write_status

    if not Path(runs_dir).is_dir():
        _fail(f"runs folder '{runs_dir}' does not exist")
    typer.echo(f"wrote {write_status(Path(runs_dir), out)}")


@app.command(epilog="Example:\n\n  ablate report --runs-dir runs --out docs/RESULTS.md")
def report(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Path = typer.Option(Path("docs/RESULTS.md"), help="the report to write; the plot goes beside it"),
):
    """Write the recovery report (markdown and a PNG plot) from the run directories."""
    from ablate.report import write_report

    if not Path(runs_dir).is_dir():
        _fail(f"runs folder '{runs_dir}' does not exist")
    typer.echo(f"wrote {write_report(Path(runs_dir), out)}")


@app.command(epilog="Example:\n\n  ablate aggregate --runs-dir runs --out runs/aggregate.json")
def aggregate(
    runs_dir: str = typer.Option("runs", help="the runs folder to read"),
    out: Optional[Path] = typer.Option(None, help="also write the aggregate as JSON here"),
):
    """Mean, standard deviation and n across seeds, per task and macro, for every stage."""
    from ablate.aggregate import aggregate as collect, render
    from ablate.rundir import write_json

    if not Path(runs_dir).is_dir():
        _fail(f"runs folder '{runs_dir}' does not exist")
    rows = collect(Path(runs_dir))
    typer.echo(render(rows))
    if out:
        write_json(out, rows)
        typer.echo(f"wrote {out}")


from ablate.remote_cli import remote_app  # noqa: E402

app.add_typer(remote_app, name="remote")


@app.command(epilog="Examples:\n\n  ablate demo\n\n  ablate demo --preset smoke --workdir /tmp/ablate-demo")
def demo(
    workdir: Path = typer.Option(Path("demo"), help="folder for the world, the model, runs/, the report and STATUS.md"),
    preset: str = typer.Option("full", help="full (the documented demo) or smoke (the test suite's small one)"),
    seed: int = typer.Option(0, help="seeds the world, the pretraining and every stage"),
):
    """Offline demo on CPU: a synthetic world, a tiny LM trained from scratch, all four stages, the report."""
    from ablate.demo import PRESETS, run_demo

    if preset not in PRESETS:
        _fail(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
    _quiet_libraries()
    try:
        out = run_demo(workdir, preset, seed, echo=typer.echo)
    except BadInput as exc:
        _fail(str(exc))
    for stage in ("stage1", "stage2", "stage4"):
        typer.echo("")
        metrics = json.loads((out[stage] / "metrics.json").read_text())
        typer.echo(summary_table(metrics) if stage != "stage4" else recovery_table(metrics))
    typer.echo("")
    for key in ("stage1", "stage2", "stage3_causal", "stage3_prefill_bidir", "stage4", "report", "plot", "status"):
        typer.echo(f"{key:<22}{out[key]}")
    typer.echo(f"demo finished in {out['seconds']:.0f} s")


@app.command(epilog="Example:\n\n  ablate masks")
def masks():
    """List the registered attention masks."""
    from ablate.masks import MASKS

    for spec in MASKS.values():
        flag = "  [leaks labels in training]" if spec.leaks_labels else ""
        typer.echo(f"{spec.name:<15}{spec.description}{flag}")


@app.command("tiny-model", epilog="Example:\n\n  ablate tiny-model --arch mistral3 --out /tmp/tiny-mistral3")
def tiny_model(
    out: Path = typer.Option(..., help="folder to write the model into (must not exist)"),
    arch: str = typer.Option("llama", help="llama, mistral, ministral3, qwen2, qwen3 or mistral3"),
    seed: int = typer.Option(0, help="initialisation seed"),
):
    """Build a tiny random model of a real architecture offline (for tests and smoke runs)."""
    from ablate.tiny import build_tiny_model

    _quiet_libraries()
    if out.exists():
        _fail(f"{out} already exists; choose a new folder")
    try:
        path = build_tiny_model(out, arch=arch, seed=seed)
    except BadInput as exc:
        _fail(str(exc))
    typer.echo(f"tiny {arch} model written to {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the one place that turns errors into exit codes and one-line messages.

    2: bad input or usage (an unknown flag, ``--limit abc``); 1: an unexpected error, shown as one line
    unless ``ABLATE_DEBUG=1``; 130 / 128+N: interrupted by Ctrl-C / terminated by signal N.
    """
    from ablate.rundir import Terminated

    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="ablate", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        return 0
    except UsageError as exc:
        message = " ".join(exc.format_message().split())
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        typer.echo(f"ablate: error: {message}{hint}", err=True)
        return 2
    except BadInput as exc:
        typer.echo(f"ablate: error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("ablate: interrupted", err=True)
        return 130
    except Terminated as exc:
        typer.echo(f"ablate: {exc}", err=True)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback unless asked for
        if os.environ.get("ABLATE_DEBUG") == "1":
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        typer.echo(f"ablate: error: {type(exc).__name__}: {first} (set ABLATE_DEBUG=1 for the traceback)", err=True)
        return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
