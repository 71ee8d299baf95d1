"""The recovery report: ``docs/RESULTS.md`` and a plot, generated from ``runs/`` alone.

    ablate report --runs-dir runs --out docs/RESULTS.md

Stage 1 vs stage 2 per task, the stage 3 outcomes, stage 4 recovery per task
and macro with 95% bootstrap intervals and the paired test against stage 2, and
a PNG of per-task accuracy across the stages with chance marks (a leaky run's
bars hatched and labelled LEAKY). Every table names its runs. Every number is a
verified one: the runs are read through ``ablate.results.status.collect``, which
recomputes each from the samples (``ablate.results.verified``); a run whose
metrics.json disagrees is not shown. The output has no timestamps:
regenerating it gives the same file.
"""

from __future__ import annotations

from pathlib import Path

from ablate.results import rundir
from ablate.results.curves import plot_curves
from ablate.results.finetuned import trained_with
from ablate.results.environment import provenance
from ablate.results.rundir import STAGE1, STAGE2, STAGE3_PREFIX, STAGE4
from ablate.results.status import (DAMAGE, TRAIN_MASKS, ablation, collect, latest, mask_name, number,
                                   stage4_shown)


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "n/a"


def p_value(p: float | None) -> str:
    """A p-value to 4 places; one under 0.0001 says so instead of printing 0."""
    return "< 0.0001" if isinstance(p, (int, float)) and p < 1e-4 else number(p, 4)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def stage12_section(s1: rundir.Run | None, s2: rundir.Run | None) -> list[str]:
    out = ["## Stage 1 vs Stage 2", ""]
    if not (s1 and s2 and s2.metrics and (s2.metrics.get("baseline") or {}).get("run")):
        return out + ["No completed stage 2 run with a stage 1 comparison yet.", ""]
    m2 = s2.metrics
    rows = []
    paired = m2["baseline"].get("paired") or {}
    for name, t in [*m2["tasks"].items(), ("macro", m2["macro"])]:
        b = m2["baseline"]["macro"] if name == "macro" else m2["baseline"]["tasks"][name]
        p = paired.get("macro") if name == "macro" else (paired.get("tasks") or {}).get(name)
        metric = t["metric"] if name != "macro" else "acc"
        rows.append([name if metric == "acc" else f"{name} ({metric})", number(b["acc_baseline"]), number(t["acc"]),
                     f"{number(b['delta'])} {_ci(p['delta_ci95']) if p else ''}".strip(),
                     f"{p_value(p['mcnemar']['p_value'])} (+{p['mcnemar']['gained']}/-{p['mcnemar']['lost']})"
                     if p else "n/a", number(b["retention"], 3), number(t["chance"], 3),
                     str(t.get("n", ""))])  # the macro row has no n
    out += [f"Model `{m2['model']}`; stage 2 mask `{mask_name(m2)}`. Stage 1: `{m2['baseline']['run']}`; "
            f"stage 2: `{s2.path}`.", ""]
    out += ["**LEAKY**: stage 2 ran under a mask that lets scored tokens see their own future "
            "(--allow-label-leakage); its accuracy measures copying, not the model.", ""] if m2.get("leaky") else []
    out += _table(["task", "stage 1 acc", "stage 2 acc", "delta [95% CI]", "p (McNemar)", "retention", "chance", "n"],
                  rows)
    out += ["", "delta: stage 2 minus stage 1 on the same documents, with its 95% paired bootstrap interval "
                "(documents resampled; the macro resamples within each task); p: exact McNemar test, "
                "(+gained/-lost) documents."]
    out += ["", "acc is each task's primary metric: accuracy, or for a generative task the exact match of the "
                "filter named beside it."] if any(t["metric"] != "acc" for t in m2["tasks"].values()) else []
    return out + [""]


def stage3_section(stages: dict) -> list[str]:
    out = ["## Stage 3 finetunes", ""]
    rows = []
    for mask in TRAIN_MASKS:
        for run in stages[STAGE3_PREFIX + mask][-1:]:
            if run.error:
                rows.append([mask, f"`{run.path}`", f"{run.status}, damaged results, not shown"] + ["n/a"] * 7)
                continue
            s = run.summary or {}
            p = (s.get("probe") or {}).get("after") or {}
            status = run.status if isinstance(run.status, rundir.Status) else f"{run.status!r}: damaged status.txt"
            rows.append([mask, f"`{run.path}`", status + (" LEAKY" if s.get("leaky") else ""),
                         number(s.get("train_loss"), 4), number(s.get("eval_loss"), 4), number(s.get("train_steps_per_second"), 3),
                         number((s.get("grad_norm") or {}).get("max"), 3), number(p.get("loss_mask"), 4),
                         number(p.get("loss_causal"), 4), (s.get("save") or {}).get("format", "n/a")])
    if not rows:
        return out + ["No stage 3 run yet.", ""]
    out += _table(["mask", "run", "status", "train loss", "eval loss", "steps/s", "max grad norm",
                   "probe loss (mask)", "probe loss (causal)", "saved as"], rows)
    return out + ["", "Probe: response loss on held-out samples after training, same weights, under the "
                      "training mask and under the causal mask.", ""]


