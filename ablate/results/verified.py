"""metrics.json is a cache: every number a reader shows is recomputed from the verified samples.

    python -c "from ablate.results.verified import verified_runs; print([r.error for r in verified_runs('runs', 'stage2_ablation_eval')])"

``verified_run`` (``verified_metrics`` for an evaluation run, ``verified_summary``
for a stage 3 run) is the one entry point for everything that shows or uses a
run's numbers (STATUS.md, the report, aggregate, a later stage). It verifies the
run's samples (``ablate.results.samples``) and recomputes every number its
metrics.json caches with the same pure functions the stage used: each task's
acc, n and chance and the macro; stage 2's ``baseline`` block
(``recovery.baseline_block``) against the stage 1 run it names; stage 4's
``recovery`` and ``head_to_head`` blocks against the stage 1 and 2 runs it
names, and what each entry copies from its stage 3 run. A stage 3 run's
summary.json is a cache of its ``train_log.jsonl``. The cache must equal the
recomputation (exact after a JSON round trip; floats within 1e-12), and the
run's run.json, config.json and env.json must be what its results recorded;
else the run is damaged, in one line naming the file and what disagrees. So a
number shown can differ from the truth only if someone edits the samples and
the digests recorded for them to agree.

What a run measured rather than computed (``peak_memory`` in metrics.json and summary.json, ``oom_retries``,
``timing``) cannot be recomputed from samples, so it is left out of the verified set on purpose: it passes
through as recorded, and no verified number depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.recovery import baseline_block, head_to_head, pairs, recovery_block
from ablate.results.rundir import STAGE1, STAGE2, STAGE3_PREFIX, STAGE4
from ablate.results.finetuned import CHECKPOINT_OF, SCORED, checkpoint_step, stage3_record, stage4_label
from ablate.results.samples import (RECORDED, by_doc, macro, mask_leaks, mean_loss, read_samples, task_metrics,
                                    verified_samples)

TOLERANCE = 1e-12


def verified_run(run: rundir.Run, runs_dir: Path) -> rundir.Run:
    """``run`` with its results verified (``verified_metrics`` / ``verified_summary``), or with ``error`` saying
    what disagrees and no results: damage, listed as a blocker and never shown as a result."""
    if run.error or run.results is None:
        return run
    try:
        _check_files(run)
        if run.stage.startswith(STAGE3_PREFIX):
            return dataclasses.replace(run, summary=verified_summary(run))
        return dataclasses.replace(run, metrics=verified_metrics(run, runs_dir))
    except BadInput as exc:
        return dataclasses.replace(run, metrics=None, summary=None, error=str(exc))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # results of the wrong shape
        return dataclasses.replace(run, metrics=None, summary=None,
                                   error=f"{_file(run)} has results of the wrong shape ({type(exc).__name__}: {exc})")


def verified(run: rundir.Run, runs_dir: Path) -> rundir.Run:
    """``verified_run`` for a stage that starts from ``run``: its results verified, or one line (BadInput)."""
    found = verified_run(run, runs_dir)
    if found.error:
        raise BadInput(f"{run.path} has damaged results, not used: {found.error}")
    return found


def latest_verified(runs_dir: Path, stage: str, where=None, statuses=(rundir.COMPLETED,)) -> rundir.Run | None:
    """``rundir.latest`` for a stage that starts from the run: the newest run of ``stage`` with a status in
    ``statuses`` and ``where(run)``, its results verified. A damaged run newer than it (results unreadable, missing
    or disagreeing with its samples, status.txt not a status) that might have been the one (``where`` cannot tell,
    or says yes of what it records) is refused in one line (BadInput): it is not passed over in silence."""
    for found in reversed(rundir.find_runs(runs_dir, stage)):
        run, known = verified_run(found, runs_dir), isinstance(found.status, rundir.Status)
        if run.error or not known or (run.status in statuses and run.results is None):
            if found.results is not None and where is not None and not _asks(where, found):
                continue  # what it records, damaged or not, is not what is asked for
            why = run.error or (f"its status.txt says {run.status!r}" if not known else "its results file is missing")
            raise BadInput(f"{run.path} has damaged results ({why}); restore it, or move it out of the runs folder")
        if run.status in statuses and (where is None or where(run)):
            return run
    return None


def _asks(where, run: rundir.Run) -> bool:
    try:
        return bool(where(run))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # results of the wrong shape: it might be
        return True


def verified_runs(runs_dir: Path, stage: str) -> list[rundir.Run]:
    """``rundir.find_runs`` with every usable run's results verified (``verified_run``)."""
    return [verified_run(run, runs_dir) for run in rundir.find_runs(runs_dir, stage)]


