"""``--config FILE``: a study's settings in one YAML, between the package defaults and the flags.

    printf 'model: /tmp/tiny\\ntasks: [ablate_tiny]\\ndevice: cpu\\nstage3: {max_steps: 20}\\n' > study.yaml
    ablate stage1 --config study.yaml && ablate stage3 --config study.yaml --data tests/data/sft.jsonl

Precedence: dataclass defaults < the stage YAML in the package < ``--config`` < flags typed on the command line.
Fields at the file's top level apply to every stage that has them (``model``, ``tasks``, ``device``,
``limit``, ``seed``, ...); a section per stage (``stage1:``, ``stage2:``, ``stage3:``, ``stage4:``)
overrides them for that stage; ``study:`` holds what only ``ablate study`` reads. A plain file of one
stage's fields is a file with a top level only. A key no stage has, a key a section's stage does not
have, or a value of the wrong type is refused naming the file and the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path

import yaml

from ablate.errors import BadInput
from ablate.stages.checks import _describe, _fits

SECTIONS = {"stage1": "stage1_baseline_eval", "stage2": "stage2_ablation_eval", "stage3": "stage3_finetune",
            "stage4": "stage4_post_ft_eval"}
# What `ablate study` alone reads (ablate.stages.study).
STUDY_KEYS = {"masks": "a list of stage 3 masks (causal, prefill_bidir)",
              "report": "where the report goes (default: RESULTS.md beside the runs folder)"}
# Fields no file sets: what a stage is, and which run a file's settings were resolved from.
NOT_IN_FILES = ("stage", "config_file")


def settable(section: str, classes: dict[str, type]) -> dict[str, typing.Any]:
    """``field -> type`` a file may set for a stage: its command's options and its YAML-only fields (gates).

    ``classes``: section -> the stage's config dataclass (``ablate.stages.config.SECTIONS``).
    """
    cls = classes[section]
    hints = typing.get_type_hints(cls)
    # Stage 1 is the causal baseline: its command has no --mask, --baseline or --ignore-gate, nor does a file.
    skip = set(NOT_IN_FILES) | ({"mask", "baseline", "ignore_gate"} if section == "stage1" else set())
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def read(path: str | Path, classes: dict[str, type]) -> tuple[dict, dict]:
    """The file's mapping, checked key by key against every stage, and ``{path, sha256}`` to record."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"--config {path}: {exc.strerror or exc}") from None
    try:
        values = yaml.safe_load(data.decode()) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInput(f"--config {path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise BadInput(f"--config {path}: expected field: value pairs, got {type(values).__name__}")
    check(path, values, classes)
    return values, {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}


def check(path: Path, values: dict, classes: dict[str, type]) -> None:
    """Every key of the file belongs somewhere and every value has its field's type (all stages, up front)."""
    fields = {s: settable(s, classes) for s in SECTIONS}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise BadInput(f"--config {path}: section {key} must hold field: value pairs, got {value!r}")
            for name, v in value.items():
                if name not in fields[key]:
                    raise BadInput(f"--config {path}: {key}.{name} is not a {key} field (see `ablate {key} --help`)")
                _check_value(path, f"{key}.{name}", v, fields[key][name])
        elif key == "study":
            if not isinstance(value, dict) or set(value) - set(STUDY_KEYS):
                unknown = sorted(set(value) - set(STUDY_KEYS)) if isinstance(value, dict) else [repr(value)]
                raise BadInput(f"--config {path}: study: unknown {', '.join(map(str, unknown))}; it takes "
                               + ", ".join(f"{k} ({v})" for k, v in STUDY_KEYS.items()))
        else:
            owners = [s for s in SECTIONS if key in fields[s]]
            if not owners:
                raise BadInput(f"--config {path}: unknown field {key} (no stage has it; sections are "
                               f"{', '.join(SECTIONS)}, study)")
            for section in owners:
                _check_value(path, key, value, fields[section][key])


def _check_value(path: Path, key: str, value, hint) -> None:
    value = _as_field(key.rsplit(".", 1)[-1], value, hint)
    if not _fits(value, hint):
        raise BadInput(f"--config {path}: {key} must be {_describe(hint)}, got {value!r}")


def _as_field(name: str, value, hint):
    """The spellings the stage YAMLs and flags accept too: ``tasks: a,b``, a list for a tuple, ``batch_size: 8``."""
    if name == "tasks" and isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    if name in ("task_data", "checkpoints") and isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    if hint in (str, str | None) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # evaluation's batch size is a string ('auto' or a number)
    return value


def section_of(stage: str) -> str:
    """``stage1_baseline_eval`` -> ``stage1``; every stage 3 mask reads ``stage3``."""
    for section, name in SECTIONS.items():
        if stage == name or stage.startswith(name):
            return section
    raise ValueError(stage)


def stage_values(values: dict, section: str, classes: dict[str, type]) -> dict:
    """The file's values for one stage: the top-level fields it has, then its own section over them."""
    fields = settable(section, classes)
    out = {k: v for k, v in values.items() if k in fields}
    out.update(values.get(section) or {})
    return {k: _as_field(k, v, fields[k]) for k, v in out.items()}


def study_values(values: dict) -> dict:
    return dict(values.get("study") or {})
