"""Seeds aggregated: mean, standard deviation and n across seeds, per task and macro.

    ablate aggregate --runs-dir runs

Runs are grouped by stage, mask and comparison record minus the seed (model
identity, dtype, attention, each task as lm-eval resolved it, its files,
settings): only runs that differ by seed are pooled. Within a group the newest
completed run of each seed counts once. Stage 4 also groups by the stage 3
training config minus its seed, so finetunes of other steps or learning rates
are never pooled as seeds. Each run's numbers are verified against its samples
first (``ablate.results.verified.verified_run``); a run whose metrics.json
disagrees is not pooled and is named as damaged.

Besides accuracy, a group pools the study's two paired comparisons, each
seed's with its interval: stage 2 minus stage 1 (``baseline.macro``) and stage
4's head-to-head (the mask-finetuned model minus the causal-finetuned one,
both read with stage 4's mask).

``across_data`` (``ablate aggregate --across-data``) also pools runs whose
documents differ, each seed having drawn its own from one population (``ablate
demo --seed N``): tasks must agree on everything lm-eval resolved except their
files and documents, with the same number of documents, and stage 3 on every
setting except its data files. The pooled spread is then over data draws as
well as seeds; the output says so.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ablate.results import rundir
from ablate.results.finetuned import trained_with
from ablate.results.rundir import STAGE1, STAGE2, STAGE4
from ablate.results.verified import verified_runs


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _order(seed) -> tuple:
    """Seeds in order: numbers first, by value; then anything else (None, ``"1/2"``) by its text."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def _paired(by_seed: dict[int, dict]) -> dict:
    """Per-seed paired differences (``recovery.paired_difference`` blocks) pooled: mean/std/n of the macro delta,
    per task, and each seed's delta with its interval and whether the interval excludes 0 (its verdict)."""
    tasks = sorted(set().union(*(b["tasks"].keys() for b in by_seed.values())))
    return {"tasks": {name: _stats([b["tasks"][name]["delta"] for b in by_seed.values() if name in b["tasks"]])
                      for name in tasks},
            "macro": _stats([b["macro"]["delta"] for b in by_seed.values()]),
            "per_seed": {seed: {"delta": b["macro"]["delta"], "delta_ci95": b["macro"].get("delta_ci95"),
                                "delta_excludes_0": b["macro"].get("delta_excludes_0"),
                                "mcnemar_p": (b["macro"].get("mcnemar") or {}).get("p_value")}
                         for seed, b in sorted(by_seed.items(), key=lambda kv: _order(kv[0]))}}


def _summarise(label: dict, by_seed: dict[int, tuple[dict, dict]], paired: dict[int, dict]) -> dict:
    """``by_seed``: seed -> (per-task metrics, macro metrics) of one run; ``paired``: seed -> its paired block."""
    tasks = sorted(set().union(*(t.keys() for t, _ in by_seed.values())))
    out = {**label, "seeds": sorted(by_seed, key=_order),
           "tasks": {name: _stats([t[name]["acc"] for t, _ in by_seed.values() if name in t]) for name in tasks},
           "macro": _stats([m["acc"] for _, m in by_seed.values()]),
           "per_seed": {seed: m["acc"] for seed, (_, m) in sorted(by_seed.items(), key=lambda kv: _order(kv[0]))}}
    if paired:
        out["paired"] = {"what": PAIRED[label["stage"]], **_paired(paired)}
    return out


PAIRED = {STAGE2: "stage 2 minus stage 1, same documents",
          STAGE4: "head-to-head: the mask-finetuned model minus the causal-finetuned one, both read with this mask"}


def _across_seeds(metrics: dict, across_data: bool = False) -> dict:
    """The comparison record without the seed: runs that differ only by seed belong to one group. ``across_data``:
    without each task's files and documents either, but with its number of documents."""
    record = {k: v for k, v in (metrics.get("comparison") or {}).items() if k != "seed"}
    if across_data and isinstance(record.get("tasks"), dict):
        n = {name: (t or {}).get("n") for name, t in (metrics.get("tasks") or {}).items()}
        record["tasks"] = {name: {**{k: v for k, v in (t or {}).items() if k not in DRAWN}, "n": n.get(name)}
                           for name, t in record["tasks"].items()}
    return record


# Settings that say where values came from, where a run lives or where else its logs go: never what it computes.
PROVENANCE = frozenset({"config_file", "runs_dir", "report_to"})
DRAWN = ("files", "docs_sha256")  # what differs between two draws of one task's documents
# Stage 3 settings that decide where and how often a run logs or saves, not what it trains.
NOT_TRAINING = frozenset(PROVENANCE | {"seed", "device", "logging_steps", "save_steps", "save_total_limit", "gate",
                             "ignore_gate", "eval_steps", "probe_samples", "model"})
TRAINING_DATA = frozenset({"data", "eval_data"})  # the files a data draw changes


def _training(runs_dir: Path, entry: dict, across_data: bool = False) -> tuple[dict, int | None] | None:
    """(the stage 3 run's training config minus its seed, base model by identity; its seed), or None."""
    checkpoint = Path(entry["checkpoint"])
    run = rundir.load_run(checkpoint) or rundir.load_run(Path(runs_dir) / checkpoint.parent.name / checkpoint.name)
    if run is None or not run.config:
        return None
    skip = NOT_TRAINING | (TRAINING_DATA if across_data else frozenset())
    return {"base": (run.summary or {}).get("model_identity"),
            **{k: v for k, v in run.config.items() if k not in skip}}, run.config.get("seed")


