"""Stage 3 ``--resume``: which run and which checkpoint, checked cheaply, and the test-only kill switch.

    python -c "from ablate.stages.stage3_resume import newest_intact; print(newest_intact('runs/stage3_finetune_prefill_bidir/RUN'))"

Only a ``failed`` or ``crashed`` run is resumed; a completed, gated or diverged
one is refused. The Trainer writes a checkpoint's files in place, one after the
other, so a kill or a full disk leaves a checkpoint folder that looks whole but
is not: each file is checked (safetensors header against the file size, the
zip central directory of torch files) and an older intact checkpoint is used
when the newest is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from ablate.results import rundir
from ablate.results.files import read_json, write_jsonl
from ablate.errors import BadInput
from ablate.faults import fault_point

log = logging.getLogger(__name__)
RESUMABLE = (rundir.FAILED, rundir.CRASHED)
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
FAULT_ENV = "ABLATE_FAULT_KILL_AT"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (intact or not)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.split("-")[1])


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated (header)"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end}"
    return None


def problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None; reads headers only, never the tensors."""
    checkpoint = Path(checkpoint)
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in WEIGHTS):
        missing.append("model weights")
    if not list(checkpoint.glob("rng_state*.pth")):  # without it the data order and dropout would differ
        missing.append("rng_state.pth")
    if missing:
        return "missing " + ", ".join(missing)
    state, why = read_json(checkpoint / "trainer_state.json")
    if state is None:
        return why
    if state.get("global_step") != step_of(checkpoint):
        return f"trainer_state.json is at step {state.get('global_step')}"
    for path in sorted(checkpoint.iterdir()):
        why = None
        try:
            if path.suffix == ".safetensors":
                why = _safetensors_problem(path)
            elif path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()  # torch.save writes a zip; truncation loses its central directory
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, struct.error) as exc:
            why = f"{path.name}: {type(exc).__name__}: {exc}"
        if why:
            return why
    return None


def newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes ``problem``; says which newer ones were passed over and why."""
    for checkpoint in reversed(checkpoints(run_dir)):
        why = problem(checkpoint)
        if why is None:
            return checkpoint
        log.warning("checkpoint %s is not intact (%s); trying an older one", checkpoint, why)
    return None


def intact(run_dir: Path) -> list[Path]:
    return [c for c in checkpoints(run_dir) if problem(c) is None]


def find_resumable(runs_dir: Path, stage: str) -> Path:
    """The latest failed or crashed run of ``stage`` with an intact checkpoint."""
    run = rundir.latest(runs_dir, stage, statuses=RESUMABLE, need_results=False, where=lambda r: intact(r.path))
    if run is None:
        raise BadInput(f"nothing to resume: no failed or crashed run with an intact checkpoint in {Path(runs_dir) / stage}")
    return run.path


def resumable_run(path: Path, stage: str, flag: str = "--run-dir") -> Path:
    """A run the user named for ``--resume``: a ``stage`` run that failed or crashed, with an intact checkpoint."""
    run = rundir.explicit_run(Path(path).resolve(), stage, flag, statuses=tuple(rundir.Status), need_results=False)
    if run.status not in RESUMABLE:
        raise BadInput(f"{flag} {path} is {run.status}" + (f" ({run.reason})" if run.reason else "")
                       + "; only a failed or crashed run can be resumed")
    if not intact(run.path):
        raise BadInput(f"nothing to resume: {path} has no intact checkpoint")
    return run.path


def check_base(run_dir: Path, model: str, identity: dict) -> None:
    """Refuse to go on from another base model than the run started from (same path, new weights)."""
    from ablate.core.identity import describe

    info, _ = read_json(Path(run_dir) / rundir.RUN_FILE)
    recorded = (info or {}).get("model_identity")
    if recorded is None:
        log.warning("%s does not record its base model's identity (made by an older ablate); not checked", run_dir)
    elif recorded != identity:
        raise BadInput(f"{run_dir} was started from {describe(recorded)}, but {model} is now {describe(identity)}; "
                       "resuming would mix two models")


def check_data(run_dir: Path, config, identity: dict) -> None:
    """Refuse to go on with other training data than the run started on (a ``--data`` file edited since)."""
    info, _ = read_json(Path(run_dir) / rundir.RUN_FILE)
    recorded = (info or {}).get("data_identity")
    if recorded is None:
        log.warning("%s does not record its training data's digest (made by an older ablate); not checked", run_dir)
        return
    for key, flag in (("data", "--data"), ("eval_data", "--eval-data")):
        if recorded.get(key) != identity.get(key):
            was, now = (recorded.get(key) or {}), (identity.get(key) or {})
            raise BadInput(f"{run_dir} was started on {flag} {getattr(config, key)} with sha256 "
                           f"{str(was.get('sha256'))[:12]}, which is now {str(now.get('sha256'))[:12]}; "
                           "resuming would train on other data")


def saved_config(run_dir: Path):
    from ablate.stages.config import FinetuneConfig

    saved, why = read_json(Path(run_dir) / "config.json")
    if saved is None:
        raise BadInput(f"nothing to resume: {why or f'{run_dir} has no config.json'}")
    try:
        return FinetuneConfig(**{**saved, "runs_dir": str(Path(run_dir).parent.parent)})
    except TypeError as exc:
        raise BadInput(f"{run_dir}/config.json does not fit this version of ablate: {exc}") from None


def trim_train_log(path: Path, history: list[dict]) -> list[dict]:
    """Keep the rows the checkpoint had logged, so each step is in ``train_log.jsonl`` once after a resume."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the kill
    # One row per Trainer.log call, as in log_history; rows past the checkpoint's come from the lost attempt.
    kept = rows[: len(history)]
    if [r.get("step") for r in kept] != [e.get("step") for e in history]:
        log.warning("%s does not match the checkpoint's log history; rebuilt from it", path)
        kept = [{"step": e.get("step"), "time": None, **e} for e in history]
    write_jsonl(path, kept)
    return kept


def mean_loss(history: list[dict]) -> float | None:
    """Mean training loss over the logged steps (each logged loss covers the steps since the previous one)."""
    total = steps = previous = 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * span, steps + span, entry["step"]
    return total / steps if steps else None


# ---------------------------------------------------------------- fault injection (tests only)

def fault(moment: str, step: int | None = None) -> None:
    """Stage 3's kill points for ablate.faults (``ABLATE_FAULT_KILL_AT``). Test-only.

    ``step:N`` after optimizer step N; ``save:N`` inside checkpoint N's save (weights written, optimizer and
    trainer_state.json not); ``eval`` during the evaluation after the last step; ``final_save`` inside the
    final save (weights written, tokenizer and checkpoint_meta.json not).
    """
    fault_point(moment if step is None else f"{moment}:{step}")


class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        fault("step", state.global_step)

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            fault("eval")


def arm_final_save(tokenizer) -> None:
    # save_final writes the weights, then the tokenizer: a kill there leaves final/ half-written.
    if os.environ.get(FAULT_ENV, "").partition("/")[0] == "final_save":
        tokenizer.save_pretrained = lambda *args, **kwargs: fault("final_save")
