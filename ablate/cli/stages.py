"""`ablate stage1|stage2|stage3|stage4|study`: parse the flags (generated from the stage configs), run, print.

    ablate stage1 --help
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from ablate.cli.console import quiet_libraries, refresh_status
from ablate.cli.options import config_command
from ablate.cli.tables import recovery_table, summary_table
from ablate.errors import BadInput
from ablate.results.rundir import STAGE1, STAGE2, STAGE4
from ablate.stages.config import EvalConfig, FinetuneConfig, Stage4Config

EVAL_EPILOG_1 = """Example (offline, CPU):\n
  ablate tiny-model --out /tmp/tiny\n
  ablate stage1 --model /tmp/tiny --tasks ablate_tiny,piqa --task-data piqa=ablate/core/task_data/piqa.jsonl --device cpu\n
Study settings:\n
  ablate stage1 --model mistralai/Ministral-3-3B-Base-2512 --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande"""

EVAL_EPILOG_2 = """Example (offline, CPU):\n
  ablate stage2 --mask prefill_bidir --model /tmp/tiny --tasks ablate_tiny --device cpu\n
Study settings:\n
  ablate stage2 --mask prefill_bidir --model mistralai/Ministral-3-3B-Base-2512 --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande"""




def _eval_command(stage: str, flags: dict) -> None:
    from ablate.stages.config import load_eval_config
    from ablate.stages.stage1_baseline_eval import run_stage1
    from ablate.stages.stage2_ablation_eval import run_stage2

    quiet_libraries()
    config = load_eval_config(stage, flags)
    try:
        run_dir = (run_stage1 if stage == STAGE1 else run_stage2)(config)
    finally:
        refresh_status(config.runs_dir)
    if run_dir is None:  # a rank > 0 of `accelerate launch`: rank 0 writes and prints the run
        return
    metrics = json.loads((run_dir / "metrics.json").read_text())
    typer.echo(summary_table(metrics))
    if metrics["status"] == "gated":
        typer.echo(f"GATED: {(run_dir / 'status.txt').read_text().splitlines()[1]}")
    typer.echo(f"run directory: {run_dir}")


@config_command(EvalConfig, STAGE1, skip=("mask", "baseline", "ignore_gate"))
def stage1(flags):
    """Stage 1: baseline lm-eval evaluation with the causal mask."""
    _eval_command(STAGE1, flags)


@config_command(EvalConfig, STAGE2)
def stage2(flags):
    """Stage 2: the same evaluation with the prompt read through an ablated mask, compared with stage 1."""
    _eval_command(STAGE2, flags)


SWEEP_EPILOG = """Examples (offline, CPU):\n
  ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu\n
  ablate sweep --model /tmp/tiny --tasks ablate_tiny --device cpu --blocks 1 --layers all --plot sweep.png\n
  ablate sweep --model smollm2-folder --tasks gsm8k_next_step --blocks 5 --layers first:10 --layers last:10"""


@config_command(EvalConfig, STAGE2, skip=("mask_layers", "baseline"))
def sweep(flags,
          layers: List[str] = typer.Option(None, "--layers", help="a layer spec, as --mask-layers reads it "
                                           "(repeatable): 0-7, 0,2,4, first:4, last:4, all"),
          blocks: int = typer.Option(None, help="also each block of K consecutive layers in turn"),
          plot: Path = typer.Option(None, help="write the plot of each spec's accuracy change here (PNG)"),
          out: Path = typer.Option(None, help="also write the sweep's figures as JSON here")):
    """Stage 2 under several layer specs: the model loaded once, each spec a stage 2 run against one stage 1 run."""
    from ablate.results.files import write_json
    from ablate.stages.config import load_eval_config
    from ablate.stages.sweep import plot as draw, render, run_sweep

    quiet_libraries()
    config = load_eval_config(STAGE2, flags)
    try:
        result = run_sweep(config, list(layers or []), blocks, echo=typer.echo)
    finally:
        refresh_status(config.runs_dir)
    typer.echo(render(result))
    if plot:
        typer.echo(f"plot: {draw(result, plot)}")
    if out:
        write_json(out, result)
        typer.echo(f"figures: {out}")


STAGE3_EPILOG = """Example (offline, CPU):\n
  ablate tiny-model --out /tmp/tiny\n
  ablate stage3 --mask prefill_bidir --model /tmp/tiny --data tests/data/sft.jsonl --max-steps 20 --device cpu\n
