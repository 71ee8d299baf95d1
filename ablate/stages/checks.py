"""The checks every stage config runs on its fields, before any run folder or model exists.

    python -c "from ablate.stages.checks import check_runtime; check_runtime('prefill_bidir', 'cpu', 'auto', 'sdpa')"
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

from ablate.errors import BadInput

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_runtime(mask: str, device: str, dtype: str, attn_implementation: str) -> None:
    """Checks every stage shares: mask, device, dtype, attention backend (before anything is loaded)."""
    from ablate.core.masks import MASKS, check_attention_backend  # torch: imported only when a stage runs
    from ablate.core.models import DTYPES

    if mask not in MASKS:
        raise BadInput(f"unknown mask '{mask}'; known masks: {', '.join(MASKS)}, or FILE.py:NAME (a mask function "
                       "from a file)")
    if not DEVICE.match(device):
        raise BadInput(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if dtype != "auto" and dtype not in DTYPES:
        raise BadInput(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BadInput(f"unknown attention implementation '{attn_implementation}'; "
                       f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    check_attention_backend(mask, attn_implementation)


def _check_gate(gate) -> None:
    if gate is None:
        return
    if not isinstance(gate, dict) or not isinstance(gate.get("metric"), str) or not (set(gate) & {"min", "max"}) \
            or set(gate) - {"metric", "min", "max"} \
            or not all(_is_number(gate[k]) for k in ("min", "max") if k in gate):
        raise BadInput(f"gate must look like {{metric: macro.acc, min: 0.40}} (or max:) with numbers, got {gate!r}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # numpy's seed range; lm-eval seeds numpy with it
        raise BadInput(f"--seed must be in 0..{2**32 - 1}, got {seed}")


def check_leakage(mask: str, allowed: bool) -> None:
    """A mask under which a scored token sees its own future measures copying, not the model: opt-in only."""
    from ablate.core.masks import MASKS

    spec = MASKS.get(mask)
    if spec is not None and spec.leaks_labels and not allowed:
        raise BadInput(f"mask '{mask}' lets the scored continuation see its own tokens: its accuracy measures "
                       "copying, not the model; pass --allow-label-leakage to evaluate it for diagnosis (the run "
                       "is marked leaky)")


def check_runs_dir(runs_dir: str) -> None:
    """An empty --runs-dir would put runs into the current folder, beside the code."""
    if not str(runs_dir).strip():
        raise BadInput("--runs-dir must name a folder, got ''")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(value, hint) -> bool:
    """Whether a value has the field's declared type (bool is not an int; floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def check_types(config) -> None:
    """Every field holds its declared type: a YAML ``limit: "10"`` or ``lr: .nan`` is refused, not half-used."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise BadInput(f"--{f.name.replace('_', '-')} must be {_describe(hints[f.name])}, got {value!r}")


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return "a list"
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string", dict: "a mapping"}
    return names.get(hint, str(hint))




def check_report_to(names) -> None:
    """``--report-to``: names of the Trainer's integrations whose packages are installed here, or one line."""
    if not names:
        return
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown or "all" in names or "none" in names:
        raise BadInput(f"--report-to {','.join(names)}: name integrations among "
                       f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise BadInput(f"--report-to {','.join(missing)}: not installed here (pip install {' '.join(missing)}, "
                       "or ablate[curves] for tensorboard and wandb)")


def check_batch_size(value: str) -> None:
    """An evaluation batch size: a positive whole number or ``auto`` (lm-eval's own spellings)."""
    if value != "auto" and not (str(value).isdigit() and int(value) > 0):
        raise BadInput(f"--batch-size must be a positive integer or 'auto', got '{value}'")


def check_mask_layers(mask: str, spec: str | None) -> None:
    """--mask-layers: only with a mask other than causal, and a well-formed spec (its layers are checked against the
    model once it is loaded: ablate.core.layer_masks)."""
    if spec is None:
        return
    if mask == "causal":
        raise BadInput("--mask-layers chooses the layers of a mask other than causal; the causal mask is causal in "
                       "every layer")
    from ablate.core.layer_masks import parse_layers

    parse_layers(spec, None)  # the form now; the layers against the model's once it is loaded


def resolve_mask(config) -> None:
    """``--mask path.py:name``: loaded, probed and registered as ``name@<sha8>`` (ablate.core.user_masks), the
    config's ``mask`` becoming that name and ``mask_file`` the file it came from; a config re-read from a run
    loads the recorded file again (its digest checked)."""
    if config.mask_file is None and ":" not in config.mask and "@" not in config.mask:
        return  # a registered mask's name (torch is not imported for it)
    from ablate.core.mask_files import resolve

    mask, source = resolve(config.mask, config.mask_file)
    object.__setattr__(config, "mask", mask)
    object.__setattr__(config, "mask_file", source)


def check_segments(mask: str, separator: str | None, field_name: str | None = None) -> None:
    """--segment-separator / --segment-field: what segment masks read in stage 3, and only they."""
    from ablate.core.masks import MASKS

    needs = MASKS[mask].needs_segments
    if needs and not separator and not field_name:
        raise BadInput(f"mask '{mask}' reads the prompt's segments: pass --segment-separator TEXT (e.g. '\\n\\n') "
                       "or --segment-field FIELD")
    for option, value in (("--segment-separator", separator), ("--segment-field", field_name)):
        if value is not None and not needs:
            raise BadInput(f"{option} is read by masks that read segments only (segment_bidir), not by '{mask}'")


def check_generation(mask: str, tasks: dict) -> None:
    """Generation prefills the prompt under the mask and decodes causally from the cache: a mask whose tokens
    after the prompt do not attend causally (a mask from a file, ablate.core.user_masks) cannot generate."""
    from ablate.core.masks import MASKS

    generative = sorted(name for name, task in tasks.items() if task.OUTPUT_TYPE == "generate_until")
    if generative and not MASKS[mask].causal_continuation:
        raise BadInput(f"mask '{mask}' is not causal after the prompt, so generation cannot decode under it "
                       f"(tasks {', '.join(generative)}); evaluate multiple-choice tasks with it")


def segment_separator(mask: str, tasks: dict) -> str | None:
    """A segment mask's separator: the few-shot delimiter lm-eval resolved for the tasks (one for all), else None."""
    from ablate.core.masks import MASKS

    if not MASKS[mask].needs_segments:
        return None
    delimiters = {name: task.config.fewshot_delimiter for name, task in tasks.items()}
    if len(set(delimiters.values())) != 1 or not next(iter(delimiters.values())):
        raise BadInput(f"mask '{mask}' cuts prompts at the tasks' few-shot delimiter, and these tasks do not "
                       f"share one non-empty delimiter: {delimiters}; evaluate them in separate runs")
    return next(iter(delimiters.values()))
