"""One lm-eval evaluation run under a mask: what stages 1, 2 and 4 share.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu

Everything that can be checked (mask, tasks, task data, model, the runs
folder, a named baseline) is checked before a run directory exists, so bad
input leaves nothing behind. ``evaluation_run`` is the one life cycle of an
evaluation run (claim, running, config/env, gate, status); ``run_eval`` (stages
1 and 2) and ``run_stage4`` hold only their inputs and their work. ``prepare``
builds the inputs (tasks, task data, comparison record) once: ``ablate study``
looks for a reusable run with them and hands them to the stage it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ablate.results import rundir
from ablate.results.files import write_jsonl
from ablate.core import layer_masks
from ablate.core.masks import MASKS
from ablate.results.environment import environment
from ablate.results.gates import check_gate
from ablate.results.samples import macro, record_files, task_metrics
from ablate.stages.checks import check_generation, segment_separator
from ablate.stages.config import EvalConfig
from ablate.errors import BadInput
from ablate.faults import fault_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalInputs:
    """An evaluation's checked inputs, built once (``prepare``): the ``config`` they were built for, lm-eval's task
    ``manager``, the ``task_data`` files, the built ``tasks`` and the comparison record ``key``."""

    config: EvalConfig
    manager: object
    task_data: dict[str, Path]
    tasks: dict
    key: dict


def prepare(config: EvalConfig, device: str | None = None) -> EvalInputs:
    """``check_inputs`` and ``comparison_key`` for ``config``; raises BadInput."""
    from ablate.core.identity import model_identity
    from ablate.core.models import resolve_device

    manager, task_data, tasks = check_inputs(config)
    key = comparison_key(config, task_data, model_identity(config.model), tasks, manager,
                         device or resolve_device(config.device))
    return EvalInputs(config, manager, task_data, tasks, key)


def comparison_key(config: EvalConfig, task_data: dict[str, Path], model_identity: dict, tasks: dict, manager,
                   device: str | None = None) -> dict:
    """What must agree for two evaluation runs to be compared document by document: identities, not paths.

    Each task is what lm-eval resolved (``ablate.core.identity.task_identity``); the mask is left out, being
    what stage 2 changes. ``tasks`` and ``manager`` are what ``check_inputs`` built.
    dtype and attention are what is asked for; the run refuses a model that transformers resolved otherwise
    (``ablate.core.models.check_resolved``, after the load, before the run folder), so they are what ran.
    """
    from ablate.core.identity import task_identity
    from ablate.core.lm_eval_model import task_entry
    from ablate.core.models import resolve_device, resolve_dtype

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
    tasks = load_tasks(manager, list(config.tasks), task_data)
    check_metrics(tasks)
    check_fewshot(tasks, config.num_fewshot)
    return manager, task_data, tasks


def check_metrics(tasks: dict) -> None:
    """Each task computes what ablate scores a document by (multiple choice: ``acc``; generation:
    ``exact_match``); without it the samples have no right or wrong, found only after the evaluation."""
    for name, task in sorted(tasks.items()):
        needed = "exact_match" if task.OUTPUT_TYPE == "generate_until" else "acc"
        computed = sorted(task.aggregation())
        if needed not in computed:
            raise BadInput(f"task '{name}' computes {', '.join(computed) or 'no metric'}; ablate scores a "
                           f"{task.OUTPUT_TYPE} document by {needed}: add it to the task's metric_list")


def check_fewshot(tasks: dict, num_fewshot: int | None) -> None:
    """Each task's few-shot pool holds the examples asked for; lm-eval (0.4.13) would fail on its first document.

    The number is simple_evaluate's: a task whose YAML says 0 keeps 0, else ``--num-fewshot``, else its YAML's.
    """
    for name, task in sorted(tasks.items()):
        default = task.get_config("num_fewshot")
        shots = (default if default == 0 or num_fewshot is None else num_fewshot) or 0
        if not shots:
            continue
        sampler = getattr(task, "sampler", None)
        pool = len(sampler.fewshot_docs()) if sampler is not None else 0
        cfg = task.config
        split = task.fewshot_cfg.split or (cfg.training_split if task.has_training_docs() else
                                           cfg.validation_split if task.has_validation_docs() else cfg.test_split)
        # Drawn from the evaluated split itself, each document's examples leave the document out (ContextSampler).
        itself = task.fewshot_cfg.split is not None and task.fewshot_cfg.split == cfg.test_split
        asked = f"--num-fewshot {shots}" if num_fewshot is not None else f"its num_fewshot {shots}"
        if pool < shots + itself:
            raise BadInput(f"task '{name}' has {pool} few-shot example(s) to draw from (its {split} split"
                           + (", less the document itself" if itself else "") + f"), fewer than {asked} needs")
        if not itself:
            _check_own_answers(name, task, sampler.fewshot_docs(), split, asked)


def _check_own_answers(name: str, task, pool, split: str, asked: str) -> None:
    """lm-eval (0.4.13, ``fewshot_context``) leaves a document out of its own examples only when the few-shot
    split is the test split by name. The same rows under two split names (``--task-data`` gives every split
    of a task the one file; a task YAML that points its train and test splits at one file) would show a
    document its own answer: refused when most evaluated documents are in the pool, counted in the log
    when a few are (a dataset's own duplicates across splits)."""
    def canon(doc):
        return json.dumps(doc, sort_keys=True, default=str)

    pooled = {canon(d) for d in pool}
    docs = list(task.eval_docs)
    shared = sum(canon(d) in pooled for d in docs)
    if docs and shared * 2 >= len(docs):
        raise BadInput(f"task '{name}' draws few-shot examples ({asked}) from its {split} split, which holds "
                       f"{shared} of its {len(docs)} evaluated documents (one file read as both splits: "
                       "--task-data gives it to every split): a document could be shown its own answer; "
                       "use --num-fewshot 0, or a task whose few-shot rows are other rows")
    if shared:
        log.warning("task %s: %d of %d evaluated documents also occur in its few-shot pool (%s split); lm-eval "
                    "does not leave them out of their own examples", name, shared, len(docs), split)


def check_lengths(config: EvalConfig, tasks: dict, tokenizer) -> None:
    """Every answer fits ``--max-length``: a scored continuation (a prompt is cut from the left, an answer
    cannot be) and a generation's ``max_gen_toks``; lm-eval and the request loop (ablate.core.lm_eval_model)
    would refuse them only once the run folder exists.

    Only with ``--max-length``: the model's own window holds any answer. Tokens are counted as lm-eval
    0.4.13's ``TemplateLM._encode_pair`` splits a pair (the context's trailing spaces go to the continuation).
    """
    from lm_eval.models.utils import normalize_gen_kwargs

    from ablate.core.lm_eval_model import PrefillMaskLM

    if config.max_length is None:
        return
    for name, task in sorted(tasks.items()):
        if task.OUTPUT_TYPE == "generate_until":  # HFLM.generate_until keeps max_gen_toks of the window for the answer
            gen = normalize_gen_kwargs(dict(task.config.generation_kwargs or {}),
                                       PrefillMaskLM.max_gen_toks.fget(None))["max_gen_toks"]
            if gen >= config.max_length:
                raise BadInput(f"task '{name}' generates up to {gen} tokens (its max_gen_toks), leaving no room for "
                               f"a prompt in --max-length {config.max_length}; raise --max-length above {gen}")
            continue
        docs = list(task.eval_docs)
        limit = config.lm_eval_limit
        n = len(docs) if limit is None else int(limit) if limit >= 1 else math.ceil(limit * len(docs))
        for doc_id, doc in enumerate(docs[:n]):
            requests = task.construct_requests(doc=doc, ctx=task.fewshot_context(doc, 0), metadata=(name, doc_id, 1))
            for request in requests if isinstance(requests, list) else [requests]:
                context, continuation = request.args
                spaces = len(context) - len(context.rstrip())
                context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
                tokens = len(tokenizer(context + continuation, add_special_tokens=False)["input_ids"]) - (
                    len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0)
                if not 0 < tokens <= config.max_length:
                    raise BadInput(f"task '{name}': document {doc_id} has an answer of {tokens} tokens "
                                   f"({continuation.strip()[:40]!r}), " + (f"more than --max-length {config.max_length}"
                                   " holds; raise --max-length" if tokens else "which cannot be scored"))


def evaluate(config: EvalConfig, model, tokenizer, device: str, mask: str, tasks, manager,
             mask_layers: str | None = None) -> dict:
    """One lm-eval pass: ``{"tasks", "macro", "timing", "oom_retries", "mask_layers", "rows"}`` (rows: per-task
    sample rows; mask_layers: the layers ``mask`` was applied in, ``ablate.core.layer_masks.record``, None for
    all);
    None on ranks > 0."""
    from lm_eval import simple_evaluate

    from ablate.core.lm_eval_model import PrefillMaskLM, sample_rows

    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask=mask, mask_layers=mask_layers, device=device,
                       batch_size=config.batch_size, max_length=config.max_length,
                       segment_separator=segment_separator(mask, tasks))
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
        "mask_layers": layer_masks.record(lm.mask_layers, layer_masks.num_layers(model.config)),
        # segment masks: where the prompts were cut and how many segments they had (ablate.core.segments)
        **({"segments": lm.segments.record()} if lm.segments is not None else {}),
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


