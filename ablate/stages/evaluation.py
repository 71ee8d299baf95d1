"""One lm-eval evaluation run under a mask: what stages 1, 2 and 4 share.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu

Everything that can be checked (mask, tasks, task data, model, the runs
folder, a named baseline) is checked before a run directory exists, so bad
input leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from ablate.results import rundir
from ablate.results.files import write_jsonl
from ablate.core.masks import MASKS
from ablate.results.environment import environment
from ablate.results.gates import check_gate
from ablate.stages.config import EvalConfig
from ablate.errors import BadInput
from ablate.faults import fault_point

log = logging.getLogger(__name__)


def comparison_key(config: EvalConfig, task_data: dict[str, Path], model_identity: dict, tasks: dict | None = None,
                   manager=None, device: str | None = None) -> dict:
    """What must agree for two evaluation runs to be compared document by document: identities, not paths.

    Each task is what lm-eval resolved (``ablate.core.identity.task_identity``); the mask is left out, being
    what stage 2 changes. Pass ``tasks`` and ``manager`` from ``check_inputs`` (else they are built again).
    """
    from ablate.core.identity import task_identity
    from ablate.core.lm_eval_model import task_entry
    from ablate.core.models import resolve_device, resolve_dtype

    if tasks is None:
        manager, task_data, tasks = check_inputs(config)
    device = device or resolve_device(config.device)

    def yaml_of(name):
        entry = task_entry(manager, name) if manager is not None else None
        return entry.yaml_path if entry is not None else None

    return {
        "model": model_identity,
        "dtype": str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
        "attn_implementation": config.attn_implementation,
        "max_length": config.max_length,
        "limit": config.limit,
        "num_fewshot": config.num_fewshot,
        "seed": config.seed,
        "tasks": {name: task_identity(task, yaml_of(name)) for name, task in sorted(tasks.items())},
    }


def check_inputs(config: EvalConfig):
    """Validate tasks and task data; returns ``(manager, task_data, built tasks)``. Raises BadInput.

    Pass the manager on to ``evaluate``: without one, lm-eval indexes all its ~15k task YAMLs (~20 s).
    """
    from ablate.core.tasks import check_task_names, load_tasks, parse_task_data, task_manager

    manager = task_manager(config.include_path, list(config.tasks))
    check_task_names(manager, list(config.tasks))
    task_data = parse_task_data(list(config.task_data))
    return manager, task_data, load_tasks(manager, list(config.tasks), task_data)


def evaluate(config: EvalConfig, model, tokenizer, device: str, mask: str, tasks, manager) -> dict:
    """One lm-eval pass: ``{"tasks", "macro", "timing", "oom_retries", "rows"}`` (rows: per-task sample rows);
    None on ranks > 0."""
    from lm_eval import simple_evaluate

    from ablate.core.lm_eval_model import PrefillMaskLM, sample_rows

    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, device=device,
                       batch_size=config.batch_size, max_length=config.max_length)
    started = time.time()
    results = simple_evaluate(
        model=lm, tasks=list(tasks.values()), num_fewshot=config.num_fewshot,
        limit=config.lm_eval_limit, log_samples=True, bootstrap_iters=1000,
        random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
        fewshot_random_seed=config.seed, task_manager=manager,
    )
    seconds = time.time() - started
    if results is None:  # lm-eval returns the gathered results on rank 0 only
        return None
    primary = {name: primary_filter(task) for name, task in tasks.items()}
    rows = {name: sample_rows(results["samples"][name], primary[name]) for name in tasks}
    per_task = {name: task_metrics(results["results"][name], rows[name], primary[name]) for name in tasks}
    return {
        "tasks": per_task,
        "macro": macro(per_task),
        "timing": {
            "eval_seconds": round(seconds, 3),
            "tokens": lm.tokens_processed,
            # The least any evaluation of these requests computes, and what one forward per request would.
            "tokens_unique": lm.tokens_unique,
            "tokens_unshared": lm.tokens_unshared,
            "waste": round(lm.tokens_processed / lm.tokens_unique, 4) if lm.tokens_unique else None,
            # Loglikelihood tokens per second; None for a purely generative run (no such tokens).
            "tokens_per_second": round(lm.tokens_processed / seconds, 1) if seconds and lm.tokens_processed else None,
            # Generation: prompt tokens prefilled (padding excluded) and decode positions (rows x steps,
            # rows that finished early included: what the batch computed).
            "generation": {"prompt_tokens": lm.tokens_prompted, "decode_positions": lm.decode_positions,
                           "decode_positions_per_second": round(lm.decode_positions / seconds, 1)
                           if seconds and lm.decode_positions else None},
        },
        # Each halving of a batch after an out-of-memory error (ablate.core.oom); empty when none.
        "oom_retries": lm.oom_retries,
        # The runtime check that the mask took effect (ablate.core.mask_check); None where none ran.
        "mask_check": getattr(lm, "mask_check", None),
        "rows": rows,
    }


def write_samples(run_dir: Path, rows: dict, prefix: str = "") -> dict:
    """Each task's ``samples_<prefix><task>.jsonl``; returns ``task -> {file, sha256, rows}`` for metrics.json."""
    out = {}
    for name, task_rows in rows.items():
        path = run_dir / f"samples_{prefix}{name}.jsonl"
        write_jsonl(path, task_rows)
        out[name] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": len(task_rows)}
    return out


