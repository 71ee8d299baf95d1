"""Stage 3 ``--resume``: the one decision (which run, which checkpoint, every check), and going on from it.

    python -c "from ablate.stages.stage3_resume import decide; print(decide('prefill_bidir', 'runs'))"

``decide`` makes the whole decision before anything is touched: the run (the one named, or the latest failed
or crashed run of the mask), its saved config (as run.json's digest records it), its base model and data (as
run.json records them), and the checkpoint to go on from, its newest intact one (ablate.stages.stage3_checkpoints);
``run_stage3`` and ``ablate study`` take its ``Resume``. Only a ``failed`` or ``crashed`` run is resumed; a
completed, gated or diverged one is refused. Inside the reopened run, ``restore`` says why newer checkpoints
were passed over and drops what the lost attempt wrote past the checkpoint.

Out of memory in a training step, the run goes on in the same process in the same way (``after_oom``): from its
newest intact checkpoint through the Trainer's own resume, or, with none yet, from the start with the weights it
started from put back; ablate.core.oom chooses the smaller micro-batch.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerState

from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.files import read_json, write_jsonl
from ablate.results.samples import config_digest
from ablate.stages.config import FinetuneConfig
from ablate.stages.stage3_checkpoints import checkpoints, intact, newest_intact, problem, recorded_batch, step_of

log = logging.getLogger(__name__)
RESUMABLE = (rundir.FAILED, rundir.CRASHED)


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` goes on with: the run, its saved config, and its newest intact checkpoint."""

    run_dir: Path
    config: FinetuneConfig  # the run's own config.json, checked against run.json's digest
    checkpoint: Path
    passed_over: tuple[str, ...] = ()  # each newer checkpoint that is not intact, and why (logged in the run)

    @property
    def step(self) -> int:
        return step_of(self.checkpoint)


def decide(mask: str | None, runs_dir: str | Path, run_dir: str | Path | None = None) -> Resume:
    """The resume decision: ``run_dir`` (any mask unless ``mask`` is given) or the latest failed or crashed run
    of ``mask`` (prefill_bidir by default) under ``runs_dir``, checked end to end. Raises BadInput; writes nothing."""
    from ablate.core.identity import model_identity
    from ablate.core.sft_data import data_identity

    if run_dir:
        target = _named_run(Path(run_dir), rundir.STAGE3_PREFIX + (mask or ""))
    else:
        target = _latest_resumable(Path(runs_dir), rundir.STAGE3_PREFIX + (mask or "prefill_bidir"))
    config = _saved_config(target)
    _check_base(target, config.model, model_identity(config.model))
    _check_data(target, config, data_identity(config.data, config.eval_data))
    checkpoint, passed_over = newest_intact(target)
    if checkpoint is None:
        raise BadInput(f"nothing to resume: {target} has no intact checkpoint")
    return Resume(target, config, checkpoint, passed_over)


def _latest_resumable(runs_dir: Path, stage: str) -> Path:
    """The latest failed or crashed run of ``stage`` with an intact checkpoint."""
    run = rundir.latest(runs_dir, stage, statuses=RESUMABLE, need_results=False, where=lambda r: intact(r.path))
    if run is None:
        raise BadInput("nothing to resume: no failed or crashed run with an intact checkpoint in "
                       f"{Path(runs_dir) / stage}")
    return run.path


def _named_run(path: Path, stage: str, flag: str = "--run-dir") -> Path:
    """A run the user named for ``--resume``: a ``stage`` run that failed or crashed, with an intact checkpoint."""
    run = rundir.explicit_run(path.resolve(), stage, flag, statuses=tuple(rundir.Status), need_results=False)
    if run.status not in RESUMABLE:
        raise BadInput(f"{flag} {path} is {run.status}" + (f" ({run.reason})" if run.reason else "")
                       + "; only a failed or crashed run can be resumed")
    if not intact(run.path):
        found = checkpoints(run.path)
        why = f" ({found[-1].name}: {problem(found[-1])})" if found else ""
        raise BadInput(f"nothing to resume: {path} has no intact checkpoint{why}")
    return run.path