def eval_state(device: str):
    """accelerate's ``PartialState``: under torchrun / ``accelerate launch`` each process is one rank (on CPU
    accelerate joins the processes only when told: gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


@dataclass
class EvaluationRun:
    """A claimed evaluation run: its folder, and the ``metrics`` the body sets on rank 0 (left None elsewhere)."""

    path: Path
    is_main: bool
    metrics: dict | None = None


@contextmanager
def evaluation_run(config_record: dict, stage: str, runs_dir: Path, state, device: str,
                   model_identity: dict | None = None, gate: dict | None = None):
    """The life cycle of every evaluation run (stages 1, 2 and 4), written once.

    Rank 0 claims a new run folder (``run.json`` records ``model_identity`` when given) and every rank gets its
    path (``accelerate launch``); the run is marked running (heartbeat, signals, ``run.log``; ``failed`` with the
    reason if the body raises) and rank 0 writes ``config.json`` (``config_record``) and ``env.json``. The body
    evaluates and sets ``run.metrics`` (rank 0); on leaving, the digests of config.json and env.json go into it
    (``files``) with the run's peak memory (``peak_memory``, ablate.core.memory), the ``gate`` is checked (``gated``
    with the reason), and metrics.json and status.txt are written.
    Everything checkable is checked before this is entered: bad input leaves no folder.
    """
    from ablate.core.memory import PeakMemory

    record = {"model_identity": model_identity} if model_identity is not None else {}
    memory = PeakMemory(device)  # from here: the model is loaded, the evaluation is to come
    run = EvaluationRun(rundir.claim(state, lambda: rundir.new_run_dir(Path(runs_dir), stage, **record)),
                        state.is_main_process)
    with rundir.active(run.path, is_main=run.is_main):
        if run.is_main:
            rundir.write_json(run.path / "config.json", config_record)
            rundir.write_json(run.path / "env.json", environment(device))
        yield run
        if run.is_main and run.metrics is not None:
            metrics = run.metrics
            metrics["files"] = record_files(run.path)  # as written; a reader refuses them edited
            metrics["peak_memory"] = memory.read()  # a measurement: not among the numbers a reader verifies
            gated = check_gate(gate, metrics)
            if gated:
                metrics["status"] = rundir.GATED
                log.warning("run %s is gated: %s", run.path, gated)
            rundir.write_json(run.path / "metrics.json", metrics)
            rundir.set_status(run.path, metrics["status"], gated or "")


def run_eval(config: EvalConfig, compare=None, inputs: EvalInputs | None = None, loaded=None) -> Path | None:
    """Evaluate ``config.model`` into a new run; ``compare(key)`` (stage 2) is called before the model loads
    and returns what to add to ``metrics.json`` once the results are in: ``finish(metrics, rows) -> dict``,
    ``rows`` being each task's per-document rows. ``inputs``: what ``prepare(config)`` built (else built here);
    ``loaded``: ``(model, tokenizer)`` already loaded for ``config`` (``ablate sweep``), else loaded here.

    Under ``accelerate launch`` every process scores its share of the documents (lm-eval's data-parallel
    split) and rank 0 writes the run; the other ranks return None.
    """
    from ablate.core.models import check_resolved, load_model, resolve_device

    started = time.time()
    device = resolve_device(config.device)
    state = eval_state(device)
    if inputs is None:
        inputs = prepare(config, device)
    elif inputs.config != config:
        raise ValueError(f"run_eval: inputs were prepared for another config than this {config.stage} run's")
    manager, tasks, key = inputs.manager, inputs.tasks, inputs.key
    finish = compare(key) if compare else None
    rundir.check_writable(Path(config.runs_dir), config.stage)
    model, tokenizer = loaded or load_model(config.model, device, config.dtype, config.attn_implementation)
    check_resolved(model, key, f"model '{config.model}'")
    check_lengths(config, tasks, tokenizer)
    layer_masks.check_spec(config.mask_layers, model)  # its layers exist, before the run folder does
    segment_separator(config.mask, tasks)  # a segment mask has its separator, before the run folder does
    check_generation(config.mask, tasks)

    with evaluation_run(config.to_dict(), config.stage, config.runs_dir, state, device, key["model"],
                        config.gate) as run:
        log.info("run %s: %s on %s with mask %s", run.path, config.model, ",".join(config.tasks), config.mask)
        fault_point("eval")
        result = evaluate(config, model, tokenizer, device, config.mask, tasks, manager, config.mask_layers)
        if result is None:  # another rank: its documents went to rank 0, which writes the run
            return None
        rows = result.pop("rows")
        metrics = {
            "stage": config.stage,
            "run_id": run.path.name,
            "status": rundir.COMPLETED,
            "model": config.model,
            "mask": config.mask,
            # the layers the mask was applied in (ablate.core.layer_masks.describe, resolved on this model;
            # None: every layer), popped from the result so it sits beside the mask
            "mask_layers": result.pop("mask_layers"),
            # a scored token saw its own future (a leaking mask, run with --allow-label-leakage): not a result
            "leaky": MASKS[config.mask].leaks_labels,
            "seed": config.seed,
            "comparison": key,
            **result,
            # The samples are the source of truth; a reader checks them against these and recomputes acc.
            "samples": write_samples(run.path, rows),
        }
        metrics["timing"]["wall_seconds"] = round(time.time() - started, 3)
        if finish:
            metrics["baseline"] = finish(metrics, rows)
        run.metrics = metrics
    return run.path


def primary_filter(task) -> str:
    """The filter whose exact match a generative task is scored by: the first it lists (gsm8k: strict-match)."""
    filters = getattr(task.config, "filter_list", None) or []
    return filters[0]["name"] if filters and task.OUTPUT_TYPE == "generate_until" else "none"