def _check_files(run: rundir.Run) -> None:
    """The run's own record (run.json) names it (a copy beside it, ``RUN-backup``, keeps its origin's), and its
    config.json and env.json are as its results recorded."""
    info, name = run.info or {}, str((run.info or {}).get("name"))
    if not (run.path.name == name or run.path.name.startswith(name + "-")) or info.get("stage") != run.stage \
            or not info.get("uid"):
        raise BadInput(f"{Path(run.path) / rundir.RUN_FILE} is unreadable or names another run "
                       f"({info.get('stage')}/{info.get('name')}); restore it")
    recorded = (run.results or {}).get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(RECORDED):
        raise BadInput(f"{_file(run)} records no digests of {' and '.join(RECORDED)} (edited); rerun the run")
    for name, digest in sorted(recorded.items()):
        try:
            found = hashlib.sha256((Path(run.path) / name).read_bytes()).hexdigest()
        except OSError as exc:
            raise BadInput(f"{Path(run.path) / name}: cannot read it ({exc.strerror or exc})") from None
        if found != digest:
            raise BadInput(f"{Path(run.path) / name} does not match the sha256 {_file(run).name} records "
                           "(edited or replaced after the run); restore it or rerun the run")


def verified_metrics(run: rundir.Run, runs_dir: Path) -> dict:
    """An evaluation run's metrics.json, every number in it that a reader shows recomputed from verified samples.

    Stages 1 and 2: each task's acc, n and chance and the macro from the run's samples; stage 2's ``baseline``
    block against the stage 1 run it names. Stage 4: each checkpoint's (and its causal read's) tasks and macro
    from its samples, its ``recovery`` against the stage 1 and 2 runs the run names, ``head_to_head``, and what
    each entry copies from its stage 3 run. BadInput, naming the file and what disagrees, when the cache does.
    """
    metrics = json.loads(json.dumps(run.metrics))  # peak_memory, timing: measurements, not verified (module doc)
    file = _file(run)
    if run.stage in (STAGE1, STAGE2):
        rows = _evaluation(run.path, file, metrics, metrics.get("samples"))
        _same(file, "leaky", metrics.get("leaky"), mask_leaks(metrics.get("mask"), run.config),
              f"its mask {metrics.get('mask')} (ablate.core.masks, or the mask file its config.json records)")
        _same(file, "seed", metrics.get("seed"), (metrics.get("comparison") or {}).get("seed"), "its comparison record")
        _layers(file, metrics)
        if run.stage == STAGE2 and "baseline" in metrics:
            _baseline(file, metrics, rows, runs_dir)
    elif run.stage == STAGE4:
        _stage4(file, metrics, Path(run.path), runs_dir)
    return metrics


def _file(run) -> Path:
    return Path(run.path) / ("summary.json" if run.stage.startswith(STAGE3_PREFIX) else "metrics.json")


