"""``STATUS.md``, generated from ``runs/`` alone (never edited by hand).

    ablate status --runs-dir runs

Every stage command refreshes it when it ends, completed or not. Each number
names the run it came from and is a verified one: metrics.json is a cache, and
every run is read through ``ablate.results.verified.verified_run``, which
recomputes its numbers from its samples (a stage 3 run's from its train log).
Runs that failed, diverged, were gated, trained leaky, left an unreadable
results file or a cache that disagrees with its samples are listed as blockers.
"""

from __future__ import annotations

import os
from pathlib import Path

from ablate.results import rundir
from ablate.results.environment import provenance
from ablate.results.finetuned import trained_with
from ablate.results.rundir import STAGE1, STAGE2, STAGE3_PREFIX, STAGE4
from ablate.results.verified import verified_runs

TRAIN_MASKS = ("causal", "prefill_bidir")



def mask_name(metrics: dict) -> str:
    """A run's mask with the layers it was applied in (``prefill_bidir in layers 0-7``); every layer: the name."""
    layers = metrics.get("mask_layers")
    if isinstance(layers, dict):
        return f"{metrics.get('mask')} in layers {layers.get('layers')} of {layers.get('num_layers')}"
    return str(metrics.get("mask"))

def number(x, digits=6) -> str:
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if isinstance(x, (int, float)) else "n/a"


def latest(runs: list[rundir.Run]) -> rundir.Run | None:
    """The newest completed run whose results can be read (a corrupted one is a blocker, not a result)."""
    done = [r for r in runs if r.status == rundir.COMPLETED and not r.error and r.results is not None]
    return done[-1] if done else None


DAMAGE = (KeyError, TypeError, ValueError, AttributeError, IndexError)  # a results file of the wrong shape


def guarded(render, run: rundir.Run, damaged: list[str], *args) -> list[str]:
    """``render(*args, run)``, or one line saying the run's results are damaged (and a blocker) if they are."""
    try:
        out = render(*args, run)
        return out if isinstance(out, list) else [out]
    except DAMAGE as exc:
        damaged.append(f"`{run.path}` has damaged results ({type(exc).__name__}: {exc}); they are not shown")
        return [f"- `{run.path}`: damaged results, not shown (see Blockers)"]


def ablation(runs: list[rundir.Run]) -> rundir.Run | None:
    """The stage 2 run the headline reports: the latest ablation; a causal control only when there is no other."""
    return latest([r for r in runs if (r.metrics or {}).get("mask") != "causal"]) or latest(runs)


def what_to_do(run: rundir.Run) -> str:
    if run.status == rundir.CRASHED and run.stage.startswith(STAGE3_PREFIX):
        return f"; resume it with `ablate stage3 --resume --run-dir {run.path}`"
    if run.status == rundir.CRASHED:
        return "; rerun the stage (its partial results are not used)"
    return ""


def collect(runs_dir: Path) -> dict:
    """Each stage's runs, oldest first, their results verified: a run whose cache disagrees has ``error`` set."""
    return {stage: verified_runs(runs_dir, stage)
            for stage in (STAGE1, STAGE2, *(STAGE3_PREFIX + mask for mask in TRAIN_MASKS), STAGE4)}


def blockers(stages: dict, runs_dir: Path | None = None) -> list[str]:
    out = []
    for stage in stages if runs_dir is not None else ():
        for copy, own in rundir.copies(rundir.find_runs(runs_dir, stage, with_copies=True)).items():
            out.append(f"`{copy}` holds another copy of the run in `{own}` (same uid): not used; "
                       "remove or move it out of the runs folder")
    for runs in stages.values():
        for run in runs:
            if run.error:
                out.append(f"`{run.path}` has damaged results, not used: {run.error}")
            elif run.status in rundir.USABLE and run.results is None:
                out.append(f"`{run.path}` is {run.status} but its results file is missing "
                           f"({'summary.json' if run.stage.startswith(STAGE3_PREFIX) else 'metrics.json'}); not used")
            if run.status not in (rundir.COMPLETED, rundir.RUNNING):
                out.append(f"`{run.path}` is **{run.status}**" + (f": {run.reason}" if run.reason else "")
                           + what_to_do(run))
            elif (run.metrics or {}).get("leaky"):
                out.append(f"`{run.path}` is **leaky**: evaluated under a mask that lets scored tokens see their own "
                           "future (--allow-label-leakage); its accuracy measures copying")
            elif run.summary and run.summary.get("leaky"):
                out.append(f"`{run.path}` is **leaky**: trained with a mask that lets supervised positions see "
                           "their labels; its losses mean nothing")
    return out


