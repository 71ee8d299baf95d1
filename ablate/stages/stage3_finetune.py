"""Stage 3: finetune with the causal mask or ``prefill_bidir``, leakage-safe, resumable.

    ablate tiny-model --out /tmp/tiny && \
    ablate stage3 --mask prefill_bidir --model /tmp/tiny --data tests/data/sft.jsonl --max-steps 20 --device cpu

A run is prepare, train, summarize. ``prepare`` (ablate.stages.stage3_setup) reads and checks the data, the
model and the Trainer's settings before the run folder exists. ``train`` runs the Hugging Face Trainer (so
``accelerate launch`` spreads it over several processes unchanged; ``MaskedTrainer`` only turns each batch's
``prefix_len`` into the attention mask): the mask is checked before the first step and the study's probe run
before and after, and a usable model is saved with the raw state-dict fallback (ablate.core.checkpoints).
``summarize`` writes ``summary.json`` (with the fingerprint of ``final/`` and the digest of the data, which
stage 4 and ``--resume`` check), applies the gate and sets the status. Out of memory in a training step, ``train``
halves the micro-batch and doubles gradient accumulation (the same rows a step; ablate.core.oom) and goes on from
the newest intact checkpoint or the start; summary.json records each halving and the run's peak memory.

A run is ``completed`` only if its model is usable; ablate.stages.stage3_divergence says when it is
``diverged`` instead. ``--resume`` continues a failed or crashed run as ablate.stages.stage3_resume decides,
from its newest intact checkpoint, and ends where the uninterrupted run would have, bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ablate.core.checkpoints import save_final, save_raw
from ablate.core.layer_masks import forward_masks, num_layers, record as layer_record
from ablate.core.leakage import probe
from ablate.core.masks import model_attention_mask, packed_rows_mask
from ablate.core.models import resolved as resolved_runtime
from ablate.core.row_attention import has_row_attention, row_spans, rows_attention
from ablate.core.segments import training_record
from ablate.core.sft_data import supervised_logits, supervised_tokens
from ablate.core.memory import PeakMemory
from ablate.core.oom import StepOutOfMemory, halve_training, is_out_of_memory, release
from ablate.faults import fault_point, train_oom_fault
from ablate.results import rundir
from ablate.results.environment import environment
from ablate.results.gates import check_gate
from ablate.results.samples import config_digest, end_train_log, mean_loss, record_files
from ablate.stages.config import FinetuneConfig
from ablate.stages.stage3_checkpoints import RecordCheckpoints, intact, step_of
from ablate.stages.stage3_divergence import TrainLog, finite, nonfinite_weights, unusable_result
from ablate.stages.stage3_divergence import loss_ceiling  # noqa: F401  (the rules, read from the stage too)
from ablate.stages.stage3_resume import Resume, after_oom, checkpoint_batch, load_weights, restore
from ablate.stages.stage3_setup import GUARD_EXAMPLES, Prepared, prepare

log = logging.getLogger(__name__)


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute its head at chosen positions only (transformers' causal LMs)."""
    import inspect

    from ablate.core.models import base_model

    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