def stage4_section(shown: list[rundir.Run]) -> list[str]:
    """Each stage 4 run ``status.stage4_shown`` gives: the latest that scored final models, and a newer one of
    checkpoints only; a checkpoint is named as one, never as the finetuned model's result."""
    out = ["## Stage 4 recovery", ""]
    if not shown:
        return out + ["No stage 4 run yet.", ""]
    for s4 in shown:
        out += _stage4_run(s4)
    return out


def _what(entry: dict) -> str:
    """A scored model in a heading: ``finetuned with `causal```, or the checkpoint of a run of some status."""
    if entry["scored"] == "final":
        return f"Finetuned with `{trained_with(entry)}`"
    return f"Checkpoint at step {entry['step']} of a {entry['run_status']} `{trained_with(entry)}` run"


def _stage4_run(s4: rundir.Run) -> list[str]:
    m = s4.metrics
    only = all(e["scored"] == "checkpoint" for e in m["checkpoints"])
    out = [f"Evaluated with `{mask_name(m)}` in `{s4.path}`" + (" (checkpoints only: not the finetuned models' final "
                                                            "results)" if only else "")
           + f"; stage 1 `{m['stage1_run']}`; stage 2 "
           f"`{m['stage2_run'] or 'none: ' + str(m['stage2_reason'])}`. Intervals: 95% paired bootstrap over "
           "documents; p: exact McNemar test of stage 4 vs stage 2 on the same documents. A ratio is "
           "undefined (n/a) when its denominator is under 0.01 or its own 95% interval includes 0 "
           "(metrics.json says which, under `undefined`).", ""]
    for entry in m["checkpoints"]:
        if entry["scored"] == "final":
            what = f"Final model of `{entry['checkpoint']}` (saved as `{entry['save_format']}`)."
        else:
            why = f": {entry['run_reason']}" if entry["run_reason"] else ""
            what = (f"Checkpoint `{entry['model_dir']}` (step {entry['step']}) of `{entry['checkpoint']}`, a "
                    f"{entry['run_status']} run{why}. Not the run's final model.")
        out += [f"### {_what(entry)}" + (" (LEAKY)" if entry["leaky"] else ""), "", what, ""]
        rows = []
        rec = entry["recovery"]
        for name, r in [*rec["tasks"].items(), ("macro", rec["macro"])]:
            test = r.get("vs_stage2")
            rows.append([name, number(r["acc_stage1"], 4), number(r["acc_stage2"], 4), number(r["acc_stage4"], 4),
                         f"{number(r['retention'], 3)} {_ci(r['retention_ci95'])}",
                         f"{number(r['gap_closed'], 3)} {_ci(r['gap_closed_ci95'])}",
                         f"{number(r['above_chance_retention'], 3)} {_ci(r['above_chance_retention_ci95'])}",
                         f"{p_value(test['p_value'])} (+{test['gained']}/-{test['lost']})" if test else "n/a"])
        out += _table(["task", "stage 1", "stage 2", "stage 4", "retention", "gap closed",
                       "above-chance retention", "p vs stage 2"], rows)
        if entry.get("causal"):
            out += ["", f"Same model with the causal mask: macro acc {number(entry['causal']['macro']['acc'], 4)}."]
        out += [""]
    return out + head_to_head_section(m) + pairs_section(m)


def pairs_section(m: dict) -> list[str]:
    """Every two trainings against each other, when stage 4 scored more than the classic pair."""
    block = m.get("pairs") or {}
    found = block.get("pairs") or []
    if len(found) < 2:  # none, or the one pair the head-to-head above already shows
        return []
    out = [f"### Every two trainings, under `{mask_name(m)}`", "",
           "Macro accuracy of the second minus the first, on the same documents; p: exact McNemar; q: the p values "
           "adjusted over these pairs (Benjamini-Hochberg)." + (
               f" Left out (several models of one training): {', '.join(block['left_out'])}." if block.get("left_out")
               else ""), ""]
    rows = []
    for pair in found:
        r = pair["macro"]
        rows.append([f"`{pair['before_training']}`", f"`{pair['after_training']}`", number(r["before"], 4),
                     number(r["after"], 4), f"{number(r['delta'], 4)} {_ci(r['delta_ci95'])}",
                     f"{p_value(r['mcnemar']['p_value'])} (+{r['mcnemar']['gained']}/-{r['mcnemar']['lost']})",
                     p_value(r["mcnemar"]["q_value"])])
    return out + _table(["first", "second", "first acc", "second acc", "delta [95% CI]", "p (McNemar)", "q"],
                        rows) + [""]


