"""An evaluation's per-document samples, checked against the digests its metrics.json records.

    python -c "from ablate.results.rundir import find_runs; from ablate.results.samples import verified_samples; print(verified_samples(find_runs('runs', 'stage1_baseline_eval')[-1]))"

The samples files are the source of truth of an evaluation run and metrics.json
a cache of them: each file must match the sha256 and row count metrics.json
records and hold one row per document (``verified_samples``); every number a
reader shows is recomputed from them with the functions here, which the stages
use to write it (``task_metrics``, ``macro``; a stage 3 run's train loss,
``mean_loss``), by ``ablate.results.verified``. Also the digests a run records
of its other files (``record_files``, ``config_digest``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from ablate.errors import BadInput

# MaskSpec.leaks_labels of the masks ablate.core.masks registers, without importing torch (a reader stays fast);
# tests/test_corruption.py checks that the two agree. A mask not named here is not checked.
LEAKS = {"causal": False, "prefill_bidir": False, "segment_bidir": False, "full_bidir": True}


def mask_leaks(mask, config) -> bool | None:
    """Whether ``mask`` leaks labels, as a reader tells it without torch: ``LEAKS`` for a registered mask; for a
    mask from a file (ablate.core.mask_files), the probes' verdict its run's config.json records with the file
    (``mask_file.verdict``; config.json is digested in the run's results); None when neither says."""
    if mask in LEAKS:
        return LEAKS[mask]
    source = config.get("mask_file") if isinstance(config, dict) else None
    verdict = source.get("verdict") if isinstance(source, dict) else None
    value = verdict.get("leaks_labels") if isinstance(verdict, dict) else None
    return value if isinstance(value, bool) else None


def verified_samples(run, prefix: str = "", tasks=None) -> dict[str, dict[int, bool]]:
    """``task -> {doc_id: correct}`` of an evaluation run, from its samples files, or one line (BadInput).

    Each file must match the sha256 and row count its metrics.json records, hold one row per doc_id, and
    give the accuracy metrics.json caches (macro too). The caller's numbers come from what this returns.
    """
    metrics = run.metrics or {}
    where = f"run {run.path}"
    rows = read_samples(Path(run.path), where, metrics.get("samples"), tasks if tasks is not None
                        else (metrics.get("tasks") or {}), prefix)
    out = {task: by_doc(where, f"samples_{prefix}{task}.jsonl", task_rows) for task, task_rows in rows.items()}
    _check_cache(where, metrics, out)
    return out


def read_samples(run_dir: Path, where: str, record, tasks, prefix: str = "") -> dict[str, list[dict]]:
    """``task -> rows`` of each ``samples_<prefix><task>.jsonl``, checked against the digest ``record`` gives."""
    if not isinstance(record, dict):
        raise BadInput(f"{where} records no samples digests (its metrics.json was edited); rerun it")
    out = {}
    for task in sorted(tasks):
        entry = record.get(task)
        path = run_dir / f"samples_{prefix}{task}.jsonl"
        if not isinstance(entry, dict) or entry.get("file") != path.name:
            raise BadInput(f"{where} records no samples digest for task {task}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadInput(f"{where}: cannot read {path.name}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BadInput(f"{where}: {path.name} does not match the sha256 its metrics.json records "
                           "(edited, truncated or replaced after the run); rerun it")
        try:
            rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadInput(f"{where}: {path.name} is not ablate samples ({type(exc).__name__}: {exc})") from None
        if len(rows) != entry.get("rows") or isinstance(entry.get("rows"), bool):
            raise BadInput(f"{where}: {path.name} holds {len(rows)} rows, its metrics.json records {entry.get('rows')}")
        out[task] = rows
    return out


def by_doc(where: str, name: str, rows: list[dict]) -> dict[int, bool]:
    """``doc_id -> correct`` of one samples file's rows; one row per document, or BadInput."""
    correct: dict[int, bool] = {}
    try:
        for row in rows:
            doc, value = row["doc_id"], row["correct"]
            if doc in correct:
                raise BadInput(f"{where}: {name} holds doc_id {doc} twice; one row per document")
            correct[doc] = bool(value)
    except (KeyError, TypeError) as exc:
        raise BadInput(f"{where}: {name} is not ablate samples ({type(exc).__name__}: {exc})") from None
    return correct


def _check_cache(where: str, metrics: dict, correct: dict[str, dict[int, bool]]) -> None:
    """metrics.json is a cache of the samples: an accuracy that disagrees with them is refused."""
    accs = []
    for task, docs in correct.items():
        acc = sum(docs.values()) / len(docs) if docs else None
        cached = ((metrics.get("tasks") or {}).get(task) or {}).get("acc")
        if acc is None or not isinstance(cached, (int, float)) or abs(cached - acc) > 1e-9:
            raise BadInput(f"{where}: metrics.json gives {task} acc {cached}, its samples give {acc}; "
                           "the samples are the source of truth, rerun it or restore metrics.json")
        accs.append(acc)
    cached = (metrics.get("macro") or {}).get("acc")
    if accs and len(correct) == len(metrics.get("tasks") or {}) and not (
            isinstance(cached, (int, float)) and abs(cached - sum(accs) / len(accs)) <= 1e-9):
        raise BadInput(f"{where}: metrics.json gives macro acc {cached}, its samples give {sum(accs) / len(accs)}")


def accuracy(correct: dict[str, dict[int, bool]]) -> dict:
    """Per-task and macro acc recomputed from ``verified_samples``."""
    tasks = {t: sum(d.values()) / len(d) for t, d in correct.items()}
    return {"tasks": tasks, "macro": sum(tasks.values()) / len(tasks) if tasks else None}


# ---------------------------------------------------------------- an evaluation's numbers from its rows

def _number(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_metrics(result: dict, rows: list[dict], primary: str = "none") -> dict:
    """``acc`` is the task's primary metric: accuracy for multiple choice, the primary filter's exact match
    for generation (chance 0); ``metric`` names it, and a generative task lists every filter's exact match."""
    if rows and "filters" in rows[0]:
        filters = {f: {"exact_match": _number(result.get(f"exact_match,{f}")),
                       "exact_match_stderr": _number(result.get(f"exact_match_stderr,{f}"))}
                   for f in rows[0]["filters"]}
        return {"metric": f"exact_match,{primary}", "acc": filters[primary]["exact_match"],
                "acc_stderr": filters[primary]["exact_match_stderr"], "exact_match": filters, "n": len(rows),
                "chance": 0.0}
    out = {"metric": "acc", "acc": _number(result.get("acc,none")), "acc_stderr": _number(result.get("acc_stderr,none"))}
    if "acc_norm,none" in result:
        out["acc_norm"] = _number(result["acc_norm,none"])
        out["acc_norm_stderr"] = _number(result.get("acc_norm_stderr,none"))
    out["n"] = len(rows)
    out["chance"] = sum(1 / len(r["logprobs"]) for r in rows) / len(rows) if rows else None
    return out


def macro(per_task: dict) -> dict:
    accs = [t["acc"] for t in per_task.values()]
    chances = [t["chance"] for t in per_task.values()]
    return {
        "acc": sum(accs) / len(accs) if accs and None not in accs else None,
        "chance": sum(chances) / len(chances) if chances and None not in chances else None,
        "n_tasks": len(per_task),
        # The mean of each task's primary metric (acc, or the primary filter's exact match).
        "of": {name: t["metric"] for name, t in per_task.items()},
    }


# ---------------------------------------------------------------- what else a run records

RECORDED = ("config.json", "env.json")  # what a run's results file records the digests of


def record_files(run_dir: Path) -> dict[str, str]:
    """sha256 of the run's config.json and env.json, for its results file: what a reader checks them against."""
    return {name: hashlib.sha256((Path(run_dir) / name).read_bytes()).hexdigest()
            for name in RECORDED if (Path(run_dir) / name).is_file()}


# Where things are, not what is trained: a moved data file or model is checked by its content (data_identity,
# model_identity), so config.json may name it anew.
PLACES = frozenset({"data", "eval_data", "model", "runs_dir", "device", "config_file"})


def config_digest(config: dict) -> str:
    """sha256 of a stage 3 config's settings (``PLACES`` aside), as config.json holds them: what --resume checks."""
    settings = {k: v for k, v in config.items() if k not in PLACES}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def end_train_log(path: Path, step: int, **record) -> None:
    """Stage 3's last line of ``train_log.jsonl``, the run's end (eval loss, speed, probe; NaN written as null):
    what its summary.json caches beside the steps."""
    def finite(value):
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "time": time.time(), "end": finite(record)}) + "\n")


def mean_loss(history: list[dict]) -> float | None:
    """Mean training loss over the logged steps (each logged loss covers the steps since the previous one)."""
    total = steps = previous = 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * span, steps + span, entry["step"]
    return total / steps if steps else None
