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
weights, after one untimed step of each. Reported: real (non-padding) tokens per second over the Trainer's
own ``train_runtime`` (the figure stage 3's summary.json records; checkpoints off), the positions fed, the
padding fraction, the ratio packed/padded, and whether the per-step losses of the first runs agree (the same
rows and objective).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import asdict
from pathlib import Path

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


STAGE3_MODES = ("padded", "packed")
LOSS_TOLERANCE = 1e-4  # float32: the same rows and objective, only the order of the sums differs


def demo_stage3_data(seed: int = 0, echo=print) -> dict:
    """The demo's stage 3 rows for ``seed`` as ``ablate demo`` builds them (ablate.demo.real.build), built once
    into the cache without running the demo; returns build's paths (``train``, ``heldout``, ``tasks``, ...)."""
    import hashlib
    import json

    from ablate.core.assets import cache_root, gsm8k
    from ablate.demo.real import REAL_PRESETS, build
    from ablate.results.files import write_json

    preset = REAL_PRESETS["real"]
    digest = hashlib.sha256(json.dumps(asdict(preset), sort_keys=True).encode()).hexdigest()[:8]  # the demo's name
    world = cache_root() / "data" / "stage3" / f"real-seed{seed}-{digest}"
    done = world / "bench-paths.json"  # written after build's last file: the rows are complete
    if not done.is_file():
        echo(f"building the demo's stage 3 rows (seed {seed}) in {world}")
        write_json(done, {k: str(v) for k, v in build(world, gsm8k(echo), preset, seed).items()})
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


def stage3_config(model: str, data: str, eval_data: str | None, mask: str, seed: int, **given):
    """Stage 3's config with the demo's settings (ablate.demo.real.study_values), then ``given`` (None: not
    given); checkpoints are left to ``_train_once``, which turns them off."""
    from ablate.demo.real import REAL_PRESETS, study_values
    from ablate.stages.config import load_finetune_config

    paths = {"train": data, "heldout": eval_data, "tasks": ""}
    values = study_values(model, paths, REAL_PRESETS["real"], seed, "auto", Path("."))["stage3"]
    values.update(model=model, data=data, eval_data=eval_data, mask=mask, seed=seed, logging_steps=1,
                  runs_dir="runs")  # a loss every step
    values.update({k: v for k, v in given.items() if v is not None})
    values["save_steps"] = values["max_steps"]
    return load_finetune_config(values)


def _train_once(config, prepared, initial: dict, mode: str, output_dir: str) -> dict:
    """``config.max_steps`` steps of stage 3's Trainer on ``mode`` batches, from the ``initial`` weights."""
    import torch
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import SaveStrategy

    from ablate.stages.stage3_finetune import MaskedTrainer

    gc.collect()  # the last run's Trainer (optimizer state) is gone before this one is measured
    model = prepared.model
    model.load_state_dict(initial)
    model.config.use_cache = False
    on_gpu = next(model.parameters()).is_cuda
    args = config.training_arguments(Path(output_dir), on_gpu)
    args.save_strategy = SaveStrategy.NO  # a checkpoint is not training: out of the timed loop
    trainer = MaskedTrainer(model=model, args=args, train_dataset=[asdict(e) for e in prepared.train],
                            data_collator=prepared.collate if mode == "packed" else prepared.padded,
                            mask_name=config.mask)
    trainer.remove_callback(ProgressCallback)  # the bench prints one line a run instead
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = trainer.train().metrics["train_runtime"]
    return {"seconds": seconds, "tokens_fed": trainer.tokens_fed(),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}


def run_stage3_bench(model: str, data: str | None = None, masks: tuple[str, ...] = ("causal", "prefill_bidir"),
                     steps: int | None = None, repeats: int = 2, batch_size: int | None = None,
                     max_length: int | None = None, pack_length: int | None = None, device: str = "auto",
                     dtype: str = "auto", attn_implementation: str = "sdpa", seed: int = 0, echo=print) -> dict:
    """Packed vs padded stage 3 training under each mask; ``model`` smollm2: the fetched SmolLM2; ``data`` None:
    the demo's stage 3 rows for ``seed``.

    Unset settings are the demo's (batch 12, max length 128, its 12 steps, learning-rate schedule). Raises
    BadInput for bad settings (before any data is built or model loaded) and when packing cannot be exact."""
    import tempfile

    from ablate.errors import BadInput
    from ablate.stages.stage3_setup import prepare, prepare_data

    for flag, value in (("--steps", steps), ("--repeats", repeats)):  # stage 3 would name --max-steps
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    if not masks:
        raise BadInput("--mask names no mask; give e.g. causal,prefill_bidir")
    given = dict(max_steps=steps, batch_size=batch_size, max_length=max_length, pack_length=pack_length,
                 dtype=dtype, attn_implementation=attn_implementation, device=device, packing=True)
    for mask in masks:  # every setting checked before the demo's rows are built: a bad flag writes nothing
        stage3_config(model, data or "the demo's rows", None, mask, seed, **given)
    if model == "smollm2":  # the fetched SmolLM2, as `ablate bench` names it
        from ablate.core.assets import smollm2

        model = str(smollm2(echo))
    paths = demo_stage3_data(seed, echo) if data is None else {"train": data, "heldout": None}
    configs = {m: stage3_config(model, str(paths["train"]), paths["heldout"] and str(paths["heldout"]), m, seed,
                                **given) for m in masks}
    device = resolve_device(device)
    first = configs[masks[0]]
    prepared = prepare(first, device)  # stage 3's data, model and collators; the guard on masks[0]
    for mask in masks[1:]:
        prepare_data(configs[mask], prepared.tokenizer)  # the guard on each other mask
    if not prepared.packing["packed"]:
        raise BadInput(f"packing is off for this model ({prepared.packing['unpacked_because']}): nothing to compare")
    initial = {k: v.detach().to("cpu", copy=True) for k, v in prepared.model.state_dict().items()}
    resolved_dtype = str(next(prepared.model.parameters()).dtype).replace("torch.", "")
    out = {"model": model, "data": str(paths["train"]), "rows": len(prepared.train), "device": device,
           "dtype": resolved_dtype, "attn_implementation": attn_implementation, "batch_size": first.batch_size,
           "max_length": first.max_length, "pack_length": prepared.packing["pack_length"],
           "row_attention": prepared.packing["row_attention"], "steps": first.max_steps,
           "repeats": repeats, "warmup": "one untimed step of each, per mask", "seed": seed, "masks": {}}
    # On a GPU the Trainer autocasts to bf16 (ablate.stages.config), so the losses agree to bf16's precision.
    tolerance = LOSS_TOLERANCE if resolved_dtype == "float32" and not device.startswith("cuda") else 2e-2
    with tempfile.TemporaryDirectory(prefix="ablate-bench-stage3-") as scratch:
        for mask, config in configs.items():
            warm = dataclasses.replace(config, max_steps=1, save_steps=1)
            for mode in STAGE3_MODES:  # untimed: the first run's one-off costs would fall on padded alone
                _train_once(warm, prepared, initial, mode, scratch)
            runs = {m: [] for m in STAGE3_MODES}
            for r in range(repeats):
                for mode in STAGE3_MODES if r % 2 == 0 else STAGE3_MODES[::-1]:
                    run = _train_once(config, prepared, initial, mode, scratch)
                    runs[mode].append(run)
                    echo(f"{mask}: {mode} run {r + 1}/{repeats}: {run['seconds']:.1f} s, "
                         f"{run['tokens_fed']['real'] / run['seconds']:.0f} real tokens/s")
            out["masks"][mask] = _stage3_figures(runs, tolerance)
    return out


def _stage3_figures(runs: dict, tolerance: float) -> dict:
    fed = {m: runs[m][0]["tokens_fed"] for m in STAGE3_MODES}
    speed = {m: statistics.median(r["tokens_fed"]["real"] / r["seconds"] for r in runs[m]) for m in STAGE3_MODES}
    losses = {m: runs[m][0]["losses"] for m in STAGE3_MODES}
    difference = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"], strict=True))
    return {
        "seconds": {m: [round(r["seconds"], 3) for r in runs[m]] for m in STAGE3_MODES},
        "real_tokens_per_second": {m: round(s, 1) for m, s in speed.items()},
        "ratio": round(speed["packed"] / speed["padded"], 3),
        "tokens_fed": fed,  # per run: real tokens, positions (padding included), positions through the head
        "same_rows": fed["padded"]["real"] == fed["packed"]["real"],
        "padding_fraction": {m: round(1 - f["real"] / f["positions"], 4) for m, f in fed.items()},
        "losses": losses,  # per step, the first run of each
        "max_loss_difference": difference,
        "loss_tolerance": tolerance,
        "losses_agree": difference <= tolerance,
        "peak_memory_bytes": {m: max((r["peak_memory_bytes"] or 0) for r in runs[m]) or None for m in STAGE3_MODES},
    }


def _pack_layout(result: dict) -> str:
    length = (f"pack length {result['pack_length']}" if result["pack_length"] else
              "each micro-batch packed into one sequence")
    return length + (", attention per row" if result.get("row_attention") else ", one attention over each sequence")


def render_stage3(result: dict) -> str:
    lines = [f"stage 3 on {result['model']} ({result['device']}, {result['dtype']}, {result['attn_implementation']}): "
             f"{result['rows']} rows from {result['data']}, batch {result['batch_size']}, max length "
             f"{result['max_length']}, {_pack_layout(result)}, {result['steps']} steps, "
             f"{result['repeats']} run(s) each",
             f"{'mask':<15}{'padded tok/s':>13}{'packed tok/s':>13}{'ratio':>7}{'real tok':>9}{'padded pos':>11}"
             f"{'packed pos':>11}{'padded pad':>11}{'packed pad':>11}{'padded head':>12}{'packed head':>12}"
             "  losses agree (max |d|)"]
    for mask, t in result["masks"].items():
        speed, fed, pad = t["real_tokens_per_second"], t["tokens_fed"], t["padding_fraction"]
        lines.append(f"{mask:<15}{speed['padded']:>13.0f}{speed['packed']:>13.0f}{t['ratio']:>7.2f}"
                     f"{fed['packed']['real']:>9}{fed['padded']['positions']:>11}{fed['packed']['positions']:>11}"
                     f"{pad['padded']:>11.1%}{pad['packed']:>11.1%}{fed['padded']['head']:>12}"
                     f"{fed['packed']['head']:>12}  {str(t['losses_agree']):<5} "
                     f"({t['max_loss_difference']:.1e})")
    return "\n".join(lines)