def head_to_head_section(m: dict) -> list[str]:
    h = m.get("head_to_head")
    if not h:
        return []
    entries = {e["label"]: e for e in m["checkpoints"]}
    after, before = entries[h["after"]], entries[h["before"]]
    train = trained_with(after)
    out = [f"### {_what(after)} vs {_what(before)[0].lower() + _what(before)[1:]}, both under `{m['mask']}`", "",
           f"Same documents{', same budget' if after['scored'] == before['scored'] == 'final' else ''}: "
           f"`{h['after']}` against `{h['before']}`. Ratio: "
           f"{train}-finetuned accuracy / causal-finetuned accuracy; delta: their difference.", ""]
    rows = [[name, number(r["before"], 4), number(r["after"], 4), f"{number(r['delta'], 4)} {_ci(r['delta_ci95'])}",
             f"{number(r['ratio'], 3)} {_ci(r['ratio_ci95'])}",
             f"{p_value(r['mcnemar']['p_value'])} (+{r['mcnemar']['gained']}/-{r['mcnemar']['lost']})"]
            for name, r in [*h["tasks"].items(), ("macro", h["macro"])]]
    return out + _table(["task", "causal-finetuned", f"{train}-finetuned", "delta [95% CI]",
                         "ratio [95% CI]", "p (McNemar)"], rows) + [""]


def seeds_section(runs_dir: Path, stages: dict | None = None) -> list[str]:
    from ablate.results.aggregate import aggregate

    rows = [r for r in aggregate(runs_dir, stages=stages) if len(r["seeds"]) > 1]
    if not rows:
        return []
    out = ["## Across seeds", "", "Mean ± standard deviation (n seeds) of accuracy.", ""]
    for row in rows:
        who = f"`{row['model']}`" if row.get("model") else f"finetuned with `{row['train_mask']}`"
        out += [f"{row['stage']}, {who}, mask `{row['mask']}`, seeds {row['seeds']}:", ""]
        cells = [[name, f"{number(s['mean'], 4)} ± {number(s['std'], 4)} ({s['n']})"]
                 for name, s in [*row["tasks"].items(), ("macro", row["macro"])]]
        out += _table(["task", "accuracy"], cells) + [""]
    return out