GSM8K-style rows, in lm-eval's gsm8k prompt:\n
  ablate stage3 --data gsm8k.jsonl --prompt-template 'Question: {question}\\nAnswer:' --response-template ' {answer}'\n
Study settings:\n
  ablate stage3 --mask prefill_bidir --model mistralai/Ministral-3-3B-Base-2512 --data <dataset> --max-steps 2000\n
  ablate stage3 --mask causal --model mistralai/Ministral-3-3B-Base-2512 --data <dataset> --max-steps 2000\n
Continue a killed run from its latest checkpoint:\n
  ablate stage3 --mask prefill_bidir --resume"""



@config_command(FinetuneConfig, "stage3_finetune")
def stage3(
    flags,
    resume: bool = typer.Option(False, "--resume", help="continue the latest failed or crashed run of this mask "
                                "from its newest intact checkpoint, with its saved config"),
    run_dir: Path = typer.Option(None, help="with --resume: the run directory to continue"),
):
    """Stage 3: finetune with the causal or prompt-bidirectional mask, loss on the response only."""
    from ablate.stages.config import load_finetune_config
    from ablate.stages.stage3_finetune import run_stage3
    from ablate.stages.stage3_resume import decide

    quiet_libraries()
    mask, runs_dir = flags["mask"], flags["runs_dir"]
    try:
        if resume:
            # Only a failed or crashed run (of --mask, when given) is continued; anything else is refused untouched.
            ignored = sorted(k for k, v in flags.items()
                             if v is not None and k not in ("mask", "runs_dir", "config_file"))
            if ignored:
                raise BadInput("--resume continues a run with its saved config; drop "
                               + ", ".join("--" + k.replace("_", "-") for k in ignored))
            if flags.get("config_file"):  # with --resume a study file only says where its runs are
                from ablate.stages import study_file
                from ablate.stages.config import SECTIONS

                found = study_file.stage_values(study_file.read(flags["config_file"], SECTIONS)[0], "stage3",
                                                SECTIONS)
                mask, runs_dir = mask or found.get("mask"), runs_dir or found.get("runs_dir")
            plan = decide(mask, runs_dir or "runs", run_dir)
            runs_dir = plan.config.runs_dir
            typer.echo(f"resuming {plan.run_dir} with its saved config")
            out = run_stage3(plan.config, resume=plan)
        else:
            if run_dir:
                raise BadInput("--run-dir only goes with --resume")
            config = load_finetune_config(_read_escapes(flags))
            runs_dir = config.runs_dir
            out = run_stage3(config)
    finally:
        refresh_status(runs_dir)
    if out is None:  # a rank > 0 of torchrun / accelerate launch: rank 0 reports the run
        return
    typer.echo(stage3_summary(json.loads((out / "summary.json").read_text())))
    typer.echo(f"run directory: {out}")


def _shown(value, digits: int = 4) -> str:
    """A summary number as printed; a diverged run's null (a non-finite loss) prints as n/a, not a TypeError."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def stage3_summary(summary: dict) -> str:
    lines = ["LEAKY: this run trained with a mask that lets supervised positions see their labels"] \
        if summary.get("leaky") else []
    for key in ("status", "train_loss", "eval_loss", "train_steps_per_second", "global_step"):
        value = summary.get(key)
        lines.append(f"{key:<24}{value if isinstance(value, (str, int)) else _shown(value)}")
    grad = summary.get("grad_norm") or {}
    lines.append(f"{'grad_norm last/max':<24}{_shown(grad.get('last'))} / {_shown(grad.get('max'))}")
    for when in ("before", "after"):
        p = (summary.get("probe") or {}).get(when) or {}
        lines.append(f"probe {when:<18}loss[{summary.get('mask')}]={_shown(p.get('loss_mask'))}  "
                     f"loss[causal]={_shown(p.get('loss_causal'))}")
    if summary.get("diverged_reason"):
        lines.append(f"{'diverged because':<24}{summary['diverged_reason']}")
    if summary.get("save"):
        lines.append(f"{'saved as':<24}{summary['save'].get('format')} in {summary['save'].get('path')}")
    return "\n".join(lines)


