"""Recovery arithmetic: how much of what stage 2 removed did a finetune bring back?

    python -m pytest tests/test_recovery.py -q

With s1 (baseline, causal), s2 (ablated, before finetuning) and s4 (ablated,
after finetuning) on the same documents:

    retention              = s4 / s1
    gap_closed             = (s4 - s2) / (s1 - s2)
    above_chance_retention = (s4 - chance) / (s1 - chance)

A ratio is undefined (None, with the reason in ``undefined``), never a huge
number, when its denominator is under ``MIN_DENOMINATOR`` or is not
established: its own 95% bootstrap interval includes zero (a stage 1 vs stage 2
gap of one document is noise, and noise divided by noise is any number).
Intervals are paired percentile bootstraps over documents (the same resampled
documents for every stage); the paired test of stage 4 against stage 2 is an
exact McNemar test on per-document correctness.

The blocks a run's metrics.json caches are built here from per-document
correctness, by the stage that writes them and by every reader that shows them
(``ablate.results.verified.verified_metrics``): stage 2's ``baseline``
(``baseline_block``), stage 4's ``recovery`` (``recovery_block``) and
``head_to_head``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ablate.errors import BadInput
from ablate.results.samples import accuracy

log = logging.getLogger(__name__)

MIN_DENOMINATOR = 0.01  # one accuracy point
BOOTSTRAP = 2000
LEVEL = 0.95


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if abs(denominator) >= MIN_DENOMINATOR else None


def ratios(s1: float, s2: float | None, s4: float, chance: float) -> dict:
    return {
        "retention": ratio(s4, s1),
        "gap_closed": ratio(s4 - s2, s1 - s2) if s2 is not None else None,
        "above_chance_retention": ratio(s4 - chance, s1 - chance),
    }


def mcnemar(before: np.ndarray, after: np.ndarray) -> dict:
    """Exact two-sided McNemar test on paired 0/1 outcomes."""
    b = int(np.sum(before & ~after))  # right before, wrong after
    c = int(np.sum(~before & after))  # wrong before, right after
    n = b + c
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
        p = min(1.0, 2 * tail)
    return {"lost": b, "gained": c, "p_value": p}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    # When most resamples have an undefined ratio the interval would describe a biased subset.
    if len(values) < BOOTSTRAP * 0.9:
        return None
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def _denominators(s1, s2, chance) -> dict:
    return {"retention": s1, "gap_closed": (s1 - s2) if s2 is not None else None,
            "above_chance_retention": s1 - chance}


def _why_undefined(point: float | None, boot: np.ndarray | None) -> str | None:
    if point is None or boot is None:
        return "no stage 2 run to compare with"
    if abs(point) < MIN_DENOMINATOR:
        return f"denominator {point:.4f} is under {MIN_DENOMINATOR}"
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    if lo <= 0 <= hi:
        return f"denominator {point:.4f} is not established (its 95% interval [{lo:.4f}, {hi:.4f}] includes 0)"
    return None


def _fill(out: dict, point: dict, boot: dict, den_point: dict, den_boot: dict) -> None:
    out["undefined"] = {}
    for key, value in point.items():
        why = _why_undefined(den_point[key], den_boot[key])
        if why:
            out["undefined"][key] = why
            value = None
        out[key] = value
        out[f"{key}_ci95"] = _interval(boot[key]) if value is not None else None


def _boot_ratios(s1: np.ndarray, s2: np.ndarray | None, s4: np.ndarray, chance) -> dict:
    """Vectorised ratios over bootstrap replicates (NaN where undefined)."""
    def safe(num, den):
        out = np.full_like(num, np.nan, dtype=float)
        ok = np.abs(den) >= MIN_DENOMINATOR
        out[ok] = num[ok] / den[ok]
        return out

    return {
        "retention": safe(s4, s1),
        "gap_closed": safe(s4 - s2, s1 - s2) if s2 is not None else None,
        "above_chance_retention": safe(s4 - chance, s1 - chance),
    }


def task_recovery(c1: np.ndarray, c2: np.ndarray | None, c4: np.ndarray, chance: float, seed: int = 0) -> dict:
    """Per-task recovery from per-document correctness arrays aligned on the same documents."""
    c1, c4 = c1.astype(bool), c4.astype(bool)
    c2 = c2.astype(bool) if c2 is not None else None
    n = len(c1)
    s1, s4 = float(c1.mean()), float(c4.mean())
    s2 = float(c2.mean()) if c2 is not None else None
    point = ratios(s1, s2, s4, chance)
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    b1, b4 = c1[idx].mean(1), c4[idx].mean(1)
    b2 = c2[idx].mean(1) if c2 is not None else None
    out = {"n": n, "acc_stage1": s1, "acc_stage2": s2, "acc_stage4": s4, "chance": chance}
    _fill(out, point, _boot_ratios(b1, b2, b4, chance), _denominators(s1, s2, chance), _denominators(b1, b2, chance))
    out["vs_stage2"] = mcnemar(c2, c4) if c2 is not None else None
    return out


def macro_recovery(per_task: dict[str, dict], correct: dict[str, tuple], seed: int = 0) -> dict:
    """Macro (mean over tasks) recovery; the bootstrap resamples documents within each task."""
    names = sorted(per_task)
    rng = np.random.default_rng(seed)
    s = {k: float(np.mean([per_task[t][f"acc_stage{k}"] for t in names])) if all(
        per_task[t][f"acc_stage{k}"] is not None for t in names) else None for k in (1, 2, 4)}
    chance = float(np.mean([per_task[t]["chance"] for t in names]))
    point = ratios(s[1], s[2], s[4], chance)
    has_s2 = s[2] is not None
    boots = {k: np.zeros(BOOTSTRAP) for k in (1, 2, 4)}
    for t in names:
        c1, c2, c4 = correct[t]
        idx = rng.integers(0, len(c1), size=(BOOTSTRAP, len(c1)))
        boots[1] += c1.astype(bool)[idx].mean(1) / len(names)
        boots[4] += c4.astype(bool)[idx].mean(1) / len(names)
        if has_s2:
            boots[2] += c2.astype(bool)[idx].mean(1) / len(names)
    b2 = boots[2] if has_s2 else None
    boot = _boot_ratios(boots[1], b2, boots[4], chance)
    out = {"acc_stage1": s[1], "acc_stage2": s[2], "acc_stage4": s[4], "chance": chance, "n_tasks": len(names)}
    _fill(out, point, boot, _denominators(s[1], s[2], chance), _denominators(boots[1], b2, chance))
    if has_s2:
        pooled_before = np.concatenate([correct[t][1].astype(bool) for t in names])
        pooled_after = np.concatenate([correct[t][2].astype(bool) for t in names])
        out["vs_stage2"] = mcnemar(pooled_before, pooled_after)
    else:
        out["vs_stage2"] = None
    return out


def paired_difference(before: dict[str, np.ndarray], after: dict[str, np.ndarray], seed: int = 0) -> dict:
    """``after - before`` per task and macro (mean over tasks), on the same documents, with paired intervals.

    ``before[task]`` and ``after[task]`` are per-document correctness aligned on the same documents (stage 1
    and stage 2; or two finetuned models under one mask). Per task and macro: both accuracies, the
    difference with its 95% paired percentile bootstrap interval (documents resampled within each task, the
    same documents for both sides), the ratio ``after / before`` with its interval (undefined under
    ``MIN_DENOMINATOR``) and the exact McNemar test (pooled over tasks for the macro).
    """
    names = sorted(before)
    rng = np.random.default_rng(seed)
    boot_before, boot_after = np.zeros(BOOTSTRAP), np.zeros(BOOTSTRAP)
    out: dict = {"tasks": {}}
    for name in names:
        b, a = before[name].astype(bool), after[name].astype(bool)
        if len(b) != len(a) or len(b) == 0:
            raise ValueError(f"task {name}: {len(b)} and {len(a)} documents; a paired comparison needs the same ones")
        idx = rng.integers(0, len(b), size=(BOOTSTRAP, len(b)))
        bb, ba = b[idx].mean(1), a[idx].mean(1)
        boot_before += bb / len(names)
        boot_after += ba / len(names)
        out["tasks"][name] = _difference(float(b.mean()), float(a.mean()), bb, ba, mcnemar(b, a), len(b))
    pooled = mcnemar(np.concatenate([before[t].astype(bool) for t in names]),
                     np.concatenate([after[t].astype(bool) for t in names]))
    out["macro"] = _difference(float(np.mean([out["tasks"][t]["before"] for t in names])),
                               float(np.mean([out["tasks"][t]["after"] for t in names])),
                               boot_before, boot_after, pooled, sum(len(before[t]) for t in names))
    return out


def _difference(before: float, after: float, boot_before: np.ndarray, boot_after: np.ndarray, test: dict,
                n: int) -> dict:
    delta = after - before
    lo, hi = np.quantile(boot_after - boot_before, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    ok = np.abs(boot_before) >= MIN_DENOMINATOR
    boot_ratio = np.where(ok, boot_after / np.where(ok, boot_before, 1.0), np.nan)
    value = ratio(after, before)
    return {"n": n, "before": before, "after": after, "delta": delta, "delta_ci95": [float(lo), float(hi)],
            # the interval excludes 0: the difference is established at the 95% level
            "delta_excludes_0": bool(lo > 0 or hi < 0),
            "ratio": value, "ratio_ci95": _interval(boot_ratio) if value is not None else None,
            "mcnemar": test}


# ---------------------------------------------------------------- the blocks metrics.json caches

def baseline_block(metrics: dict, baseline: dict, rows: dict | None = None) -> dict:
    """Stage 2's ``baseline``: per-task and macro delta and retention against the stage 1 run, or why there is none.

    ``baseline`` is ``{"run", "correct"}`` (``correct``: ``ablate.results.samples.verified_samples`` of the stage
    1 run, whose numbers are recomputed from it) or ``{"reason"}``. With this run's per-document ``rows``, each
    delta gets its paired 95% bootstrap interval and an exact McNemar test against stage 1's samples of the same
    documents (``paired_block``).
    """
    run = baseline.get("run")
    if run is None:
        log.warning("no stage 1 baseline: %s", baseline["reason"])
        return {"run": None, "reason": baseline["reason"]}
    before = accuracy(baseline["correct"])

    def delta(now, before):
        if now is None or before is None:
            return {"acc_baseline": before, "delta": None, "retention": None}
        # Retention is undefined when the baseline is 0; never report a huge or infinite ratio.
        return {"acc_baseline": before, "delta": now - before,
                "retention": now / before if before > 0 else None}

    out = {
        "run": str(run.path),
        "run_id": run.run_id,
        "tasks": {name: delta(t["acc"], before["tasks"].get(name)) for name, t in metrics["tasks"].items()},
        "macro": delta(metrics["macro"]["acc"], before["macro"]),
    }
    if rows:
        out["paired"] = paired_block(run.path, rows, baseline["correct"])
    return out


def paired_block(stage1_dir: Path, rows: dict, correct: dict) -> dict:
    """Stage 2 minus stage 1 on the same documents: paired intervals and McNemar (``paired_difference``)."""
    before, after = {}, {}
    for task, task_rows in rows.items():
        c1 = correct[task]  # verified_samples of the stage 1 run
        c2 = {r["doc_id"]: bool(r["correct"]) for r in task_rows}
        if set(c1) != set(c2):  # the comparison record matched, so this is a damaged or edited run
            raise BadInput(f"stage 1 run {stage1_dir} scored other {task} documents than this run")
        docs = sorted(c2)
        before[task], after[task] = np.array([c1[d] for d in docs]), np.array([c2[d] for d in docs])
    return paired_difference(before, after)


def recovery_block(rows: dict, s1: dict, s2: dict | None, chance: dict) -> dict:
    """Stage 4's ``recovery`` of one finetuned model: its ``rows`` against stage 1 (and stage 2) on the same documents.

    ``s1`` / ``s2``: ``task -> {doc_id: correct}`` of the stage 1 / 2 runs (``verified_samples``); ``chance``: each
    task's chance accuracy.
    """
    per_task, arrays = {}, {}
    for task, task_rows in rows.items():
        c4 = {r["doc_id"]: r["correct"] for r in task_rows}
        if task not in s1 or (s2 is not None and task not in s2):
            raise BadInput(f"task {task}: stage 1 or stage 2 records no samples for it; rerun them together")
        c1 = s1[task]
        c2 = s2[task] if s2 is not None else None
        if set(c1) != set(c4) or (c2 is not None and set(c2) != set(c4)):
            raise BadInput(f"task {task}: stage 4 scored other documents than stages 1/2; rerun them together")
        docs = sorted(c4)
        a1, a4 = np.array([c1[d] for d in docs]), np.array([c4[d] for d in docs])
        a2 = np.array([c2[d] for d in docs]) if c2 is not None else None
        per_task[task] = task_recovery(a1, a2, a4, chance[task])
        arrays[task] = (a1, a2, a4)
    return {"tasks": per_task, "macro": macro_recovery(per_task, arrays)}


def pairs(results: list[dict], correct: dict) -> dict:
    """Every two finetuned models of different trainings against each other, under stage 4's mask: the question
    "which training recovers most?" when stage 4 scored more than two (say causal, the mask in every layer, the
    mask in some layers). A training with several scored models (two seeds, a checkpoint and the final model)
    has no single representative and is left out (named in ``left_out``). Per pair as ``head_to_head`` (before:
    the causal-finetuned model when the pair has one, else the first training by name); the macro McNemar p
    values are also adjusted over the pairs (Benjamini-Hochberg, scipy's ``false_discovery_control``: ``q``).
    """
    from itertools import combinations

    from scipy.stats import false_discovery_control

    from ablate.results.finetuned import trained_with

    by_training: dict[str, list[dict]] = {}
    for entry in results:
        by_training.setdefault(trained_with(entry), []).append(entry)
    single = sorted((t for t, entries in by_training.items() if len(entries) == 1),
                    key=lambda t: (t != "causal", t))
    out = []
    for before, after in combinations(single, 2):
        b, a = by_training[before][0]["label"], by_training[after][0]["label"]
        arrays = [{t: np.array([c[t][d] for d in sorted(c[t])]) for t in c} for c in (correct[b], correct[a])]
        out.append({"before": b, "after": a, "before_training": before, "after_training": after,
                    **paired_difference(*arrays)})
    if out:
        q = false_discovery_control([p["macro"]["mcnemar"]["p_value"] for p in out])
        for pair, value in zip(out, q, strict=True):
            pair["macro"]["mcnemar"]["q_value"] = float(value)
    return {"pairs": out, "left_out": sorted(t for t, entries in by_training.items() if len(entries) > 1)}


def head_to_head(results: list[dict], correct: dict) -> dict | None:
    """The ``prefill_bidir``-finetuned model against the causal-finetuned one, both under stage 4's mask.

    The study's question in one comparison: at the same budget, does training with the mask beat training
    without it? Paired over the same documents (``paired_difference``: causal-finetuned = before,
    mask-finetuned = after). ``results``: stage 4's checkpoint entries; ``correct``: label -> task ->
    {doc_id: correct}. None unless exactly one checkpoint of each training mask, with its layers, was scored.
    """
    from ablate.results.finetuned import trained_with

    by_mask: dict[str, list[dict]] = {}
    for entry in results:
        by_mask.setdefault(trained_with(entry), []).append(entry)
    others = sorted(set(by_mask) - {"causal"})
    if len(by_mask.get("causal", [])) != 1 or len(others) != 1 or len(by_mask[others[0]]) != 1:
        return None
    causal, masked = by_mask["causal"][0]["label"], by_mask[others[0]][0]["label"]
    arrays = [{t: np.array([c[t][d] for d in sorted(c[t])]) for t in c} for c in (correct[causal], correct[masked])]
    return {"before": causal, "after": masked, **paired_difference(*arrays)}