def aggregate(runs_dir: Path, damaged: list[str] | None = None, stages: dict | None = None,
              across_data: bool = False) -> list[dict]:
    """Groups of runs that differ only by seed: same stage, mask and comparison record (stage 4: final models only,
    of the same stage 3 training config); a stage 4 entry whose stage 3 run cannot be read is left out. A completed run whose
    numbers do not verify is left out too, and said in ``damaged``. ``stages``: stage -> runs already verified
    (``ablate.results.status.collect``). ``across_data``: documents may differ too (see the module's text)."""
    groups: dict[str, tuple[dict, dict, dict]] = {}
    damaged = [] if damaged is None else damaged

    def runs(stage):
        return stages[stage] if stages is not None else verified_runs(runs_dir, stage)

    def usable(runs):
        for run in runs:
            if run.status == rundir.COMPLETED and run.error:
                damaged.append(f"`{run.path}` has damaged results, not pooled: {run.error}")
            elif run.status == rundir.COMPLETED and run.metrics:
                yield run

    def add(label: dict, key: str, seed, result: tuple[dict, dict], paired: dict | None = None):
        _, by_seed, by_seed_paired = groups.setdefault(key, (label, {}, {}))
        by_seed[seed] = result
        if paired:
            by_seed_paired[seed] = paired

    extra = {"across_data": True} if across_data else {}
    for stage in (STAGE1, STAGE2):
        for run in usable(runs(stage)):
            m = run.metrics
            label = {"stage": stage, "model": m["model"], "mask": m["mask"], "mask_layers": m.get("mask_layers"),
                     "comparison": _across_seeds(m, across_data), **extra}
            key = json.dumps({**label, "model": None}, sort_keys=True)  # the model by identity, not by path
            add(label, key, m.get("seed"), (m["tasks"], m["macro"]), (m.get("baseline") or {}).get("paired"))
    for run in usable(runs(STAGE4)):
        m = run.metrics
        trained, seeds = {}, {}
        for entry in m.get("checkpoints", []):
            if entry.get("scored") == "checkpoint":  # a checkpoint's score is not the finetune's result
                continue
            found = _training(runs_dir, entry, across_data)
            if found is None:
                continue
            training, seed = found
            trained[entry.get("label")] = training
            seeds[entry.get("label")] = entry.get("train_seed", seed)
            label = {"stage": STAGE4, "train_mask": trained_with(entry), "mask": m["mask"],
                     "mask_layers": m.get("mask_layers"), "comparison": _across_seeds(m, across_data),
                     "training": training, **extra}
            add(label, json.dumps(label, sort_keys=True, default=str), entry.get("train_seed", seed),
                (entry["tasks"], entry["macro"]))
        h = m.get("head_to_head")
        if h and h.get("before") in trained and h.get("after") in trained:
            # Pooled with head-to-heads of the same two trainings (minus their seed) under the same record.
            label = {"stage": STAGE4, "head_to_head": True, "mask": m["mask"], "mask_layers": m.get("mask_layers"),
                     "comparison": _across_seeds(m, across_data),
                     "training": {"before": trained[h["before"]], "after": trained[h["after"]]}, **extra}
            a, b = seeds[h["before"]], seeds[h["after"]]
            seed = a if a == b else f"{a}/{b}"  # two finetunes of one seed, as stage 4 pairs them
            add(label, json.dumps(label, sort_keys=True, default=str), seed,
                ({t: {"acc": b["delta"]} for t, b in h["tasks"].items()}, {"acc": h["macro"]["delta"]}), h)
    return [_summarise(label, by_seed, paired) for label, by_seed, paired in groups.values()]


def render(rows: list[dict], damaged: list[str] = ()) -> str:
    def stat(name, s, what="mean"):
        std = f"{s['std']:.4f}" if s["std"] is not None else "n/a"
        mean = f"{s['mean']:+.4f}" if what == "delta" and s["mean"] is not None else \
            f"{s['mean']:.4f}" if s["mean"] is not None else "n/a"
        return f"  {name:<16} {what} {mean}  std {std}  n {s['n']}"

    lines = []
    for row in rows:
        drawn = "  (documents differ by seed: pooled across data draws)" if row.get("across_data") else ""
        if row.get("head_to_head"):
            lines.append(f"{row['stage']}  head-to-head  mask={row['mask']}  seeds={row['seeds']}{drawn}")
        else:
            who = row.get("model") or f"finetuned with {row.get('train_mask')}"
            lines.append(f"{row['stage']}  {who}  mask={row['mask']}  seeds={row['seeds']}{drawn}")
            lines += [stat(name, s) for name, s in [*row["tasks"].items(), ("macro", row["macro"])]]
        paired = row.get("paired")
        if paired:
            lines.append(f"  {paired['what']}:")
            lines += [stat(name, s, "delta") for name, s in [*paired["tasks"].items(), ("macro", paired["macro"])]]
            for seed, p in paired["per_seed"].items():
                lo, hi = p.get("delta_ci95") or (None, None)
                ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else ""
                verdict = "excludes 0" if p.get("delta_excludes_0") else "includes 0"
                pv = f", McNemar p {p['mcnemar_p']:.2g}" if p.get("mcnemar_p") is not None else ""
                lines.append(f"    seed {seed}: {p['delta']:+.3f}{ci} ({verdict}{pv})")
    lines += [f"not pooled: {line}" for line in damaged]
    return "\n".join(lines) if lines else "no completed evaluation runs"