def _run_record(run_dir: Path) -> dict:
    """run.json: what the run started from (uid, base model, data, config digest); refused unless it is this run's."""
    info, why = read_json(Path(run_dir) / rundir.RUN_FILE)
    if not (info or {}).get("uid") or info.get("name", Path(run_dir).name) != Path(run_dir).name or info.get(
            "stage", Path(run_dir).parent.name) != Path(run_dir).parent.name:
        raise BadInput(f"{Path(run_dir) / rundir.RUN_FILE} is {why or 'missing' if info is None else 'not this run'}: "
                       "it records the base model and data the run started from; restore it to resume")
    return info


def _unrecorded(run_dir: Path, what: str) -> BadInput:
    return BadInput(f"{Path(run_dir) / rundir.RUN_FILE} does not record {what}, so resuming cannot be checked; "
                    "restore it, or rerun stage 3")


def _saved_config(run_dir: Path) -> FinetuneConfig:
    saved, why = read_json(Path(run_dir) / "config.json")
    if saved is None:
        raise BadInput(f"nothing to resume: {why or f'{run_dir} has no config.json'}")
    recorded = _run_record(run_dir).get("config_sha256")
    if recorded is None:
        raise _unrecorded(run_dir, "the digest of its settings")
    if config_digest(saved) != recorded:
        raise BadInput(f"{run_dir}/config.json holds other settings than the run started with (run.json records "
                       "their digest): resuming would train with other settings; restore it")
    try:
        return FinetuneConfig(**{**saved, "runs_dir": str(Path(run_dir).parent.parent)})
    except TypeError as exc:
        raise BadInput(f"{run_dir}/config.json does not fit this version of ablate: {exc}") from None


def _check_base(run_dir: Path, model: str, identity: dict) -> None:
    """Refuse to go on from another base model than the run started from (same path, new weights)."""
    from ablate.core.identity import describe

    recorded = _run_record(run_dir).get("model_identity")
    if recorded is None:
        raise _unrecorded(run_dir, "its base model's identity")
    if recorded != identity:
        raise BadInput(f"{run_dir} was started from {describe(recorded)}, but {model} is now {describe(identity)}; "
                       "resuming would mix two models")


def _check_data(run_dir: Path, config: FinetuneConfig, identity: dict) -> None:
    """Refuse to go on with other training data than the run started on (a ``--data`` file edited since)."""
    recorded = _run_record(run_dir).get("data_identity")
    if recorded is None:
        raise _unrecorded(run_dir, "its training data's digest")
    for key, flag in (("data", "--data"), ("eval_data", "--eval-data")):
        if recorded.get(key) != identity.get(key):
            was, now = (recorded.get(key) or {}), (identity.get(key) or {})
            raise BadInput(f"{run_dir} was started on {flag} {getattr(config, key)} with sha256 "
                           f"{str(was.get('sha256'))[:12]}, which is now {str(now.get('sha256'))[:12]}; "
                           "resuming would train on other data")


# ---------------------------------------------------------------- going on from the checkpoint

def restore(resume: Resume, is_main: bool) -> TrainerState:
    """In the reopened run: say which checkpoint it goes on from, and drop what the lost attempt wrote after it
    (train_log.jsonl rows past the checkpoint's, a half-written ``final/``). Returns the checkpoint's state."""
    for line in resume.passed_over:
        log.warning("%s", line)
    saved = TrainerState.load_from_json(str(resume.checkpoint / "trainer_state.json"))
    log.info("resuming from %s (step %d)", resume.checkpoint, resume.step)
    if is_main:
        trim_train_log(resume.run_dir / "train_log.jsonl", list(saved.log_history))
        shutil.rmtree(resume.run_dir / "final", ignore_errors=True)  # a killed attempt's half-written save
    return saved