def _evaluation(run_dir: Path, file: Path, block: dict, record, prefix: str = "", key: str = "") -> dict:
    """One evaluation's ``tasks`` and ``macro`` (in ``block``) against its samples; returns ``task -> rows``."""
    tasks = block["tasks"]
    rows = read_samples(run_dir, f"run {run_dir}", record, tasks, prefix)
    for task, task_rows in rows.items():
        by_doc(f"run {run_dir}", f"samples_{prefix}{task}.jsonl", task_rows)
        metric = tasks[task]["metric"]
        primary = metric.split(",", 1)[1] if metric.startswith("exact_match,") else "none"
        recomputed = task_metrics(_lm_eval_result(task_rows), task_rows, primary)
        _same(file, f"{key}tasks.{task}", _no_stderr(tasks[task]), _no_stderr(recomputed))
    _same(file, f"{key}macro", block["macro"], macro(tasks))
    return rows


def _lm_eval_result(rows: list[dict]) -> dict:
    """The means lm-eval reports, from the rows (its stderr is not recomputed: no reader shows it)."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    if rows and "filters" in rows[0]:
        return {f"exact_match,{f}": mean(bool(r["filters"][f]["exact_match"]) for r in rows) for f in rows[0]["filters"]}
    out = {"acc,none": mean(bool(r["correct"]) for r in rows)}
    if rows and "correct_norm" in rows[0]:
        out["acc_norm,none"] = mean(bool(r["correct_norm"]) for r in rows)
    return out


def _no_stderr(value):
    if isinstance(value, dict):
        return {k: _no_stderr(v) for k, v in value.items() if not k.endswith("_stderr")}
    return value


def _baseline(file: Path, metrics: dict, rows: dict, runs_dir: Path) -> None:
    """Stage 2's ``baseline`` block, rebuilt from the stage 1 run it names (``recovery.baseline_block``)."""
    cached = metrics["baseline"]
    if cached.get("run") is None:
        return  # no comparison: a reason, no numbers
    stage1 = _referenced(runs_dir, STAGE1, cached["run"], cached.get("run_id"), None, file, "baseline.run")
    differs = _differing(metrics.get("comparison"), stage1.metrics.get("comparison"))
    if differs:
        raise BadInput(f"{file}: its stage 1 run {stage1.path} now records another comparison ({', '.join(differs)} "
                       "differ); one of the two metrics.json files was edited")
    recomputed = baseline_block(metrics, {"run": stage1, "correct": verified_samples(stage1)}, rows)
    _same(file, "baseline", cached, {**recomputed, "run": cached["run"]})  # the path it had when stage 2 ran


def _stage4(file: Path, metrics: dict, run_dir: Path, runs_dir: Path) -> None:
    stage1 = _referenced(runs_dir, STAGE1, metrics["stage1_run"], None, metrics["stage1_uid"], file, "stage1_run")
    differs = _differing(metrics.get("comparison"), stage1.metrics.get("comparison"))
    if differs:
        raise BadInput(f"{file}: its stage 1 run {stage1.path} records another comparison ({', '.join(differs)})")
    stage2 = (_referenced(runs_dir, STAGE2, metrics["stage2_run"], None, metrics["stage2_uid"], file, "stage2_run")
              if metrics.get("stage2_run") is not None else None)
    s1 = verified_samples(stage1)
    s2 = verified_samples(stage2) if stage2 is not None else None
    correct = {}
    for i, entry in enumerate(metrics["checkpoints"]):
        at = f"checkpoints[{i}]."
        label = entry["label"]
        _layers(file, {"mask_layers": metrics.get("mask_layers"), "mask_check": entry.get("mask_check")})
        rows = _evaluation(run_dir, file, entry, entry.get("samples"), f"{label}_", at)
        if entry.get("causal"):
            _evaluation(run_dir, file, entry["causal"], entry["causal"].get("samples"), f"{label}_causal_", at + "causal.")
        correct[label] = {t: by_doc(f"run {run_dir}", t, r) for t, r in rows.items()}
        chance = {t: m["chance"] for t, m in entry["tasks"].items()}
        _same(file, at + "recovery", entry["recovery"], recovery_block(rows, s1, s2, chance))
        _stage3_copies(file, at, entry, runs_dir)
    _same(file, "head_to_head", metrics.get("head_to_head"), head_to_head(metrics["checkpoints"], correct))
    if "pairs" in metrics:  # runs before the pairs were recorded have none
        _same(file, "pairs", metrics["pairs"], pairs(metrics["checkpoints"], correct))


