"""One lm-eval evaluation run under a mask: what stages 1, 2 and 4 share.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu

Everything that can be checked (mask, tasks, task data, model, the runs
folder, a named baseline) is checked before a run directory exists, so bad
input leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ablate.results import rundir
from ablate.results.files import write_jsonl
from ablate.results.environment import environment
from ablate.results.gates import check_gate
from ablate.stages.config import EvalConfig
from ablate.faults import fault_point

log = logging.getLogger(__name__)


def comparison_key(config: EvalConfig, task_data: dict[str, Path], model_identity: dict) -> dict:
    """What must agree for two evaluation runs to be compared document by document: identities, not paths."""
    from ablate.core.identity import task_data_digests
    from ablate.core.tasks import BUNDLED_DATA

    data = {name: BUNDLED_DATA[name] for name in config.tasks if name in BUNDLED_DATA and name not in task_data}
    return {
        "model": model_identity,
        "tasks": sorted(config.tasks),
        "limit": config.limit,
        "num_fewshot": config.num_fewshot,
        "max_length": config.max_length,
        "seed": config.seed,
        "task_data_sha256": task_data_digests({**data, **task_data}),
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
        "rows": rows,
    }


def write_samples(run_dir: Path, rows: dict, prefix: str = "") -> None:
    for name, task_rows in rows.items():
        write_jsonl(run_dir / f"samples_{prefix}{name}.jsonl", task_rows)


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
    key = comparison_key(config, task_data, model_identity(config.model))
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
        write_samples(run_dir, rows)
        metrics = {
            "stage": config.stage,
            "run_id": run_dir.name,
            "status": rundir.COMPLETED,
            "model": config.model,
            "mask": config.mask,
            "seed": config.seed,
            "comparison": key,
            **result,
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
