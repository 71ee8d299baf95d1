"""Benchmarks in one process, alternating so that warm-up and a busy machine fall on both sides.

    ablate fetch
    ablate bench --model smollm2 --tasks gsm8k_next_step --limit 100   # the demo's task (built from GSM8K)
    ablate bench-stage3 --steps 3 --repeats 2                           # stage 3: packed vs padded batches
    ablate tiny-model --out /tmp/tiny && ablate bench-stage3 --model /tmp/tiny --data tests/data/sft.jsonl \
        --steps 2 --batch-size 4 --max-length 64 --device cpu          # tiny CPU example

``run_bench``: for each task, stock lm-eval's HF model (``HFLM``, causal) and ablate's
(``PrefillMaskLM``, causal, prefix-shared) evaluate the same documents
``repeats`` times each, in alternating order. Reported per task: the median wall seconds of each, their
ratio, the tokens each put through the model (stock: one forward per request),
tokens per second, whether every prediction is identical, and the largest
loglikelihood difference. Timings are wall-clock of the whole ``simple_evaluate``.

``run_stage3_bench``: per mask, stage 3's own Trainer (``MaskedTrainer`` on the rows, collators and settings
``ablate.stages.stage3_setup.prepare`` gives a stage 3 run) takes ``steps`` optimizer steps on padded and on
packed batches, ``repeats`` times each (padded, packed, packed, padded, ...), each from the model's initial
weights. Reported: real (non-padding) tokens per second over the Trainer's own ``train_runtime`` (the figure
stage 3's summary.json records; checkpoints off), the positions fed, the padding fraction, the ratio
packed/padded, and whether the per-step losses of the first runs agree (the same rows and objective).
"""

from __future__ import annotations

import statistics
import time

from ablate.core.lm_eval_model import PrefillMaskLM, sample_rows
from ablate.core.models import load_model, resolve_device
from ablate.core.tasks import check_task_names, load_tasks, task_manager


def _evaluate(lm, task, manager, limit):
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=True, bootstrap_iters=0,
                              task_manager=manager, verbosity="ERROR")
    seconds = time.perf_counter() - started
    rows = sample_rows(next(iter(results["samples"].values())))
    return seconds, rows


def run_bench(model: str, tasks: list[str], task_data: dict, limit: int | None, batch_size: str = "8",
              device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa", repeats: int = 2,
              echo=print, include_path: str | None = None) -> dict:
    from lm_eval.models.huggingface import HFLM

    device = resolve_device(device)
    manager = task_manager(include_path, tasks)  # tasks first: a mistyped name costs no model load
    check_task_names(manager, tasks)
    built = load_tasks(manager, tasks, task_data)
    lm_model, tokenizer = load_model(model, device, dtype, attn_implementation)
    out = {"model": model, "device": device, "dtype": str(lm_model.dtype).replace("torch.", ""),
           "attn_implementation": attn_implementation, "batch_size": batch_size, "limit": limit,
           "repeats": repeats, "tasks": {}}
    for name, task in built.items():
        seconds = {"stock": [], "ablate": []}
        rows, tokens = {}, {}
        for r in range(repeats):
            for which in (("stock", "ablate") if r % 2 == 0 else ("ablate", "stock")):
                kwargs = dict(pretrained=lm_model, tokenizer=tokenizer, batch_size=batch_size, device=device)
                lm = HFLM(backend="causal", **kwargs) if which == "stock" else PrefillMaskLM(mask="causal", **kwargs)
                s, rows[which] = _evaluate(lm, task, manager, limit)
                seconds[which].append(s)
                if which == "ablate":
                    tokens = {"stock": lm.tokens_unshared, "ablate": lm.tokens_processed, "unique": lm.tokens_unique}
                echo(f"{name}: {which} run {r + 1}/{repeats}: {s:.1f} s")
        stock, ours = statistics.median(seconds["stock"]), statistics.median(seconds["ablate"])
        pairs = list(zip(rows["stock"], rows["ablate"], strict=True))
        out["tasks"][name] = {
            "documents": len(pairs),
            "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
            "wall_ratio": round(stock / ours, 3),
            "tokens": tokens,
            "token_ratio": round(tokens["stock"] / tokens["ablate"], 3),
            "tokens_per_second": {"stock": round(tokens["stock"] / stock, 1),
                                  "ablate": round(tokens["ablate"] / ours, 1)},
            "identical_predictions": all(a["pred"] == b["pred"] for a, b in pairs),
            "max_loglikelihood_difference": max(abs(x - y) for a, b in pairs
                                                for x, y in zip(a["logprobs"], b["logprobs"], strict=True)),
            "accuracy": {"stock": sum(a["correct"] for a, _ in pairs) / len(pairs),
                         "ablate": sum(b["correct"] for _, b in pairs) / len(pairs)},
        }
    return out


def render(result: dict) -> str:
    lines = [f"model {result['model']} on {result['device']} ({result['dtype']}, {result['attn_implementation']}), "
             f"batch size {result['batch_size']}, limit {result['limit']}, {result['repeats']} run(s) each",
             f"{'task':<16}{'docs':>6}{'stock s':>9}{'ablate s':>10}{'ratio':>7}{'tok ratio':>10}"
             f"{'stock tok/s':>12}{'ablate tok/s':>13}  same preds  max |dLL|"]
    for name, t in result["tasks"].items():
        lines.append(f"{name:<16}{t['documents']:>6}{statistics.median(t['seconds']['stock']):>9.1f}"
                     f"{statistics.median(t['seconds']['ablate']):>10.1f}{t['wall_ratio']:>7.2f}"
                     f"{t['token_ratio']:>10.2f}{t['tokens_per_second']['stock']:>12.0f}"
                     f"{t['tokens_per_second']['ablate']:>13.0f}  {str(t['identical_predictions']):<10}  "
                     f"{t['max_loglikelihood_difference']:.1e}")
    return "\n".join(lines)