class MaskedTrainer(Trainer):
    """The stock Trainer; each batch's ``prefix_len`` becomes the attention mask of the forward.

    Training forwards compute the language model head only at positions whose next token is supervised (the
    model's own ``logits_to_keep`` and ``shift_labels``: the loss and gradients are unchanged), and count the
    real tokens, the positions (padding included) and the head's positions they are fed."""

    def __init__(self, *args, mask_name: str, eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_name = mask_name
        self.eval_collator = eval_collator or self.data_collator
        self.fed = None  # [real tokens, positions, head positions] on the device, summed without a sync per step
        self._step_contexts: ExitStack | None = None  # a training step's attention contexts (compute_loss's)
        self.head_positions: bool | None = None  # whether the forward takes logits_to_keep (read at the first step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        prefix_len, segments = inputs.pop("prefix_len"), inputs.pop("segments", None)
        prompt_segments = inputs.pop("prompt_segments", None)  # segment_bidir's prompt segments, where rows have them
        config = self.accelerator.unwrap_model(model).config
        dtype = next(model.parameters()).dtype
        real = inputs["attention_mask"].bool()
        head = inputs["labels"].numel()
        if self.head_positions is None:
            self.head_positions = takes_logits_to_keep(model)  # once: the forward's signature does not change
        if model.training and self.head_positions and (kept := supervised_logits(inputs["labels"])):
            # The head (vocabulary-wide logits) only where a next token is supervised; the same loss, exactly.
            inputs["logits_to_keep"], inputs["shift_labels"] = kept
            head = kept[1].numel()
        if model.training:
            fed = torch.stack([real.sum(), *(torch.tensor(n, device=real.device) for n in (real.numel(), head))])
            self.fed = fed if self.fed is None else self.fed + fed
        per_row = nullcontext()
        if segments is None:
            inputs["attention_mask"] = model_attention_mask(config, self.mask_name, real, prefix_len, dtype,
                                                            prompt_segments=prompt_segments)
        else:  # packed rows: position_ids travel with the batch
            inputs["attention_mask"] = packed_rows_mask(config, self.mask_name, real, prefix_len, segments,
                                                        inputs["position_ids"], dtype, prompt_segments)
            if has_row_attention(model):  # sdpa once per row (ablate.core.row_attention)
                inputs["row_spans"] = row_spans(segments)
                per_row = rows_attention(model)
        per_layer = forward_masks(model, self.mask_name, real, prefix_len, dtype, segments,
                                  inputs.get("position_ids"), rows=segments is not None,
                                  built=inputs["attention_mask"], prompt_segments=prompt_segments)
        if self._step_contexts is not None:  # training: held through the backward too, where gradient
            self._step_contexts.enter_context(per_row)  # checkpointing runs each layer's forward again
            self._step_contexts.enter_context(per_layer)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with per_row, per_layer:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows, step = len(inputs["prefix_len"]), self.state.global_step + 1
        try:
            train_oom_fault(rows, step)
            with ExitStack() as self._step_contexts:
                return super().training_step(model, inputs, num_items_in_batch)
        except Exception as exc:  # out of memory in the forward or backward: which step, on what (ablate.core.oom)
            if not is_out_of_memory(exc) or isinstance(exc, StepOutOfMemory):
                raise
            raise StepOutOfMemory(step, rows, int(inputs["attention_mask"].sum())) from exc
        finally:
            self._step_contexts = None

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def tokens_fed(self) -> dict | None:
        """Real tokens and positions fed to training forwards, summed over processes (call it on every rank)."""
        if self.fed is None:
            return None
        real, positions, head = (int(x) for x in self.accelerator.reduce(self.fed, "sum"))
        return {"real": real, "positions": positions, "head": head}

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
        fault_point("save", self.state.global_step)


class KillPoints(TrainerCallback):
    """The test-only kill points inside the Trainer's loop (ablate.faults): after each step, in the last eval."""

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("step", state.global_step)

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            fault_point("eval")


def run_stage3(config: FinetuneConfig, resume: Resume | None = None) -> Path | None:
    """Train into a new run directory, or go on with ``resume`` (ablate.stages.stage3_resume.decide; ``config``
    is then ``resume.config``). Returns the run directory on rank 0, None on the other ranks."""
    from accelerate import PartialState

    from ablate.core.models import resolve_device

    started = time.time()
    device = resolve_device(config.device)
    # Under torchrun / accelerate launch: on CPU accelerate joins the processes only when told (gloo).
    state = PartialState(cpu=device == "cpu")
    is_main = state.is_main_process
    if resume is None:
        rundir.check_writable(Path(config.runs_dir), config.stage)
        prepared = prepare(config, device, is_main)  # all checked before a run directory exists
        run_dir = rundir.claim(state, lambda: rundir.new_run_dir(
            Path(config.runs_dir), config.stage, model_identity=prepared.identity,
            data_identity=prepared.data_identity, config_sha256=config_digest(config.to_dict())))
    else:
        # Locked before the slow model load, so a second --resume of the run is refused at once.
        run_dir = rundir.claim(state, lambda: rundir.reopen(resume.run_dir, resume.step) or resume.run_dir)
    with rundir.active(run_dir, is_main=is_main):
        if is_main:
            if resume is None:
                rundir.write_json(run_dir / "config.json", config.to_dict())
            rundir.write_json(run_dir / "env.json", environment(device))
        log.info("stage 3 %s %s: mask %s, model %s, %d steps", "resuming" if resume else "starting", run_dir,
                 config.mask, config.model, config.max_steps)
        if config.warmup_steps > config.max_steps:
            log.warning("--warmup-steps %d is longer than --max-steps %d: the learning rate never reaches %g",
                        config.warmup_steps, config.max_steps, config.learning_rate)
        if resume is not None:
            prepared = prepare(config, device, is_main)
        trained = train(config, prepared, run_dir, resume, is_main)
        summarize(config, prepared, trained, run_dir, started, is_main)
    return run_dir if is_main else None  # rank 0 writes and reports the run


@dataclass(frozen=True)
class Trained:
    """What ``train`` leaves for ``summarize``."""

    trainer: MaskedTrainer  # its state holds the steps taken and the whole run's log history
    train_log: TrainLog  # the grad norms seen and the last step that was not diverged
    metrics: dict  # this process's ``train()`` metrics; empty when nothing was left to train
    eval_loss: float | None  # None when the run diverged during training
    probe: dict  # the probe's losses before and after training
    mask_check: dict | None  # the runtime check that the mask took effect (None for causal)
    resolved: dict  # dtype and attention implementation as loaded, and the Trainer's autocast
    diverged: str | None  # why the model is unusable, or None
    save: dict | None  # how final/ was saved (None when not usable, and on ranks > 0)
    resumed_from: Path | None
    tokens_fed: dict | None  # real tokens and positions this session's training forwards took (None: none)
    train_batch: dict | None = None  # the per-device micro-batch and accumulation the run ended with
    oom_retries: tuple = ()  # each halving of the micro-batch after an out-of-memory error (ablate.core.oom)
    peak_memory: dict | None = None  # ablate.core.memory, from the start of training to the saved model


def train(config: FinetuneConfig, prepared: Prepared, run_dir: Path, resume: Resume | None, is_main: bool) -> Trained:
    """Check the mask, probe, train (or go on from ``resume.checkpoint``), evaluate, probe, and save a usable model.

    Out of memory in a training step, train again with half the micro-batch and twice the accumulation (the same
    rows a step) from the newest intact checkpoint or the start (ablate.core.oom, ablate.stages.stage3_resume)."""
    model = prepared.model
    memory = PeakMemory(next(model.parameters()).device)
    log.info("data: %d training, %d held-out examples from %s", len(prepared.train), len(prepared.held), config.data)
    model.config.use_cache = False
    resolved = resolved_runtime(model)  # what transformers resolved, not what was asked for (config.json)
    args = config.training_arguments(run_dir / "checkpoints", next(model.parameters()).is_cuda, is_main)
    resolved["autocast"] = "bfloat16" if args.bf16 else None
    mask_check = _check_mask(config, prepared, args.bf16)
    probe_before = probe(model, prepared.probe_batch, config.mask)
    saved = restore(resume, is_main) if resume else None
    trainer, train_log, metrics, oom_retries = _fit(config, prepared, args, run_dir, resume, saved, is_main)
    tokens_fed = trainer.tokens_fed() if metrics else None
    diverged = train_log.diverged or nonfinite_weights(model)
    eval_loss = trainer.evaluate()["eval_loss"] if not diverged else None
    probe_after = probe(model, prepared.probe_batch, config.mask)
    diverged = diverged or unusable_result(eval_loss, probe_after)
    save = None
    if not diverged and is_main:
        save = save_final(trainer.accelerator.unwrap_model(model), prepared.tokenizer, run_dir / "final")
        save["path"] = str(run_dir / "final")
        log.info("saved the final model as %s in %s", save["format"], save["path"])
    return Trained(trainer, train_log, metrics, eval_loss, {"before": probe_before, "after": probe_after},
                   mask_check, resolved, diverged, save, resume.checkpoint if resume else None, tokens_fed,
                   {"micro_batch": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps}, tuple(oom_retries), memory.read())


def _fit(config: FinetuneConfig, prepared: Prepared, args, run_dir: Path, resume: Resume | None, saved,
         is_main: bool) -> tuple[MaskedTrainer, TrainLog, dict, list[dict]]:
    """Train (from ``resume.checkpoint`` when given); out of memory in a step, halve ``args``' micro-batch, double
    its accumulation and train again from the newest intact checkpoint or the start. Returns the trainer, its log,
    ``train()``'s metrics (empty when nothing was left to train) and the halvings."""
    start, oom_retries = resume.checkpoint if resume else None, []
    batch = (checkpoint_batch(start, config) if start else
             (args.per_device_train_batch_size, args.gradient_accumulation_steps))
    while True:
        args.per_device_train_batch_size, args.gradient_accumulation_steps = batch  # read by the Trainer's init
        train_log = TrainLog(run_dir / "train_log.jsonl", config.spike_factor, config.spike_window, is_main,
                             list(saved.log_history) if saved else [], vocab_size=prepared.model.config.vocab_size)
        trainer = MaskedTrainer(
            model=prepared.model, args=args, train_dataset=[asdict(e) for e in prepared.train],
            eval_dataset=[asdict(e) for e in prepared.held], data_collator=prepared.collate,
            callbacks=[train_log, RecordCheckpoints(is_main), KillPoints()], mask_name=config.mask,
            eval_collator=prepared.padded,
        )
        if saved is not None and saved.global_step >= config.max_steps:
            # Killed after its last step (final eval, final save): nothing is left to train. Resumed at max_steps
            # the Trainer would still take one step more (it checks max_steps after a step): load the weights.
            trainer.state = saved
            load_weights(prepared.model, start)
            return trainer, train_log, {}, oom_retries
        try:
            metrics = trainer.train(resume_from_checkpoint=str(start) if start else None).metrics
            return trainer, train_log, metrics, oom_retries
        except StepOutOfMemory as exc:
            if args.world_size > 1:
                raise  # the other ranks wait for this one in a collective: no retry in step with them
            failed = StepOutOfMemory(exc.step, exc.rows, exc.tokens)  # not the traceback: it holds the activations
        batch = halve_training(oom_retries, failed, *batch)  # BadInput when one row does not fit
        release(trainer)
        start, saved = after_oom(config, run_dir, prepared.model, prepared.tokenizer, is_main, prepared.identity)
        oom_retries[-1]["resumed_from"] = str(start) if start else None


def _check_mask(config: FinetuneConfig, prepared: Prepared, bf16: bool) -> dict | None:
    """The mask must take effect on this stack (backend, dtype, versions) before step 1."""
    if config.mask == "causal":
        return None
    from ablate.core.mask_check import check_mask, check_rows, check_training_mask
    from ablate.core.sft_packing import packed_forward

    autocast = torch.bfloat16 if bf16 else None
    # The padded path always runs: a packing run pads every micro-batch that packing would barely shorten.
    padded = check_training_mask(prepared.model, prepared.padded([asdict(e) for e in prepared.train[:GUARD_EXAMPLES]]),
                                 config.mask, autocast_dtype=autocast)
    if not prepared.packing["packed"]:
        return padded
    # And the packed path: the check rows side by side in one sequence, under the packed mask.
    pairs = [(e.input_ids[:e.prefix_len], e.input_ids[e.prefix_len:]) for e in prepared.train[:GUARD_EXAMPLES]]
    segments = None if prepared.train[0].prompt_segments is None else \
        [e.prompt_segments for e in prepared.train[:GUARD_EXAMPLES]]
    packed = check_mask(prepared.model, config.mask, check_rows(pairs, segments=segments),
                        packed_forward(prepared.model, autocast),
                        autocast, where="training (packed rows)")
    return {**packed, "padded_path": padded}


def summarize(config: FinetuneConfig, prepared: Prepared, trained: Trained, run_dir: Path, started: float,
              is_main: bool) -> None:
    """summary.json, the gate, the end of train_log.jsonl and the run's status (rank 0 writes)."""
    status = rundir.DIVERGED if trained.diverged else rundir.COMPLETED
    summary = _summary(config, prepared, trained, run_dir, started, status)
    gated = check_gate(config.gate, summary) if status == rundir.COMPLETED else None
    if gated:
        summary["status"] = status = rundir.GATED
    reason = trained.diverged or gated or ("trained with a label-leaking mask" if prepared.leak else "")
    log.info("%s at step %d: train_loss %s, eval_loss %s%s", status, summary["global_step"], summary["train_loss"],
             trained.eval_loss, f" ({reason})" if reason else "")
    if is_main:
        end_train_log(run_dir / "train_log.jsonl", summary["global_step"], eval_loss=trained.eval_loss,
                      probe=summary["probe"], train_steps_per_second=summary["train_steps_per_second"],
                      train_tokens_per_second=summary["train_tokens_per_second"],
                      padding_fraction=summary["padding_fraction"])
        rundir.write_json(run_dir / "summary.json", finite(summary))
        rundir.set_status(run_dir, status, reason)


def _summary(config: FinetuneConfig, prepared: Prepared, trained: Trained, run_dir: Path, started: float,
             status: str) -> dict:
    model, state, leak, norms = prepared.model, trained.trainer.state, prepared.leak, trained.train_log.grad_norms
    good = [p for p in intact(run_dir) if step_of(p) <= trained.train_log.last_good_step]
    runtime, fed = trained.metrics.get("train_runtime"), trained.tokens_fed
    return {
        "stage": config.stage,
        "run_id": run_dir.name,
        "status": status,
        "leaky": leak is not None,
        "model": config.model,
        "model_identity": prepared.identity,  # what stage 4 compares with stage 1's base model
        "mask": config.mask,
        # the layers trained under the mask (ablate.core.layer_masks, resolved on the model; None: every layer)
        "mask_layers": layer_record(prepared.mask_layers, num_layers(prepared.model.config)),
        # segment masks: where the prompts were cut and how many segments the training prompts had
        **({"segments": training_record(config.segment_separator, config.segment_field, prepared.train)}
           if config.segment_separator is not None or config.segment_field is not None else {}),
        "data": config.data,
        "data_identity": prepared.data_identity,  # what --resume checks --data against
        "supervised_tokens": supervised_tokens(prepared.train),
        "n_train": len(prepared.train),
        "n_eval": len(prepared.held),
        "global_step": state.global_step,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha} if config.lora_r else None,
        # Over the whole run's logged steps (the Trainer's own train_loss covers this process's steps only).
        "train_loss": mean_loss(state.log_history),
        "eval_loss": trained.eval_loss,
        "train_runtime": trained.metrics.get("train_runtime"),  # this process's training; None when none was left
        "train_steps_per_second": trained.metrics.get("train_steps_per_second"),
        # Real (non-padding) tokens per second of this session's training, over every process; the padding
        # fraction is the share of the positions fed that were padding.
        "train_tokens_per_second": round(fed["real"] / runtime, 3) if fed and runtime else None,
        "padding_fraction": round(1 - fed["real"] / fed["positions"], 6) if fed else None,
        "tokens_fed": fed,
        "packing": prepared.packing,
        "wall_seconds": round(time.time() - started, 3),
        "grad_norm": {"last": norms[-1] if norms else None, "max": max(norms) if norms else None},
        "diverged_reason": trained.diverged,
        "last_good_checkpoint": str(good[-1]) if good else None,
        "leakage_guard": {"passed": leak is None, "first_leak": str(leak) if leak else None,
                          "allowed_by_flag": leak is not None},
        "probe": trained.probe,
        "mask_check": trained.mask_check,
        "resolved": trained.resolved,
        "save": trained.save,
        "resumed_from": str(trained.resumed_from) if trained.resumed_from else None,
        "train_batch": trained.train_batch,  # per device; smaller than config.json's after an out-of-memory retry
        "oom_retries": list(trained.oom_retries),
        "peak_memory": trained.peak_memory,  # a measurement, not verified (ablate.results.verified)
        "files": record_files(run_dir),  # config.json and env.json as written; a reader refuses them edited
    }