def _read_escapes(flags: dict) -> dict:
    """A shell passes `\\n` as two characters: the template flags (and --segment-separator) read `\\n` and `\\t`
    as newline and tab.

    Only those two, so a template stays what was typed otherwise; the YAML has its own escapes.
    """
    templates = ("prompt_template", "response_template", "segment_separator")
    return {k: v.replace("\\n", "\n").replace("\\t", "\t") if k in templates and v is not None else v
            for k, v in flags.items()}


STAGE4_EPILOG = """Examples:\n
  ablate stage4                      # the latest completed stage 3 run of each mask\n
  ablate stage4 --checkpoint runs/stage3_finetune_prefill_bidir/20260214-201019 --also-causal\n
  ablate stage4 --checkpoint runs/stage3_finetune_prefill_bidir/20260214-201019/checkpoints/checkpoint-200\n
                                     # one checkpoint of a completed, diverged or failed run, recorded as such"""



@config_command(Stage4Config, STAGE4)
def stage4(flags):
    """Stage 4: evaluate the finetuned models with the ablated mask; recovery against stages 1 and 2."""
    from ablate.stages.config import load_stage4_config
    from ablate.stages.stage4_post_ft_eval import run_stage4

    quiet_libraries()
    config = load_stage4_config(flags)
    try:
        out = run_stage4(config)
    finally:
        refresh_status(config.runs_dir)
    if out is None:  # a rank > 0 of torchrun / accelerate launch: rank 0 reports the run
        return
    metrics = json.loads((out / "metrics.json").read_text())
    typer.echo(recovery_table(metrics))
    typer.echo(f"run directory: {out}")


STUDY_EPILOG = """A study file: the top level applies to every stage, a section per stage overrides it.\n
  model: HuggingFaceTB/SmolLM2-135M-Instruct\n
  tasks: [hellaswag, piqa]\n
  stage2: {mask: prefill_bidir}\n
  stage3: {data: train.jsonl, max_steps: 200}\n
  study: {masks: [causal, prefill_bidir]}\n
Run it again after a crash: completed stages are reused, a crashed finetune resumes."""


def study(config: Path = typer.Option(..., "--config", help="the study YAML (see `ablate stage1 --help` for fields)")):
    """The whole study from one file: stage 1, 2, 3 (each mask), 4, the report and STATUS.md; resumes where it stopped."""
    from ablate.stages.study import plan, run_study

    quiet_libraries()
    runs_dir = plan(config).stage1.runs_dir  # the file is read and every stage checked before anything runs
    try:
        out = run_study(config, say=typer.echo)
    finally:
        refresh_status(runs_dir)
    typer.echo(f"report: {out['report']}")
    typer.echo(f"status: {out['status']}")


def register(app: typer.Typer) -> None:
    app.command(epilog=EVAL_EPILOG_1)(stage1)
    app.command(epilog=EVAL_EPILOG_2)(stage2)
    app.command(epilog=STAGE3_EPILOG)(stage3)
    app.command(epilog=STAGE4_EPILOG)(stage4)
    app.command(epilog=STUDY_EPILOG)(study)
    app.command(epilog=SWEEP_EPILOG)(sweep)
