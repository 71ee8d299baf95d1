"""Stage 3: finetune with the causal mask or ``prefill_bidir``, leakage-safe, resumable.

    ablate tiny-model --out /tmp/tiny && \
    ablate stage3 --mask prefill_bidir --model /tmp/tiny --data tests/data/sft.jsonl --max-steps 20 --device cpu

The Hugging Face Trainer does the training (so ``accelerate launch`` spreads it
over several processes unchanged); ``MaskedTrainer`` only turns each batch's
``prefix_len`` into the attention mask. Before the first step the mask is checked
structurally for label leakage and the study's probe is run; after the last, the
model is saved with the raw state-dict fallback (ablate.core.checkpoints). ``--resume``
(ablate.stages.stage3_resume) continues a failed or crashed run from its newest intact
checkpoint and ends where the uninterrupted run would have, bit for bit.

A run is ``completed`` only if its model is usable. Data with no supervised token is refused
before the run folder exists. The run ends ``diverged``, naming why, at a non-finite loss or grad
norm, a grad norm spike, a logged loss over ``loss_ceiling`` (10x the first logged loss, kept
within [ln V, 3 ln V]), a grad norm of zero while the loss is above 1e-3 (saturated), or, after
the last step, non-finite weights, eval loss or probe. ``summary.json`` records the fingerprint of
``final/`` and the digest of the data, which stage 4 and ``--resume`` check.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainerState

from ablate.results import rundir
from ablate.results.environment import environment
from ablate.results.gates import check_gate
from ablate.stages import stage3_resume as resume
from ablate.core.checkpoints import save_final, save_raw
from ablate.stages.config import FinetuneConfig
from ablate.errors import BadInput
from ablate.core.leakage import find_leak, probe
from ablate.core.masks import model_attention_mask
from ablate.core.sft_data import Collator, data_identity, load_rows, refuse_unsupervised, split_eval, supervised_tokens, tokenize

log = logging.getLogger(__name__)
GUARD_EXAMPLES = 256  # examples the structural guard inspects (the mask is per-row, so a sample suffices)
LOSS_RISE, UNIFORM_X = 10.0, 3.0  # loss_ceiling's factors
ZERO_GRAD, ZERO_GRAD_LOSS = 1e-10, 1e-3  # a grad norm this small while the loss is above this: saturated, not converged


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
        resume.fault("save", self.state.global_step)


class TrainLog(TrainerCallback):
    """Appends every log (loss, grad norm, learning rate, eval) to ``train_log.jsonl``; stops on divergence."""

    def __init__(self, path: Path, spike_factor: float, window: int, is_main: bool, history: list[dict] = (),
                 vocab_size: int = 0):
        self.path, self.spike_factor, self.window, self.is_main = path, spike_factor, window, is_main
        # A resumed run judges its next steps against the same recent grad norms and first loss as an uninterrupted one.
        self.grad_norms: list[float] = [e["grad_norm"] for e in history if "grad_norm" in e]
        first = next((e["loss"] for e in history if "loss" in e), None)
        self.first_loss, self.loss_ceiling = first, None if first is None else loss_ceiling(first, vocab_size)
        self.vocab_size = vocab_size
        self.diverged: str | None = None
        self.last_good_step = max((e["step"] for e in history if "loss" in e), default=0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last steps too, when logging_steps does not divide max_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")
            log.info("step %d: %s", state.global_step, " ".join(
                f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"))
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if loss is not None and math.isfinite(loss) and self.loss_ceiling is None:
            self.first_loss, self.loss_ceiling = loss, loss_ceiling(loss, self.vocab_size)
        reason = None
        if loss is not None and not math.isfinite(loss):
            reason = f"non-finite loss {loss} at step {state.global_step}"
        elif loss is not None and loss > self.loss_ceiling:
            reason = (f"loss {loss:.4g} at step {state.global_step} rose over {self.loss_ceiling:.4g} ({LOSS_RISE:g}x "
                      f"the first logged loss {self.first_loss:.4g}, kept within ln(vocab) and {UNIFORM_X:g} ln(vocab))")
        elif norm is not None and math.isfinite(norm) and norm <= ZERO_GRAD and loss is not None and loss > ZERO_GRAD_LOSS:
            reason = (f"grad norm collapsed to {norm:.3g} at step {state.global_step} while the loss stays at "
                      f"{loss:.4g}: the model is saturated, not converged")
        elif norm is not None:
            if not math.isfinite(norm):
                reason = f"non-finite grad norm at step {state.global_step}"
            elif len(self.grad_norms) >= 5:
                median = statistics.median(self.grad_norms[-self.window:])
                if median > 0 and norm > self.spike_factor * median:
                    reason = (f"grad norm {norm:.3g} at step {state.global_step} is over "
                              f"{self.spike_factor:g}x its recent median {median:.3g}")
            if math.isfinite(norm):
                self.grad_norms.append(norm)
        if reason:
            self.diverged = reason
            control.should_training_stop = True
            control.should_save = False
        elif loss is not None:
            self.last_good_step = state.global_step
        return control


def loss_ceiling(first_loss: float, vocab_size: int) -> float:
    """The logged loss past which a run is diverged: ``LOSS_RISE`` x its first logged loss, kept within [ln V, 3 ln V].

    ln V is the loss of a uniform guess over the vocabulary: a loss under it is never called diverged (a
    finetune's first loss may be tiny), one over ``UNIFORM_X`` x it always is (worse than guessing, far).
    """
    uniform = math.log(vocab_size) if vocab_size > 1 else math.inf
    return max(uniform, min(LOSS_RISE * first_loss, UNIFORM_X * uniform))


def prepare(config: FinetuneConfig, tokenizer):
    """Read, tokenize and split the data; check the mask for leakage. Raises BadInput."""
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
    collate = Collator(tokenizer.pad_token_id)
    leak = find_leak(config.mask, collate([asdict(e) for e in train[:GUARD_EXAMPLES]]))
    if leak and not config.allow_label_leakage:
        raise BadInput(f"mask '{config.mask}' leaks labels ({leak}); training on it teaches copying, "
                       "not prediction. Use prefill_bidir, or --allow-label-leakage for diagnosis only")
    return train, held, collate, leak


def run_stage3(config: FinetuneConfig, resume_dir: Path | None = None) -> Path | None:
    """Train into a new run directory, or go on with ``resume_dir`` (a failed or crashed run; see ablate.stages.stage3_resume)."""
    from accelerate import PartialState

    from ablate.core.identity import model_identity
    from ablate.core.models import resolve_device

    started = time.time()
    device = resolve_device(config.device)
    # Under torchrun / accelerate launch: on CPU accelerate joins the processes only when told (gloo).
    state = PartialState(cpu=device == "cpu")
    if resume_dir is None:
        rundir.check_writable(Path(config.runs_dir), config.stage)
        setup = _setup(config, device)  # data and mask are checked before a run directory exists
        run_dir = rundir.claim(state, lambda: rundir.new_run_dir(Path(config.runs_dir), config.stage,
                                                           model_identity=setup[-2], data_identity=setup[-1]))
    else:
        resume.check_base(Path(resume_dir), config.model, model_identity(config.model))
        resume.check_data(Path(resume_dir), config, data_identity(config.data, config.eval_data))
        # Locked before the slow model load, so a second --resume of the run is refused at once.
        start = resume.newest_intact(Path(resume_dir))  # recorded in the run's lineage (history.jsonl)
        run_dir = rundir.claim(state, lambda: rundir.reopen(resume_dir, resume.step_of(start) if start else 0)
                               or Path(resume_dir))
    with rundir.active(run_dir, is_main=state.is_main_process):
        if state.is_main_process:
            if resume_dir is None:
                rundir.write_json(run_dir / "config.json", config.to_dict())
            rundir.write_json(run_dir / "env.json", environment(device))
        log.info("stage 3 %s %s: mask %s, model %s, %d steps", "resuming" if resume_dir else "starting", run_dir,
                 config.mask, config.model, config.max_steps)
        if config.warmup_steps > config.max_steps:
            log.warning("--warmup-steps %d is longer than --max-steps %d: the learning rate never reaches %g",
                        config.warmup_steps, config.max_steps, config.learning_rate)
        if resume_dir is not None:
            setup = _setup(config, device)
        _train(config, setup, run_dir, resume_dir is not None, started, state.is_main_process)
    return run_dir if state.is_main_process else None  # rank 0 writes and reports the run


def _setup(config: FinetuneConfig, device: str):
    from ablate.core.identity import model_identity
    from ablate.core.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    data_id = data_identity(config.data, config.eval_data)  # digested before it is read: what --resume checks
    train, held, collate, leak = prepare(config, tokenizer)  # before the (slow) fingerprint and model load
    identity = model_identity(config.model)
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation, tokenizer)
    probe_batch = collate([asdict(e) for e in held[: config.probe_samples]])
    return model, tokenizer, train, held, collate, leak, probe_batch, identity, data_id


def _train(config, setup, run_dir, resuming, started, is_main):
    model, tokenizer, train, held, collate, leak, probe_batch, identity, data_id = setup
    log.info("data: %d training, %d held-out examples from %s", len(train), len(held), config.data)
    on_gpu = next(model.parameters()).is_cuda
    model.config.use_cache = False
    if config.lora_r:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(config.seed)  # the adapter's initialisation: the Trainer seeds only later
        model = get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules, task_type="CAUSAL_LM"))
    args = config.training_arguments(run_dir / "checkpoints", on_gpu, is_main)
    mask_check = None
    if config.mask != "causal":  # the mask must take effect on this stack (backend, dtype, versions) before step 1
        import torch

        from ablate.core.mask_check import check_training_mask

        mask_check = check_training_mask(model, collate([asdict(e) for e in train[:GUARD_EXAMPLES]]), config.mask,
                                         autocast_dtype=torch.bfloat16 if args.bf16 else None)
    probe_before = probe(model, probe_batch, config.mask)
    checkpoint, saved, history = None, None, []
    if resuming:
        checkpoint = resume.newest_intact(run_dir)
        if checkpoint is None:
            raise BadInput(f"nothing to resume: {run_dir} has no intact checkpoint")
        saved = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        history = list(saved.log_history)
        log.info("resuming from %s (step %d)", checkpoint, resume.step_of(checkpoint))
        if is_main:
            resume.trim_train_log(run_dir / "train_log.jsonl", history)
            shutil.rmtree(run_dir / "final", ignore_errors=True)  # a killed attempt's half-written save
    train_log = TrainLog(run_dir / "train_log.jsonl", config.spike_factor, config.spike_window, is_main, history,
                         vocab_size=model.config.vocab_size)
    callbacks = [train_log] + ([resume.Fault()] if os.environ.get(resume.FAULT_ENV) else [])
    trainer = MaskedTrainer(
        model=model, args=args, train_dataset=[asdict(e) for e in train],
        eval_dataset=[asdict(e) for e in held], data_collator=collate, callbacks=callbacks,
        mask_name=config.mask,
    )
    train_metrics = {}
    if saved is not None and saved.global_step >= config.max_steps:
        # Killed after its last step (final save, final eval): the Trainer, resumed at max_steps, would still
        # take one step more (it checks max_steps only after a step), so load the weights and go on from here.
        trainer.state = saved
        trainer._load_from_checkpoint(str(checkpoint))  # what train(resume_from_checkpoint=...) loads with
    else:
        train_metrics = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).metrics
    diverged = train_log.diverged or nonfinite_weights(model)
    eval_loss = trainer.evaluate()["eval_loss"] if not diverged else None
    probe_after = probe(model, probe_batch, config.mask)
    diverged = diverged or unusable_result(eval_loss, probe_after)

    status = rundir.DIVERGED if diverged else rundir.COMPLETED
    save = None
    if status == rundir.COMPLETED and is_main:
        resume.arm_final_save(tokenizer)
        save = save_final(trainer.accelerator.unwrap_model(model), tokenizer, run_dir / "final")
        save["path"] = str(run_dir / "final")
        log.info("saved the final model as %s in %s", save["format"], save["path"])
    norms = train_log.grad_norms
    good = [p for p in resume.intact(run_dir) if resume.step_of(p) <= train_log.last_good_step]
    summary = {
        "stage": config.stage,
        "run_id": run_dir.name,
        "status": status,
        "leaky": leak is not None,
        "model": config.model,
        "model_identity": identity,  # what stage 4 compares with stage 1's base model
        "mask": config.mask,
        "data": config.data,
        "data_identity": data_id,  # what --resume checks --data against
        "supervised_tokens": supervised_tokens(train),
        "n_train": len(train),
        "n_eval": len(held),
        "global_step": trainer.state.global_step,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha} if config.lora_r else None,
        # Over the whole run's logged steps (the Trainer's own train_loss covers this process's steps only).
        "train_loss": resume.mean_loss(trainer.state.log_history),
        "eval_loss": eval_loss,
        "train_runtime": train_metrics.get("train_runtime"),  # this process's training; None when none was left
        "train_steps_per_second": train_metrics.get("train_steps_per_second"),
        "wall_seconds": round(time.time() - started, 3),
        "grad_norm": {"last": norms[-1] if norms else None, "max": max(norms) if norms else None},
        "diverged_reason": diverged,
        "last_good_checkpoint": str(good[-1]) if good else None,
        "leakage_guard": {"passed": leak is None, "first_leak": str(leak) if leak else None,
                          "allowed_by_flag": leak is not None},
        "probe": {"before": probe_before, "after": probe_after},
        "mask_check": mask_check,
        "save": save,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    gated = check_gate(config.gate, summary) if status == rundir.COMPLETED else None
    if gated:
        summary["status"] = status = rundir.GATED
    reason = diverged or gated or ("trained with a label-leaking mask" if leak else "")
    log.info("%s at step %d: train_loss %s, eval_loss %s%s", status, summary["global_step"], summary["train_loss"],
             eval_loss, f" ({reason})" if reason else "")
    if is_main:
        rundir.write_json(run_dir / "summary.json", _finite(summary))
        rundir.set_status(run_dir, status, reason)
    return run_dir


def nonfinite_weights(model) -> str | None:
    """Why the trained weights are unusable (a NaN or inf anywhere), or None."""
    import torch

    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"final weights are not finite ({name} holds NaN or inf)"
    return None


def unusable_result(eval_loss, probe_after: dict) -> str | None:
    """Why the finished run's measurements say the model is broken (a non-finite eval loss or probe), or None."""
    if eval_loss is not None and not math.isfinite(eval_loss):
        return f"eval loss is {eval_loss}"
    bad = [k for k in ("loss_mask", "loss_causal") if not math.isfinite(probe_after[k])]
    return f"probe after training is not finite ({', '.join(bad)})" if bad else None


def _finite(value):
    """JSON has no NaN: a diverged run's non-finite losses are written as null (its reason says what they were)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