def _stage3_copies(file: Path, at: str, entry: dict, runs_dir: Path) -> None:
    """What a stage 4 entry copies from its stage 3 run (training mask, leakage, seed, save format, what was scored:
    the final model, or a checkpoint at a step of a run of some status) still agrees."""
    scored = entry.get("scored")
    if scored not in SCORED:
        raise BadInput(f"{file}: {at}scored is {_short(scored)}, not one of {', '.join(SCORED)}; edited")
    found = Path(entry["checkpoint"])
    checkpoint = scored == "checkpoint"  # of a run of any status; the run may have been resumed since
    run = _referenced(runs_dir, found.parent.name, entry["checkpoint"], None, entry["checkpoint_uid"], file,
                      at + "checkpoint", statuses=tuple(rundir.Status) if checkpoint else rundir.USABLE)
    run = verified_run(run, runs_dir)
    if run.error:
        raise BadInput(f"{file}: its stage 3 run {run.path} is damaged ({run.error})")
    try:
        trained, source = stage3_record(run), f"stage 3 run {run.path}"
    except BadInput as exc:
        raise BadInput(f"{file}: {exc}") from None
    model_dir = Path(entry["model_dir"])
    _same(file, at + "train_mask", entry["train_mask"], trained["mask"], source)
    _same(file, at + "train_mask_layers", entry.get("train_mask_layers"), trained["mask_layers"], source)
    _same(file, at + "leaky", entry["leaky"], trained["leaky"], source)
    _same(file, at + "train_seed", entry["train_seed"], trained["seed"], source)
    _same(file, at + "label", entry["label"], stage4_label(trained["mask"], found.name, model_dir),
          "its run and model_dir")
    _same(file, at + "save_format", entry["save_format"],
          None if checkpoint else (run.summary.get("save") or {}).get("format"), source)
    _same(file, at + "step", entry["step"], checkpoint_step(model_dir) if checkpoint else None, "its model_dir")
    if entry["run_status"] not in (CHECKPOINT_OF if checkpoint else rundir.USABLE):
        raise BadInput(f"{file}: {at}run_status is {_short(entry['run_status'])}; edited")
    # A crashed run may have been resumed since, and a crashed run's reason says how long ago its heartbeat was.
    if not checkpoint or (entry["run_status"] == run.status and run.status != rundir.CRASHED):
        _same(file, at + "run_status", entry["run_status"], str(run.status), source)
        _same(file, at + "run_reason", entry["run_reason"], run.reason or None, source)


def _referenced(runs_dir: Path, stage: str, path: str, run_id: str | None, uid: str | None, file: Path,
                field: str, statuses=rundir.USABLE) -> rundir.Run:
    """The run a block names: the one of that name in this runs folder (a moved or synced folder), else the path
    recorded; of one of ``statuses``, its results readable (but for a run of another status than usable: a
    checkpoint's failed or crashed run has none) and, where a uid is recorded, that uid."""
    name = run_id or Path(path).name
    run = rundir.load_run(Path(runs_dir) / stage / name) or rundir.load_run(Path(path))
    why = ("is not there" if run is None else
           f"is {run.status}" if run.status not in statuses else
           f"has damaged results ({run.error})" if run.error or (run.results is None and run.status in rundir.USABLE)
           else "is another run of that name (its uid differs)" if uid is not None and run.uid != uid else None)
    if why:
        where = run.path if run is not None else Path(runs_dir) / stage / name
        raise BadInput(f"{file}: the run its {field} names ({where}) {why}; its numbers cannot be verified")
    return run