def wilson(acc: float | None, n: int | None) -> tuple[float, float] | None:
    """95% Wilson interval of an accuracy over ``n`` documents (scipy's binomtest)."""
    from scipy.stats import binomtest

    if acc is None or not n:
        return None
    ci = binomtest(round(acc * n), n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


LEAKY = "LEAKY (hatched): its mask let scored or supervised tokens see their own future"


def plot(path: Path, s1, s2, s4s) -> list[str]:
    """Per-task accuracy across the stages (``s4s``: the stage 4 runs shown) with 95% intervals and chance marks,
    a leaky run's bars hatched and labelled, a checkpoint's named as one; the series' labels (empty when there
    is nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []  # (label, per-task metrics, leaky)
    if s1 and s1.metrics:
        series.append(("stage 1: causal", s1.metrics["tasks"], bool(s1.metrics.get("leaky"))))
    if s2 and s2.metrics:
        series.append((f"stage 2: {mask_name(s2.metrics)}", s2.metrics["tasks"], bool(s2.metrics.get("leaky"))))
    for s4 in s4s or []:
        for entry in s4.metrics["checkpoints"]:
            what = (f"finetuned {trained_with(entry)}" if entry["scored"] == "final" else
                    f"{trained_with(entry)} checkpoint, step {entry['step']} ({entry['run_status']} run)")
            series.append((f"stage 4: {what}, read {mask_name(s4.metrics)}", entry["tasks"], entry["leaky"]))
    series = [(label + (" (LEAKY)" if leaky else ""), per_task, leaky) for label, per_task, leaky in series]
    if not series:
        return []
    tasks = sorted(set().union(*(t.keys() for _, t, _ in series)))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(tasks)) + 3.2, 4.2))
    colors = plt.get_cmap("tab10").colors
    for i, (label, per_task, leaky) in enumerate(series):
        shown = [t for t in tasks if t in per_task]
        xs = [tasks.index(t) + (i - (len(series) - 1) / 2) * width for t in shown]
        accs = [per_task[t]["acc"] or 0.0 for t in shown]
        cis = [wilson(per_task[t]["acc"], per_task[t].get("n")) or (a, a) for t, a in zip(shown, accs)]
        err = [[a - lo for a, (lo, _) in zip(accs, cis)], [hi - a for a, (_, hi) in zip(accs, cis)]]
        ax.bar(xs, accs, width * 0.92, color=colors[i % len(colors)], label=label, hatch="//" if leaky else None,
               edgecolor="black" if leaky else None)
        ax.errorbar(xs, accs, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    chance = series[0][1]
    for j, t in enumerate(tasks):
        if t in chance and chance[t].get("chance") is not None:
            ax.hlines(chance[t]["chance"], j - 0.45, j + 0.45, colors="dimgray", linestyles="dashed", linewidth=1.2,
                      zorder=3, label="chance" if j == 0 else None)
    def name(t: str) -> str:
        first = chance.get(t) or {}
        what = "" if first.get("metric", "acc") == "acc" else ", exact match"
        return f"{t}\n(n={first['n']}{what})" if first.get("n") else t

    names = [name(t) for t in tasks]
    ax.set_xticks(range(len(tasks)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(leaky for _, _, leaky in series):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        labels.append(LEAKY.replace(": ", ":\n"))
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same runs, same bytes
    plt.close(fig)
    return [label for label, _, _ in series]


def damaged_section(stages: dict) -> list[str]:
    """One line per run whose results are unreadable or disagree with its samples: none of its numbers is shown."""
    rows = [f"- `{run.path}`: damaged results, not shown: {run.error}" for runs in stages.values() for run in runs
            if run.error]
    return ["## Not shown: damaged runs", "", *rows, ""] if rows else []


def provenance_section(named: list[tuple[str, rundir.Run | None]]) -> list[str]:
    rows = [f"- {label} `{run.path}`: {provenance(run.path)}" for label, run in named if run is not None]
    return ["## Provenance", "", *rows, ""] if rows else []


def write_report(runs_dir: Path, out: Path) -> Path:
    runs_dir, out = Path(runs_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out, render(runs_dir, out.with_name(out.stem + "_accuracy.png")))
    return out


def render(runs_dir: Path, image: Path | None, stages: dict | None = None) -> str:
    """The report's text, with its plot written to ``image`` (None: no plot); ``stages`` as ``collect`` gives."""
    stages = stages if stages is not None else collect(runs_dir)
    s1, s2, s4s = latest(stages[STAGE1]), ablation(stages[STAGE2]), stage4_shown(stages[STAGE4])
    lines = ["# Results", "", f"_Generated by `ablate report` from `{runs_dir}`; do not edit by hand._", ""]
    for section, args in ((stage12_section, (s1, s2)), (stage3_section, (stages,)), (stage4_section, (s4s,)),
                          (seeds_section, (runs_dir, stages))):
        try:
            lines += section(*args)
        except DAMAGE as exc:  # a results file of the wrong shape: said, never a traceback or a made-up number
            lines += [f"## {section.__name__.replace('_section', '').replace('_', ' ')}", "",
                      f"Not shown: a run's results are damaged ({type(exc).__name__}: {exc}); `ablate status` "
                      "lists it under Blockers.", ""]
    lines += damaged_section(stages)
    s3 = [(f"stage 3 ({mask})", (stages[STAGE3_PREFIX + mask] or [None])[-1]) for mask in TRAIN_MASKS]
    lines += provenance_section([("stage 1", s1), ("stage 2", s2), *s3, *(("stage 4", s4) for s4 in s4s)])
    try:
        plotted = plot(image, s1, s2, s4s) if image is not None else []
    except DAMAGE:
        plotted = []
    if plotted:
        lines += ["## Accuracy across the stages", "", f"![per-task accuracy]({image.name})", "",
                  "Error bars: 95% Wilson intervals of each accuracy over its documents. Dashed lines: chance "
                  "(mean of 1 / number of choices over each task's documents; 0 for exact match)."
                  + (f" {LEAKY}." if any("(LEAKY)" in label for label in plotted) else ""), ""]
    curves = plot_curves(runs_dir, image.with_name(image.name.replace("_accuracy", "_curves"))) if image else []
    if curves:
        lines += ["## Stage 3 training curves", "", f"![training curves]({image.name.replace('_accuracy', '_curves')})",
                  "", f"Train loss, held-out eval loss and grad norm (log scale) against optimizer steps, from each "
                  f"run's train_log.jsonl: {', '.join(curves)}.", ""]
    return "\n".join(lines)