def key_results(run: rundir.Run) -> list[str]:
    base = run.metrics.get("baseline") or {}
    if not base.get("run"):
        return [f"- No stage 1 comparison for `{run.path}`: {base.get('reason', 'none recorded')}"]
    macro = base["macro"]
    # A generative task contributes its primary filter's exact match, not an accuracy: say so.
    exact = any(m != "acc" for m in run.metrics["macro"]["of"].values())
    label = "Macro score (accuracy; exact match for generative tasks)" if exact else "Macro accuracy"
    paired = base.get("paired") or {}

    def ci(p: dict | None) -> str:  # the paired 95% interval of the delta, where the run has one
        return f" [95% CI {p['delta_ci95'][0]:+.4f}, {p['delta_ci95'][1]:+.4f}]" if p else ""

    lines = [f"- {label}: `{number(macro['acc_baseline'])} -> {number(run.metrics['macro']['acc'])}` "
             f"(delta `{number(macro['delta'])}`{ci(paired.get('macro'))}, "
             f"retention `{number(macro['retention'], 3)}x`)"]
    for name, t in base["tasks"].items():
        metric = run.metrics["tasks"][name]["metric"]
        lines.append(f"- {name}{'' if metric == 'acc' else f' ({metric})'}: `{number(t['acc_baseline'])} -> "
                     f"{number(run.metrics['tasks'][name]['acc'])}` (delta `{number(t['delta'])}`"
                     f"{ci((paired.get('tasks') or {}).get(name))})")
    lines.append(f"- From `{base['run']}` (stage 1) and `{run.path}` (stage 2), mask `{mask_name(run.metrics)}`.")
    return lines


def stage3_line(mask: str, run: rundir.Run) -> str:
    if run.error:
        return f"- {mask}: `{run.path}`: status `{run.status}`, damaged results, not shown (see Blockers)"
    s = run.summary or {}
    probe = (s.get("probe") or {}).get("after") or {}
    save = s.get("save") or {}
    probe_text = (f"probe after `loss[{mask}]={number(probe.get('loss_mask'), 4)}` vs "
                  f"`loss[causal]={number(probe.get('loss_causal'), 4)}`, " if mask != "causal" else "")
    return (f"- {mask}: `{run.path}`: status `{run.status}`, `eval_loss={number(s.get('eval_loss'), 4)}`, "
            f"`train_loss={number(s.get('train_loss'), 4)}`, `train_steps_per_second={number(s.get('train_steps_per_second'), 3)}`, "
            f"grad norm max `{number((s.get('grad_norm') or {}).get('max'), 3)}`, {probe_text}"
            f"saved as `{save.get('format', 'n/a')}`" + (" **LEAKY**" if s.get("leaky") else ""))


def scored(entry: dict) -> str:
    """What a stage 4 entry scored, in words: a stage 3 run's final model, or a checkpoint of it, which is never
    shown as the finetuned model's result without saying so."""
    if entry["scored"] == "final":
        return f"finetuned with `{trained_with(entry)}` (`{entry['checkpoint']}`)"
    why = f": {entry['run_reason']}" if entry["run_reason"] else ""
    return (f"**checkpoint** at step {entry['step']} of the `{trained_with(entry)}` run `{entry['checkpoint']}` "
            f"(a {entry['run_status']} run{why}), not its final model")


def stage4_shown(runs: list[rundir.Run]) -> list[rundir.Run]:
    """The stage 4 runs shown: the latest completed one that scored a final model (the study's stage 4 result),
    and a newer one that scored checkpoints only, shown as such."""
    done = [r for r in runs if latest([r]) is not None]
    finals = [r for r in done if any(e.get("scored") == "final" for e in r.metrics.get("checkpoints") or [])]
    return finals[-1:] + [r for r in done[-1:] if r not in finals]


def stage4_lines(run: rundir.Run) -> list[str]:
    lines = []
    for entry in run.metrics.get("checkpoints", []):
        m = entry["recovery"]["macro"]

        def ci(key):
            pair = m.get(f"{key}_ci95")
            return f" [{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""

        lines.append(f"- {scored(entry)}, evaluated with `{mask_name(run.metrics)}`: macro `{number(m['acc_stage4'])}` vs "
                     f"stage 1 `{number(m['acc_stage1'])}`; retention `{number(m['retention'], 3)}`{ci('retention')}, "
                     f"gap closed `{number(m['gap_closed'], 3)}`{ci('gap_closed')} (95% bootstrap intervals)")
    only = all(e["scored"] == "checkpoint" for e in run.metrics.get("checkpoints", []))
    lines.append(f"- From `{run.path}`" + (" (checkpoints only: not the finetuned models' final results)." if only
                                           else "."))
    return lines


