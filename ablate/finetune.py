"""Stage 3: finetune with the causal mask or ``prefill_bidir``, leakage-safe, resumable.

    ablate tiny-model --out /tmp/tiny && \
    ablate stage3 --mask prefill_bidir --model /tmp/tiny --data tests/data/sft.jsonl --max-steps 20 --device cpu

The Hugging Face Trainer does the training (so ``accelerate launch`` spreads it
over several processes unchanged); ``MaskedTrainer`` only turns each batch's
``prefix_len`` into the attention mask. Before the first step the mask is checked
structurally for label leakage and the study's probe is run; after the last, the
model is saved with the raw state-dict fallback (ablate.checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ablate import rundir
from ablate.checkpoints import save_final, save_raw
from ablate.config import FinetuneConfig
from ablate.errors import BadInput
from ablate.leakage import find_leak, probe
from ablate.masks import model_attention_mask
from ablate.sft_data import Collator, load_rows, split_eval, tokenize

log = logging.getLogger(__name__)
DIVERGED, LEAKY = "diverged", "leaky"
GUARD_EXAMPLES = 256  # examples the structural guard inspects (the mask is per-row, so a sample suffices)


class MaskedTrainer(Trainer):
    """The stock Trainer; each batch's ``prefix_len`` becomes the attention mask of the forward."""

    def __init__(self, *args, mask_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_name = mask_name

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        prefix_len = inputs.pop("prefix_len")
        config = self.accelerator.unwrap_model(model).config
        dtype = next(model.parameters()).dtype
        inputs["attention_mask"] = model_attention_mask(
            config, self.mask_name, inputs["attention_mask"].bool(), prefix_len, dtype)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _save(self, output_dir=None, state_dict=None):
        # Periodic checkpoints get the same fallback as the final save; the Trainer
        # resumes from a model.safetensors holding the raw state dict.
        try:
            super()._save(output_dir, state_dict)
        except Exception as exc:
            if not self.args.should_save:
                raise
            log.warning("checkpoint save_pretrained failed (%s); writing the raw state dict", exc)
            os.makedirs(output_dir, exist_ok=True)
            save_raw(self.accelerator.unwrap_model(self.model), Path(output_dir) / "model.safetensors")


class TrainLog(TrainerCallback):
    """Appends every log (loss, grad norm, learning rate, eval) to ``train_log.jsonl``; stops on divergence."""

    def __init__(self, path: Path, spike_factor: float, window: int, is_main: bool):
        self.path, self.spike_factor, self.window, self.is_main = path, spike_factor, window, is_main
        self.grad_norms: list[float] = []
        self.diverged: str | None = None
        self.last_good_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        reason = None
        if loss is not None and not math.isfinite(loss):
            reason = f"non-finite loss {loss} at step {state.global_step}"
        elif norm is not None:
            if not math.isfinite(norm):
                reason = f"non-finite grad norm at step {state.global_step}"
            elif len(self.grad_norms) >= 5:
                median = statistics.median(self.grad_norms[-self.window:])
                if median > 0 and norm > self.spike_factor * median:
                    reason = (f"grad norm {norm:.3g} at step {state.global_step} is over "
                              f"{self.spike_factor:g}x its recent median {median:.3g}")
            self.grad_norms.append(norm)
        if reason:
            self.diverged = reason
            control.should_training_stop = True
            control.should_save = False
        elif loss is not None:
            self.last_good_step = state.global_step
        return control


class KillAtStep(TrainerCallback):
    """Fault injection for the resume test: SIGKILL this process at a step (ABLATE_FAULT_KILL_AT_STEP)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (written last by the Trainer) exists, oldest first."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resumable(runs_dir: Path, stage: str) -> Path:
    runs = [r for r in rundir.find_runs(runs_dir, stage) if r.status not in (rundir.COMPLETED, DIVERGED)]
    runs = [r for r in runs if complete_checkpoints(r.path)]
    if not runs:
        raise BadInput(f"nothing to resume: no unfinished run with a complete checkpoint in {runs_dir / stage}")
    return runs[-1].path


def prepare(config: FinetuneConfig, tokenizer):
    """Read, tokenize and split the data; check the mask for leakage. Raises BadInput."""
    rows = load_rows(config.data, config.prompt_field, config.response_field, config.text_field)
    kw = dict(tokenizer=tokenizer, prompt_field=config.prompt_field, response_field=config.response_field,
              text_field=config.text_field, max_length=config.max_length, split_range=config.split_range,
              truncate_prompts=config.truncate_prompts, seed=config.seed)
    examples = tokenize(rows, **kw)
    if config.eval_data:
        held = tokenize(load_rows(config.eval_data, config.prompt_field, config.response_field, config.text_field), **kw)
        train = examples
    else:
        train, held = split_eval(examples, config.eval_fraction, config.seed)
    collate = Collator(tokenizer.pad_token_id)
    leak = find_leak(config.mask, collate([asdict(e) for e in train[:GUARD_EXAMPLES]]))
    if leak and not config.allow_label_leakage:
        raise BadInput(f"mask '{config.mask}' leaks labels ({leak}); training on it teaches copying, "
                       "not prediction. Use prefill_bidir, or --allow-label-leakage for diagnosis only")
    return train, held, collate, leak


def run_stage3(config: FinetuneConfig, resume: Path | None = None) -> Path:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from ablate.models import load_model, load_tokenizer, resolve_device

    started = time.time()
    state = PartialState()
    device = resolve_device(config.device)
    # Data and mask are checked before the (slow) model load.
    tokenizer = load_tokenizer(config.model)
    train, held, collate, leak = prepare(config, tokenizer)
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation, tokenizer)
    probe_batch = collate([asdict(e) for e in held[: config.probe_samples]])

    if resume is not None:
        run_dir = resume
    else:
        holder = [str(rundir.new_run_dir(Path(config.runs_dir), config.stage)) if state.is_main_process else None]
        run_dir = Path(broadcast_object_list(holder)[0])
    if state.is_main_process:
        rundir.set_status(run_dir, rundir.RUNNING)
        if resume is None:
            rundir.write_json(run_dir / "config.json", config.to_dict())
        rundir.write_json(run_dir / "env.json", rundir.environment(device))

    with rundir.run_log(run_dir / "run.log"), rundir.failure_status(run_dir, state.is_main_process):
        return _train(config, model, tokenizer, train, held, collate, leak, probe_batch, run_dir, resume,
                      started, state.is_main_process)


def _train(config, model, tokenizer, train, held, collate, leak, probe_batch, run_dir, resume, started, is_main):
    on_gpu = next(model.parameters()).is_cuda
    model.config.use_cache = False
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules, task_type="CAUSAL_LM"))
    probe_before = probe(model, probe_batch, config.mask)
    gradient_checkpointing = on_gpu if config.gradient_checkpointing is None else config.gradient_checkpointing
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        # bf16 autocast on GPU: over bf16 weights by default, over fp32 master weights with --dtype float32.
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=gradient_checkpointing,
        remove_unused_columns=False,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        use_cpu=not on_gpu,
        disable_tqdm=not is_main,
        dataloader_num_workers=0,
    )
    train_log = TrainLog(run_dir / "train_log.jsonl", config.spike_factor, config.spike_window, is_main)
    callbacks = [train_log]
    if os.environ.get("ABLATE_FAULT_KILL_AT_STEP"):
        callbacks.append(KillAtStep(int(os.environ["ABLATE_FAULT_KILL_AT_STEP"])))
    trainer = MaskedTrainer(
        model=model, args=args, train_dataset=[asdict(e) for e in train],
        eval_dataset=[asdict(e) for e in held], data_collator=collate, callbacks=callbacks,
        mask_name=config.mask,
    )
    checkpoint = complete_checkpoints(run_dir)[-1] if resume else None
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    eval_loss = trainer.evaluate()["eval_loss"] if not train_log.diverged else None
    probe_after = probe(model, probe_batch, config.mask)

    status = DIVERGED if train_log.diverged else rundir.COMPLETED
    save = None
    if status == rundir.COMPLETED and is_main:
        save = save_final(trainer.accelerator.unwrap_model(model), tokenizer, run_dir / "final")
        save["path"] = str(run_dir / "final")
    norms = train_log.grad_norms
    good = [p for p in complete_checkpoints(run_dir) if int(p.name.split("-")[1]) <= train_log.last_good_step]
    summary = {
        "stage": config.stage,
        "run_id": run_dir.name,
        "status": status,
        "leaky": leak is not None,
        "model": config.model,
        "mask": config.mask,
        "data": config.data,
        "n_train": len(train),
        "n_eval": len(held),
        "global_step": trainer.state.global_step,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha} if config.lora_r else None,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "train_runtime": result.metrics.get("train_runtime"),
        "train_steps_per_second": result.metrics.get("train_steps_per_second"),
        "wall_seconds": round(time.time() - started, 3),
        "grad_norm": {"last": norms[-1] if norms else None, "max": max(norms) if norms else None},
        "diverged_reason": train_log.diverged,
        "last_good_checkpoint": str(good[-1]) if good else None,
        "leakage_guard": {"passed": leak is None, "first_leak": str(leak) if leak else None,
                          "allowed_by_flag": leak is not None},
        "probe": {"before": probe_before, "after": probe_after},
        "save": save,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    gated = rundir.check_gate(config.gate, summary) if status == rundir.COMPLETED else None
    if gated:
        summary["status"] = status = rundir.GATED
    if is_main:
        rundir.write_json(run_dir / "summary.json", summary)
        reason = train_log.diverged or gated or ("trained with a label-leaking mask" if leak else "")
        rundir.set_status(run_dir, status, reason)
    return run_dir