def load_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model`` in place, as ``Trainer.train(resume_from_checkpoint=...)`` does
    (transformers 5.24's ``_load_from_checkpoint``, for the layouts stage 3 writes), through public loaders only.

    For a run killed after its last step: resumed at ``max_steps`` the Trainer would take one step more (it checks
    ``max_steps`` only after a step), so stage 3 loads the weights and trains no further. The exact-resume tests
    (tests/test_finetune.py, kills at ``eval`` and ``final_save``) fail if this drifts from the Trainer.
    """
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file():  # a full model, or the raw state dict of MaskedTrainer._save
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors"), device="cpu"), False)
    elif hasattr(model, "peft_config"):
        model.load_adapter(str(checkpoint), model.active_adapters[0], is_trainable=True)
    else:
        load_sharded_checkpoint(model, str(checkpoint), strict=False)


def trim_train_log(path: Path, history: list[dict]) -> list[dict]:
    """Keep the rows the checkpoint had logged, so each step is in ``train_log.jsonl`` once after a resume."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the kill
    # One row per Trainer.log call, as in log_history; rows past the checkpoint's come from the lost attempt.
    kept = rows[: len(history)]
    # Each kept row must be the checkpoint's own record of that log call (a number edited since is not kept).
    if [{k: v for k, v in r.items() if k != "time"} if isinstance(r, dict) else r for r in kept] != history:
        log.warning("%s does not match the checkpoint's log history; rebuilt from it", path)
        kept = [{"step": e.get("step"), "time": None, **e} for e in history]
    write_jsonl(path, kept)
    return kept


def after_oom(config: FinetuneConfig, run_dir: Path, model, tokenizer, is_main: bool,
              identity: dict | None = None) -> tuple[Path | None, TrainerState | None]:
    """Where a run goes on after an out-of-memory error in a training step: its newest intact checkpoint and that
    checkpoint's state (train_log.jsonl trimmed to it, as ``restore`` does), or, with none yet, ``(None, None)``:
    the start, with the weights the run started from put back into ``model`` and the log emptied. Those weights
    are read again from ``config.model``, so it must still be what the run started from (``identity``, as
    run.json records it): BadInput otherwise."""
    checkpoint, passed_over = newest_intact(run_dir)
    for line in passed_over:
        log.warning("%s", line)
    if checkpoint is None:
        log.info("going on from the start (no intact checkpoint yet), with the weights the run started from")
        if identity is not None:
            from ablate.core.identity import describe, model_identity

            now = model_identity(config.model)
            if now != identity:
                raise BadInput(f"out of memory before the first checkpoint, and {config.model} is no longer the "
                               f"model the run started from ({describe(identity)}, now {describe(now)}): "
                               "starting again would train another model")
        initial_weights(config, model, tokenizer)
        if is_main:
            write_jsonl(run_dir / "train_log.jsonl", [])
        return None, None
    saved = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    log.info("going on from %s (step %d)", checkpoint, saved.global_step)
    if is_main:
        trim_train_log(run_dir / "train_log.jsonl", list(saved.log_history))
    return checkpoint, saved


def checkpoint_batch(checkpoint: Path, config: FinetuneConfig) -> tuple[int, int]:
    """The per-device micro-batch and accumulation to go on from ``checkpoint`` with: the ones it was trained at
    (recorded beside its digests: smaller than config.json's after an out-of-memory retry, which config.json's
    would run into again), when they keep config.json's rows a step; else config.json's."""
    batch, accumulation = config.batch_size, config.gradient_accumulation_steps
    reached = recorded_batch(checkpoint)
    if reached is None or (reached["micro_batch"], reached["gradient_accumulation_steps"]) == (batch, accumulation):
        return batch, accumulation
    micro, steps = reached["micro_batch"], reached["gradient_accumulation_steps"]
    if micro * steps != batch * accumulation or micro > batch:
        log.warning("%s was trained at micro-batch %d x %d accumulation, which is not this run's %d rows a step; "
                    "going on at config.json's %d x %d", checkpoint, micro, steps, batch * accumulation, batch,
                    accumulation)
        return batch, accumulation
    log.info("going on at micro-batch %d x %d accumulation, as the run had after an out-of-memory retry", micro, steps)
    return micro, steps


def initial_weights(config: FinetuneConfig, model, tokenizer) -> None:
    """Put back into ``model`` (in place) the trainable weights the run started from: the base model read again
    on the CPU as ``prepare`` read it (in the dtype ``model`` has), and a LoRA adapter initialised as ``prepare``
    initialises it (``with_lora`` seeds it). Only for a restart from the start; no second copy lives on the device."""
    from ablate.core.models import load_model
    from ablate.stages.stage3_setup import with_lora

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fresh, _ = load_model(config.model, "cpu", dtype, config.attn_implementation, tokenizer)
    if config.lora_r:
        fresh = with_lora(config, fresh)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {name: value for name, value in fresh.state_dict().items() if name in trainable}
    if set(weights) != trainable:
        raise RuntimeError(f"the weights {config.model} starts from lack {sorted(trainable - set(weights))[:3]}")
    model.load_state_dict(weights, strict=False)
    del fresh