def run_eval(config: EvalConfig, compare=None) -> Path | None:
    """Evaluate ``config.model`` into a new run; ``compare(key)`` (stage 2) is called before the model loads
    and returns what to add to ``metrics.json`` once the results are in: ``finish(metrics, rows) -> dict``,
    ``rows`` being each task's per-document rows.

    Under ``accelerate launch`` every process scores its share of the documents (lm-eval's data-parallel
    split) and rank 0 writes the run; the other ranks return None.
    """
    from accelerate import PartialState

    from ablate.core.identity import model_identity
    from ablate.core.models import load_model, resolve_device

    started = time.time()
    device = resolve_device(config.device)
    # Under torchrun / accelerate launch: on CPU accelerate joins the processes only when told (gloo).
    state = PartialState(cpu=device == "cpu")
    manager, task_data, tasks = check_inputs(config)
    key = comparison_key(config, task_data, model_identity(config.model), tasks, manager, device)
    finish = compare(key) if compare else None
    rundir.check_writable(Path(config.runs_dir), config.stage)
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation)

    run_dir = rundir.claim(state, lambda: rundir.new_run_dir(Path(config.runs_dir), config.stage,
                                                              model_identity=key["model"]))
    with rundir.active(run_dir, is_main=state.is_main_process):
        if state.is_main_process:
            rundir.write_json(run_dir / "config.json", config.to_dict())
            rundir.write_json(run_dir / "env.json", environment(device))
        log.info("run %s: %s on %s with mask %s", run_dir, config.model, ",".join(config.tasks), config.mask)
        fault_point("eval")
        result = evaluate(config, model, tokenizer, device, config.mask, tasks, manager)
        if result is None:  # another rank: its documents went to rank 0, which writes the run
            return None
        rows = result.pop("rows")
        samples = write_samples(run_dir, rows)
        metrics = {
            "stage": config.stage,
            "run_id": run_dir.name,
            "status": rundir.COMPLETED,
            "model": config.model,
            "mask": config.mask,
            # a scored token saw its own future (a leaking mask, run with --allow-label-leakage): not a result
            "leaky": MASKS[config.mask].leaks_labels,
            "seed": config.seed,
            "comparison": key,
            **result,
            # The samples are the source of truth; a reader checks them against these and recomputes acc.
            "samples": samples,
        }
        metrics["timing"]["wall_seconds"] = round(time.time() - started, 3)
        if finish:
            metrics["baseline"] = finish(metrics, rows)
        gated = check_gate(config.gate, metrics)
        if gated:
            metrics["status"] = rundir.GATED
            log.warning("run %s is gated: %s", run_dir, gated)
        rundir.write_json(run_dir / "metrics.json", metrics)
        rundir.set_status(run_dir, metrics["status"], gated or "")
    return run_dir


def _number(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def primary_filter(task) -> str:
    """The filter whose exact match a generative task is scored by: the first it lists (gsm8k: strict-match)."""
    filters = getattr(task.config, "filter_list", None) or []
    return filters[0]["name"] if filters and task.OUTPUT_TYPE == "generate_until" else "none"


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


def verified_samples(run, prefix: str = "", tasks=None) -> dict[str, dict[int, bool]]:
    """``task -> {doc_id: correct}`` of an evaluation run, from its samples files, or one line (BadInput).

    Each file must match the sha256 and row count its metrics.json records, hold one row per doc_id, and
    give the accuracy metrics.json caches (macro too). The caller's numbers come from what this returns.
    """
    metrics = run.metrics or {}
    record = metrics.get("samples")
    where = f"run {run.path}"
    if not isinstance(record, dict):
        raise BadInput(f"{where} records no samples digests (made by an older ablate, or its metrics.json was "
                       "edited); rerun it")
    out = {}
    for task in sorted(tasks if tasks is not None else (metrics.get("tasks") or {})):
        entry = record.get(task)
        path = Path(run.path) / f"samples_{prefix}{task}.jsonl"
        if not isinstance(entry, dict) or entry.get("file") != path.name:
            raise BadInput(f"{where} records no samples digest for task {task}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadInput(f"{where}: cannot read {path.name}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BadInput(f"{where}: {path.name} does not match the sha256 its metrics.json records "
                           "(edited, truncated or replaced after the run); rerun it")
        out[task] = _correct(where, path.name, data, entry.get("rows"))
    _check_cache(where, metrics, out)
    return out


def _correct(where: str, name: str, data: bytes, n_rows) -> dict[int, bool]:
    correct: dict[int, bool] = {}
    try:
        rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        for row in rows:
            doc, value = row["doc_id"], row["correct"]
            if doc in correct:
                raise BadInput(f"{where}: {name} holds doc_id {doc} twice; one row per document")
            correct[doc] = bool(value)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{where}: {name} is not ablate samples ({type(exc).__name__}: {exc})") from None
    if len(rows) != n_rows:
        raise BadInput(f"{where}: {name} holds {len(rows)} rows, its metrics.json records {n_rows}")
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