def render(runs_dir: Path, stages: dict | None = None) -> str:
    """STATUS.md's text; ``stages`` as ``collect`` gives (read again when not given)."""
    stages = stages if stages is not None else collect(runs_dir)
    s1, s2, shown4 = latest(stages[STAGE1]), ablation(stages[STAGE2]), stage4_shown(stages[STAGE4])
    s4 = next((r for r in shown4 if any(e.get("scored") == "final" for e in r.metrics["checkpoints"])), None)
    s3 = {mask: latest(stages[STAGE3_PREFIX + mask]) for mask in TRAIN_MASKS}
    last3 = {mask: (stages[STAGE3_PREFIX + mask] or [None])[-1] for mask in TRAIN_MASKS}
    has_recovery = bool(s4 and s4.metrics and s4.metrics.get("checkpoints"))
    checklist = [
        (s1 is not None, "Stage 1 baseline eval"),
        (s2 is not None, "Stage 2 ablated eval"),
        (s3["causal"] is not None, "Stage 3A causal finetune"),
        (s3["prefill_bidir"] is not None and not (s3["prefill_bidir"].summary or {}).get("leaky"),
         "Stage 3B prefill_bidir finetune (leakage-safe)"),
        (s4 is not None, "Stage 4 post-FT ablated eval"),
        (has_recovery, "Recovery ratio comparison vs Stage 1 baseline"),
    ]
    done = [name for ok, name in checklist if ok]
    todo = [name for ok, name in checklist if not ok]
    problems = blockers(stages, runs_dir)
    state = (f"{len(done)} of {len(checklist)} study steps are complete"
             + (f" ({', '.join(done)})" if done else "") + ". "
             + (f"Next: {todo[0]}." if todo else "The study is complete.")
             + (f" {len(problems)} blocker(s) below." if problems else ""))
    out = ["# Prefill Mask Ablation - Status", "",
           f"_Generated by `ablate status` from `{runs_dir}`; do not edit by hand._", "",
           "## Current State", state, "", "## Active Goals"]
    out += [f"- [{'x' if ok else ' '}] {name}" for ok, name in checklist]
    out += ["", "## Key Results (Stage 1 vs Stage 2" + (f", mask `{mask_name(s2.metrics)}`)" if s2 and s2.metrics
                                                       else ")")
            + (" **LEAKY**" if s2 and (s2.metrics or {}).get("leaky") else "")]
    damaged: list[str] = []
    out += (guarded(key_results, s2, damaged) if s2 and s2.metrics
            else ["- Not yet: needs completed stage 1 and stage 2 runs."])
    out += ["", "## Stage 3 Outcomes"]
    lines3 = [line for mask in TRAIN_MASKS if last3[mask] is not None
              for line in guarded(stage3_line, last3[mask], damaged, mask)]
    out += lines3 or ["- No stage 3 run yet."]
    out += ["", "## Stage 4 Recovery"]
    out += [line for run in shown4 for line in guarded(stage4_lines, run, damaged)] or ["- No stage 4 run yet."]
    problems += damaged
    out += ["", "## Artifacts"]
    artifacts = [(s1, "Stage 1 metrics", "metrics.json"), (s2, "Stage 2 metrics", "metrics.json"),
                 (s3["causal"], "Stage 3A summary", "summary.json"),
                 (s3["prefill_bidir"], "Stage 3B summary", "summary.json"), (s4, "Stage 4 metrics", "metrics.json"),
                 *((r, "Stage 4 checkpoint metrics", "metrics.json") for r in shown4 if r is not s4)]
    out += [f"- {label}: `{run.path / name}`" for run, label, name in artifacts if run is not None] or ["- None yet."]
    out += ["", "## Provenance"]
    out += [f"- `{run.path}`: {provenance(run.path)}" for run, _, _ in artifacts if run is not None] or ["- None yet."]
    out += ["", "## Blockers"]
    out += [f"- {p}" for p in problems] or ["- None active."]
    if damaged:  # the count in Current State includes them
        out[out.index(state)] = state.replace(f" {len(problems) - len(damaged)} blocker(s) below.", "") + \
            f" {len(problems)} blocker(s) below."
    out += ["", "## Next Steps"]
    commands = {
        "Stage 1 baseline eval": "`ablate stage1 --model <model> --tasks <tasks>`",
        "Stage 2 ablated eval": "`ablate stage2 --mask prefill_bidir` with stage 1's model and tasks",
        "Stage 3A causal finetune": "`ablate stage3 --mask causal --data <data>`",
        "Stage 3B prefill_bidir finetune (leakage-safe)": "`ablate stage3 --mask prefill_bidir --data <data>`",
        "Stage 4 post-FT ablated eval": "`ablate stage4`",
        "Recovery ratio comparison vs Stage 1 baseline": "`ablate stage4`, then `ablate report`",
    }
    out += [f"{i}. {name}: {commands[name]}" for i, name in enumerate(todo, 1)] or ["1. `ablate report`"]
    return "\n".join(out) + "\n"


def write_status(runs_dir: Path, out: Path | None = None) -> Path:
    # beside the runs folder as named: a symlinked runs folder must not put STATUS.md beside its target
    out = Path(out) if out else Path(os.path.abspath(runs_dir)).parent / "STATUS.md"
    rundir.write_text(out, render(Path(runs_dir)))
    return out
