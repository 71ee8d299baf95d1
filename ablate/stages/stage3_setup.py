"""Stage 3 before its run folder exists: the data, the model and the Trainer's settings, each checked.

    python -m pytest tests/test_bad_input.py -q -k stage3

``prepare`` returns everything a run needs as one frozen ``Prepared``; what can be refused (data with no
supervised token, a label-leaking mask, a LoRA adapter as the model, LoRA targets the model lacks, a
scheduler the Trainer refuses) is refused here with ``BadInput``, before ``run_stage3`` creates the folder.
Training batches are packed (ablate.core.sft_packing) unless ``--no-packing``, or unless packing cannot be
exact for the model (an attention implementation without a 4D mask, a forward without position ids): then
they are padded, and one log line says why.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ablate.core.leakage import find_leak
from ablate.core.sft_data import Collator, data_identity, load_rows, refuse_unsupervised, split_eval, tokenize
from ablate.core import layer_masks
from ablate.core.row_attention import ROW_ATTENTION, has_row_attention
from ablate.core.sft_packing import MIN_SAVING, MIN_SAVING_PER_ROW, PackingCollator, packing_refusal
from ablate.errors import BadInput
from ablate.stages.config import FinetuneConfig

log = logging.getLogger(__name__)
GUARD_EXAMPLES = 256  # examples the structural guard inspects (the mask is per-row, so a sample suffices)


@dataclass(frozen=True)
class Prepared:
    """What a stage 3 run trains on, all of it checked."""

    model: Any  # on its device, LoRA-wrapped when --lora-r is set
    tokenizer: Any
    train: list  # tokenized training examples (ablate.core.sft_data.Tokenized)
    held: list  # held-out examples: the eval loss and the probe
    collate: Collator | PackingCollator  # the training batches' (evaluation's are padded: ``padded``)
    padded: Collator
    packing: dict  # whether training batches are packed, into how many tokens, or why not
    leak: Any  # the first label leak of the mask, or None (a leaky mask runs only with --allow-label-leakage)
    probe_batch: dict  # the study's probe: held-out examples under the mask and causally, before and after
    identity: dict  # the base model's identity, recorded in run.json (what stage 4 and --resume check)
    data_identity: dict  # the data files' digests, taken before they were read (what --resume checks)
    mask_layers: tuple[int, ...] | None = None  # the layers under the mask (ablate.core.layer_masks); None: all


def prepare(config: FinetuneConfig, device: str, is_main: bool = True) -> Prepared:
    """Everything a run needs, each part checked (data, model, LoRA targets, Trainer settings). Raises BadInput."""
    from ablate.core.identity import model_identity
    from ablate.core.models import load_model, load_tokenizer

    refuse_adapter(config.model)
    tokenizer = load_tokenizer(config.model)
    data_id = data_identity(config.data, config.eval_data)  # digested before it is read: what --resume checks
    train, held, collate, leak = prepare_data(config, tokenizer)  # before the (slow) fingerprint and model load
    identity = model_identity(config.model)
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation, tokenizer)
    padded = Collator(tokenizer.pad_token_id)
    packing = {"packed": isinstance(collate, PackingCollator), "pack_length": getattr(collate, "pack_length", None),
               "unpacked_because": None if config.packing else "--no-packing", "row_attention": False}
    if packing["packed"] and (why := packing_refusal(model)):
        # The guard passed on packed batches; it gives padded ones the same verdict (tests/test_sft_packing.py).
        log.warning("packing off: %s; training on padded batches", why)
        collate, packing = padded, {"packed": False, "pack_length": None, "unpacked_because": why,
                                    "row_attention": False}
    elif packing["packed"]:
        packing["row_attention"] = has_row_attention(model)  # MaskedTrainer attends per row where it can
        if collate.pack_length is None and not packing["row_attention"]:  # not what transformers resolved
            collate = packing_collator(config, tokenizer.pad_token_id, per_row=False)  # the guard read both
            packing["pack_length"] = collate.pack_length
    mask_layers = layer_masks.install(model, config.mask_layers)  # hooks on the base model's attention modules
    model = with_lora(config, model) if config.lora_r else model
    if not any(p.requires_grad for p in model.parameters()):
        raise BadInput(f"--model {config.model} loaded with no trainable parameter; nothing to finetune")
    check_schedule(config, next(model.parameters()).is_cuda, is_main)
    probe_batch = collate([asdict(e) for e in held[: config.probe_samples]])
    return Prepared(model, tokenizer, train, held, collate, padded, packing, leak, probe_batch, identity, data_id,
                    mask_layers)


def prepare_data(config: FinetuneConfig, tokenizer):
    """Read, tokenize and split the data; check the mask for leakage on the batches training will see (packed
    unless --no-packing). Raises BadInput."""
    fmt = config.row_format()
    kw = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length, split_range=config.split_range,
              truncate_prompts=config.truncate_prompts, seed=config.seed)
    rows = load_rows(config.data, fmt)
    examples = tokenize(rows, **kw)
    refuse_unsupervised(examples, len(rows), f"--data {config.data}", config.max_length)
    if config.eval_data:
        eval_rows = load_rows(config.eval_data, fmt)
        held = tokenize(eval_rows, **kw)
        refuse_unsupervised(held, len(eval_rows), f"--eval-data {config.eval_data}", config.max_length)
        train = examples
    else:
        train, held = split_eval(examples, config.eval_fraction, config.seed)
        refuse_unsupervised(train, len(train), f"--data {config.data} (training split)", config.max_length)
        refuse_unsupervised(held, len(held), f"--data {config.data} (held-out split)", config.max_length)
    pad = tokenizer.pad_token_id
    collate = packing_collator(config, pad) if config.packing else Collator(pad)
    guarded = [asdict(e) for e in train[:GUARD_EXAMPLES]]
    # A packing collator returns the padded layout for a batch that packing would barely shorten: guard both,
    # and the pack-length layout a model without per-row attention gets instead of one sequence.
    layouts = [collate] + ([Collator(pad), packing_collator(config, pad, per_row=False)] if config.packing else [])
    leak = next((found for layout in layouts if (found := find_leak(config.mask, layout(guarded)))), None)
    if leak and leak.other_row is not None:  # a packing fault, not a property of the mask: no flag allows it
        raise BadInput(f"packed batches are not kept apart ({leak}); train with --no-packing")
    if leak and not config.allow_label_leakage:
        raise BadInput(f"mask '{config.mask}' leaks labels ({leak}); training on it teaches copying, "
                       "not prediction. Use prefill_bidir, or --allow-label-leakage for diagnosis only")
    return train, held, collate, leak


def packing_collator(config: FinetuneConfig, pad: int, per_row: bool | None = None) -> PackingCollator:
    """Stage 3's packing: under an attention with a per-row form (sdpa: ablate.core.row_attention) the whole
    micro-batch in one sequence unless --pack-length caps it; otherwise into --pack-length, default --max-length,
    only where that saves MIN_SAVING of the positions."""
    per_row = config.attn_implementation in ROW_ATTENTION if per_row is None else per_row
    if per_row:
        return PackingCollator(pad, config.pack_length, MIN_SAVING_PER_ROW)
    return PackingCollator(pad, config.pack_length or config.max_length, MIN_SAVING)


def refuse_adapter(model: str) -> None:
    """A LoRA adapter folder is not a model to finetune (it would load merged, with nothing left to train)."""
    adapter = Path(model).expanduser() / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        raise BadInput(f"--model {model} is a LoRA adapter (adapter_config.json), not a model; finetune its base "
                       f"model{f' ({base})' if base else ''}, with --lora-r for a new adapter, or merge it first")


def lora_targets(spec: str):
    """``--lora-target-modules``: ``all-linear``, module names (``q_proj,v_proj``, matched by suffix), or a regex.

    peft reads a single string as a regex over full module names, so a bare ``q_proj`` would match nothing.
    """
    names = [name.strip() for name in spec.split(",")]
    return names if spec != "all-linear" and all(re.fullmatch(r"[\w.]+", n) for n in names) else spec


def with_lora(config: FinetuneConfig, model):
    """The model with a fresh LoRA adapter; target modules the model does not have are refused, naming its layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)  # the adapter's initialisation: the Trainer seeds only later
    try:
        return get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config.lora_target_modules), task_type="CAUSAL_LM"))
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise BadInput(f"--lora-target-modules {config.lora_target_modules}: {str(exc).splitlines()[0]} "
                       f"(the model's linear layers: {', '.join(linear)})") from None


def check_schedule(config: FinetuneConfig, on_gpu: bool, is_main: bool) -> None:
    """The Trainer's own checks of its arguments and learning-rate schedule, run before the run folder exists
    (``reduce_lr_on_plateau`` needs --eval-steps; ``cosine_with_min_lr`` needs arguments ablate does not pass)."""
    import torch
    from transformers import get_scheduler

    try:
        args = config.training_arguments(Path(config.runs_dir) / config.stage, on_gpu, is_main)  # creates nothing
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                      num_training_steps=args.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"the Trainer refuses --lr-scheduler {config.lr_scheduler} with these settings: "
                       f"{str(exc).splitlines()[0]}") from None
