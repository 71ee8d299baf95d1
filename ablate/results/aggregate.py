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
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ablate.results import rundir
from ablate.results.rundir import STAGE1, STAGE2, STAGE4
from ablate.results.verified import verified_runs


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _summarise(label: dict, by_seed: dict[int, tuple[dict, dict]]) -> dict:
    """``by_seed``: seed -> (per-task metrics, macro metrics) of one run."""
    tasks = sorted(set().union(*(t.keys() for t, _ in by_seed.values())))
    return {**label, "seeds": sorted(by_seed),
            "tasks": {name: _stats([t[name]["acc"] for t, _ in by_seed.values() if name in t]) for name in tasks},
            "macro": _stats([m["acc"] for _, m in by_seed.values()])}


def _across_seeds(metrics: dict) -> dict:
    """The comparison record without the seed: runs that differ only by seed belong to one group."""
    return {k: v for k, v in (metrics.get("comparison") or {}).items() if k != "seed"}


# Stage 3 settings that decide where and how often a run logs or saves, not what it trains.
NOT_TRAINING = frozenset({"seed", "runs_dir", "device", "logging_steps", "save_steps", "save_total_limit", "gate",
                          "ignore_gate", "eval_steps", "probe_samples", "model", "config_file", "report_to"})


def _training(runs_dir: Path, entry: dict) -> tuple[dict, int | None] | None:
    """(the stage 3 run's training config minus its seed, base model by identity; its seed), or None."""
    checkpoint = Path(entry["checkpoint"])
    run = rundir.load_run(checkpoint) or rundir.load_run(Path(runs_dir) / checkpoint.parent.name / checkpoint.name)
    if run is None or not run.config:
        return None
    return {"base": (run.summary or {}).get("model_identity"),
            **{k: v for k, v in run.config.items() if k not in NOT_TRAINING}}, run.config.get("seed")


def aggregate(runs_dir: Path, damaged: list[str] | None = None, stages: dict | None = None) -> list[dict]:
    """Groups of runs that differ only by seed: same stage, mask and comparison record (stage 4: final models only,
    of the same stage 3 training config); a stage 4 entry whose stage 3 run cannot be read is left out. A completed run whose
    numbers do not verify is left out too, and said in ``damaged``. ``stages``: stage -> runs already verified
    (``ablate.results.status.collect``)."""
    groups: dict[str, tuple[dict, dict]] = {}
    damaged = [] if damaged is None else damaged

    def runs(stage):
        return stages[stage] if stages is not None else verified_runs(runs_dir, stage)

    def usable(runs):
        for run in runs:
            if run.status == rundir.COMPLETED and run.error:
                damaged.append(f"`{run.path}` has damaged results, not pooled: {run.error}")
            elif run.status == rundir.COMPLETED and run.metrics:
                yield run

    for stage in (STAGE1, STAGE2):
        for run in usable(runs(stage)):
            m = run.metrics
            label = {"stage": stage, "model": m["model"], "mask": m["mask"], "comparison": _across_seeds(m)}
            key = json.dumps({**label, "model": None}, sort_keys=True)  # the model by identity, not by path
            groups.setdefault(key, (label, {}))[1][m.get("seed")] = (m["tasks"], m["macro"])
    for run in usable(runs(STAGE4)):
        m = run.metrics
        for entry in m.get("checkpoints", []):
            if entry.get("scored") == "checkpoint":  # a checkpoint's score is not the finetune's result
                continue
            found = _training(runs_dir, entry)
            if found is None:
                continue
            training, seed = found
            label = {"stage": STAGE4, "train_mask": entry["train_mask"], "mask": m["mask"],
                     "comparison": _across_seeds(m), "training": training}
            key = json.dumps(label, sort_keys=True, default=str)
            groups.setdefault(key, (label, {}))[1][entry.get("train_seed", seed)] = (entry["tasks"], entry["macro"])
    return [_summarise(label, by_seed) for label, by_seed in groups.values()]


def render(rows: list[dict], damaged: list[str] = ()) -> str:
    lines = []
    for row in rows:
        who = row.get("model") or f"finetuned with {row.get('train_mask')}"
        lines.append(f"{row['stage']}  {who}  mask={row['mask']}  seeds={row['seeds']}")
        for name, s in [*row["tasks"].items(), ("macro", row["macro"])]:
            std = f"{s['std']:.4f}" if s["std"] is not None else "n/a"
            mean = f"{s['mean']:.4f}" if s["mean"] is not None else "n/a"
            lines.append(f"  {name:<16} mean {mean}  std {std}  n {s['n']}")
    lines += [f"not pooled: {line}" for line in damaged]
    return "\n".join(lines) if lines else "no completed evaluation runs"
