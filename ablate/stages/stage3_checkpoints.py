"""Which of a stage 3 run's checkpoints are intact: recorded digests, then structure.

    python -c "from ablate.stages.stage3_checkpoints import intact; print(intact('runs/stage3_finetune_causal/RUN'))"

The Trainer writes a checkpoint's files in place, one after the other, so a kill or a full disk leaves a
checkpoint folder that looks whole but is not. Once the Trainer has finished a checkpoint,
``RecordCheckpoints`` records the sha256 of each of its files in ``checkpoints/digests.json``; a checkpoint is
intact only if it is recorded there, its files are still those, and each passes a structural check
(safetensors header against the file size, the zip central directory of torch files). ``--resume`` uses the
newest intact checkpoint (ablate.stages.stage3_resume); stage 4 refuses a named one that is not.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from ablate.core.identity import file_digests
from ablate.results.files import read_json, write_json

REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
DIGESTS = "digests.json"  # in the checkpoints folder, so it travels with the checkpoints (remote sync, push)


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


def record(checkpoint: Path, train_batch: dict | None = None) -> None:
    """Add a finished checkpoint's digests to ``digests.json`` (atomically), dropping rotated-away ones, with the
    per-device ``train_batch`` (micro-batch, accumulation) it was trained at: after an out-of-memory retry it is
    not config.json's, and the Trainer's own trainer_state.json keeps the first run's."""
    checkpoint = Path(checkpoint)
    manifest = _manifest(checkpoint.parent) or {}
    manifest = {name: entry for name, entry in manifest.items() if (checkpoint.parent / name).is_dir()}
    manifest[checkpoint.name] = {"step": step_of(checkpoint), "files": file_digests(checkpoint),
                                 **({"train_batch": train_batch} if train_batch else {})}
    write_json(checkpoint.parent / DIGESTS, manifest)


def recorded_batch(checkpoint: Path) -> dict | None:
    """The ``train_batch`` ``record`` wrote for ``checkpoint`` (``{"micro_batch", "gradient_accumulation_steps"}``,
    positive integers), or None."""
    entry = (_manifest(Path(checkpoint).parent) or {}).get(Path(checkpoint).name)
    batch = entry.get("train_batch") if isinstance(entry, dict) else None
    keys = ("micro_batch", "gradient_accumulation_steps")
    if not isinstance(batch, dict) or set(batch) != set(keys):
        return None
    if not all(type(batch[k]) is int and batch[k] > 0 for k in keys):
        return None
    return batch


def _manifest(folder: Path) -> dict | None:
    data, _ = read_json(Path(folder) / DIGESTS)
    return data if isinstance(data, dict) else None


def changed(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not what stage 3 saved (not recorded, or a file added, gone or changed since), or None.

    Files are digested through ``ablate.core.identity``'s stat-keyed cache: an untouched checkpoint costs a stat
    per file, a changed one is read.
    """
    checkpoint = Path(checkpoint)
    entry = (_manifest(checkpoint.parent) or {}).get(checkpoint.name)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        return f"not recorded in {DIGESTS} (its save never finished, or another tool made it)"
    recorded = entry["files"]
    try:
        found = file_digests(checkpoint)
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is gone since stage 3 saved it"
        if name not in recorded:
            return f"{name} was added after stage 3 saved it"
        if found[name] != recorded[name]:
            return (f"{name} changed after stage 3 saved it: sha256 {found[name][:12]}, recorded "
                    f"{str(recorded[name])[:12]}")
    return None


def problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be used (resumed from, scored), or None: its structure, then its recorded digests."""
    checkpoint = Path(checkpoint)
    return _damage(checkpoint) or changed(checkpoint)


def _damage(checkpoint: Path) -> str | None:
    """Structural damage; reads headers only, never the tensors."""
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


def newest_intact(run_dir: Path) -> tuple[Path | None, tuple[str, ...]]:
    """The newest checkpoint that passes ``problem`` (or None), and why each newer one was passed over."""
    passed_over = []
    for checkpoint in reversed(checkpoints(run_dir)):
        why = problem(checkpoint)
        if why is None:
            return checkpoint, tuple(passed_over)
        passed_over.append(f"checkpoint {checkpoint} is not intact ({why}); trying an older one")
    return None, tuple(passed_over)


def intact(run_dir: Path) -> list[Path]:
    return [c for c in checkpoints(run_dir) if problem(c) is None]


class RecordCheckpoints(TrainerCallback):
    """Records each checkpoint's digests once the Trainer has written all of it (``on_save`` follows the save)."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's rng_state_N.pth is in the folder
        if self.is_main:
            record(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                   {"micro_batch": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps})