# ---------------------------------------------------------------- stage 3

def verified_summary(run: rundir.Run) -> dict:
    """A stage 3 run's summary.json, its numbers checked against ``train_log.jsonl``: the train loss (its mean over
    the logged steps) and grad norms recomputed from the steps, and the eval loss, speed and probe against the
    log's last line (the run's end, written beside summary.json). BadInput when they disagree."""
    summary = json.loads(json.dumps(run.summary))  # peak_memory, oom_retries: measurements, not verified
    file, log = _file(run), Path(run.path) / "train_log.jsonl"
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{log}: unreadable ({type(exc).__name__}); the numbers of {file.name} cannot be verified") from None
    end = rows[-1].get("end") if rows and isinstance(rows[-1], dict) else None
    if not isinstance(end, dict):
        raise BadInput(f"{log} does not end with the run's end record (cut or edited); "
                       f"the numbers of {file.name} cannot be verified")
    steps = rows[:-1]
    norms = [r["grad_norm"] for r in steps if isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    recomputed = {"train_loss": _finite(mean_loss(steps)), "eval_loss": end.get("eval_loss"),
                  "train_steps_per_second": end.get("train_steps_per_second"), "probe": end.get("probe"),
                  "train_tokens_per_second": end.get("train_tokens_per_second"),
                  "padding_fraction": end.get("padding_fraction"),
                  "grad_norm": {"last": norms[-1] if norms else None, "max": max(norms) if norms else None}}
    for key, value in recomputed.items():
        _same(file, key, summary.get(key), value, log.name)
    guard = summary.get("leakage_guard") or {}
    if not (summary.get("leaky") is (not guard.get("passed")) is guard.get("allowed_by_flag")
            is (guard.get("first_leak") is not None)):
        raise BadInput(f"{file}: leaky is {summary.get('leaky')} but its leakage_guard says {guard}; edited")
    if mask_leaks(summary.get("mask"), run.config) is not False and not summary.get("leaky"):
        raise BadInput(f"{file}: leaky is false for the mask {summary.get('mask')}, which leaks labels (or whose "
                       "file verdict its config.json does not record); edited")
    _layers(file, summary)
    return summary


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------- comparing a cache with its recomputation

def _differing(a, b) -> list[str]:
    """The top-level keys in which two comparison records differ."""
    a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] or ([] if a == b else ["the record"])


def _layers(file: Path, metrics: dict) -> None:
    """``mask_layers`` is what the run's mask check ran with (which recorded the layers it checked, and of how
    many); a run whose mask ran in chosen layers without a check that passed shows no number."""
    check = metrics.get("mask_check")
    checked = check.get("layers") if isinstance(check, dict) and check.get("passed") else None
    if metrics.get("mask_layers") is not None or checked is not None:
        _same(file, "mask_layers", metrics.get("mask_layers"), checked, "its mask check")


def _same(file: Path, key: str, cached, recomputed, source: str = "its samples") -> None:
    """Refuse, naming ``file`` and the first differing field, unless ``cached`` equals ``recomputed``."""
    where = _first_difference(cached, json.loads(json.dumps(recomputed, allow_nan=False, default=str)), key)
    if where is not None:
        field, a, b = where
        _differs(file, field, a, b, source)


def _differs(file: Path, field: str, cached, recomputed, source: str) -> None:
    raise BadInput(f"{file}: {field} is {_short(cached)}, recomputed from {source} {_short(recomputed)}; "
                   "edited or damaged (rerun the run, or restore the file)")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.12g}"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_difference(a, b, key: str):
    if isinstance(a, bool) or isinstance(b, bool):
        return None if a is b else (key, a, b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return None if a == b else (key, a, b)
        return None if abs(a - b) <= TOLERANCE else (key, a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return (f"{key}.{k}", a.get(k, "absent"), b.get(k, "absent"))
            found = _first_difference(a[k], b[k], f"{key}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return (key, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (key, a, b)
