"""Stages 1 and 2: lm-evaluation-harness under the causal mask, then under an ablated mask.

    ablate tiny-model --out /tmp/tiny && \
    ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu && \
    ablate stage2 --model /tmp/tiny --tasks ablate_tiny --mask prefill_bidir --device cpu

Everything that can be checked (mask, tasks, task data, model) is checked
before a run directory exists, so bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ablate import rundir
from ablate.config import STAGE1, STAGE2, EvalConfig
from ablate.errors import BadInput
from ablate.faults import fault_point

log = logging.getLogger(__name__)


def run_stage1(config: EvalConfig) -> Path:
    return run_eval(config)


def run_stage2(config: EvalConfig) -> Path:
    return run_eval(config)


def comparison_key(config: EvalConfig, task_data: dict[str, Path], model_identity: dict) -> dict:
    """What must agree for two evaluation runs to be compared document by document: identities, not paths."""
    from ablate.identity import task_data_digests
    from ablate.tasks import BUNDLED_DATA

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
    from ablate.tasks import check_task_names, load_tasks, parse_task_data, task_manager

    manager = task_manager(config.include_path, list(config.tasks))
    check_task_names(manager, list(config.tasks))
    task_data = parse_task_data(list(config.task_data))
    return manager, task_data, load_tasks(manager, list(config.tasks), task_data)


def evaluate(config: EvalConfig, model, tokenizer, device: str, mask: str, tasks, manager) -> dict:
    """One lm-eval pass: ``{"tasks", "macro", "timing", "rows"}`` (rows: per-task sample rows)."""
    from lm_eval import simple_evaluate

    from ablate.harness import PrefillMaskLM

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
    rows = {name: [sample_row(s) for s in sorted(results["samples"][name], key=lambda s: s["doc_id"])]
            for name in tasks}
    per_task = {name: task_metrics(results["results"][name], rows[name]) for name in tasks}
    return {
        "tasks": per_task,
        "macro": macro(per_task),
        "timing": {
            "eval_seconds": round(seconds, 3),
            "tokens": lm.tokens_processed,
            "tokens_per_second": round(lm.tokens_processed / seconds, 1) if seconds else None,
        },
        "rows": rows,
    }


def write_samples(run_dir: Path, rows: dict, prefix: str = "") -> None:
    for name, task_rows in rows.items():
        rundir.write_jsonl(run_dir / f"samples_{prefix}{name}.jsonl", task_rows)


def run_eval(config: EvalConfig) -> Path:
    from ablate.identity import model_identity
    from ablate.models import load_model, resolve_device

    started = time.time()
    device = resolve_device(config.device)
    manager, task_data, tasks = check_inputs(config)
    key = comparison_key(config, task_data, model_identity(config.model))
    baseline = find_baseline(config, key) if config.stage == STAGE2 else None
    rundir.check_writable(Path(config.runs_dir), config.stage)
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation)

    run_dir = rundir.new_run_dir(Path(config.runs_dir), config.stage, model_identity=key["model"])
    with rundir.active(run_dir):
        rundir.write_json(run_dir / "config.json", config.to_dict())
        rundir.write_json(run_dir / "env.json", rundir.environment(device))
        log.info("run %s: %s on %s with mask %s", run_dir, config.model, ",".join(config.tasks), config.mask)
        fault_point("eval")
        result = evaluate(config, model, tokenizer, device, config.mask, tasks, manager)
        write_samples(run_dir, result.pop("rows"))
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
        if config.stage == STAGE2:
            metrics["baseline"] = compare(metrics, baseline)
        gated = rundir.check_gate(config.gate, metrics)
        if gated:
            metrics["status"] = rundir.GATED
            log.warning("run %s is gated: %s", run_dir, gated)
        rundir.write_json(run_dir / "metrics.json", metrics)
        rundir.set_status(run_dir, metrics["status"], gated or "")
    return run_dir


def sample_row(sample: dict) -> dict:
    logprobs = [float(r[0]) for r in sample["filtered_resps"]]
    pred = max(range(len(logprobs)), key=logprobs.__getitem__)
    contexts = [a[0] for a in sample["arguments"]]
    row = {
        "doc_id": sample["doc_id"],
        "target": sample["target"],
        "logprobs": logprobs,
        "pred": pred,
        "correct": bool(sample["acc"]),
        # Winogrande-style tasks vary the context per choice and share the continuation.
        "context": contexts[0] if len(set(contexts)) == 1 else contexts,
        "choices": [a[1] for a in sample["arguments"]],
    }
    if "acc_norm" in sample:
        row["correct_norm"] = bool(sample["acc_norm"])
    return row


def _number(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_metrics(result: dict, rows: list[dict]) -> dict:
    out = {"acc": _number(result.get("acc,none")), "acc_stderr": _number(result.get("acc_stderr,none"))}
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
    }


def find_baseline(config: EvalConfig, key: dict) -> dict:
    """The stage 1 run to compare with: ``--baseline`` (refused unless it matches), else the latest matching one."""
    from ablate.identity import describe, mismatch

    if config.baseline:
        run = rundir.explicit_run(config.baseline, STAGE1, "--baseline")
        differs = mismatch(key, run.metrics.get("comparison"))
        if differs:
            found = run.metrics.get("comparison") or {}
            detail = (f" (it evaluated {describe(found.get('model'))}, this run {describe(key['model'])})"
                      if "model" in differs else "")
            raise BadInput(f"--baseline {config.baseline} differs from this run in {', '.join(differs)}{detail}; "
                           "a comparison needs the same model, tasks, data and settings")
        rundir.refuse_gated(run, config.ignore_gate)
        return {"run": run}
    run = rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE,
                        where=lambda r: r.metrics.get("comparison") == key)
    if run:
        rundir.refuse_gated(run, config.ignore_gate)
        return {"run": run}
    where = Path(config.runs_dir) / STAGE1
    newest = rundir.latest(Path(config.runs_dir), STAGE1, statuses=rundir.USABLE)
    if newest is None:
        return {"reason": f"no completed stage 1 run in {where}"}
    differs = mismatch(key, newest.metrics.get("comparison"))
    return {"reason": f"no completed stage 1 run in {where} matches this run; the latest "
                      f"({newest.run_id}) differs in {', '.join(differs)}"}


def compare(metrics: dict, baseline: dict) -> dict:
    run = baseline.get("run")
    if run is None:
        log.warning("no stage 1 baseline: %s", baseline["reason"])
        return {"run": None, "reason": baseline["reason"]}

    def delta(now, before):
        if now is None or before is None:
            return {"acc_baseline": before, "delta": None, "retention": None}
        # Retention is undefined when the baseline is 0; never report a huge or infinite ratio.
        return {"acc_baseline": before, "delta": now - before,
                "retention": now / before if before > 0 else None}

    return {
        "run": str(run.path),
        "run_id": run.run_id,
        "tasks": {name: delta(t["acc"], run.metrics["tasks"][name]["acc"]) for name, t in metrics["tasks"].items()},
        "macro": delta(metrics["macro"]["acc"], run.metrics["macro"]["acc"]),
    }
