"""Saving a finished model whatever goes wrong, and loading it back whatever format it took.

    python -c "from ablate.core.checkpoints import checkpoint_format; print(checkpoint_format('runs/.../final'))"

``save_pretrained`` (safetensors) is tried first. In the study it crashed at the
end of a finished finetune, so on any error the raw state dict is written with
``safetensors`` instead, beside ``checkpoint_meta.json`` (``"format":
"raw_state_dict"``), the model config and the tokenizer files.
``ablate.core.models.load_model`` reads both formats.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ablate.errors import BadInput
from ablate.faults import fault_point
from ablate.results.rundir import write_json

log = logging.getLogger(__name__)

META = "checkpoint_meta.json"
RAW_WEIGHTS = "raw_state_dict.safetensors"
HF, RAW = "hf_save_pretrained", "raw_state_dict"


def save_final(model, tokenizer, out: Path) -> dict:
    """Save ``model`` to ``out``; returns what happened (``format``, and ``save_error`` on fallback)."""
    out = Path(out)
    adapter = hasattr(model, "peft_config")
    try:
        model.save_pretrained(out, safe_serialization=True)  # a peft model saves its adapter only
        fault_point("final_save")  # tests only: a kill here leaves final/ half-written
        tokenizer.save_pretrained(out)
        info = {"format": HF}
    except Exception as exc:  # any failure of the HF path: keep the weights another way
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("save_pretrained failed (%s); writing the raw state dict instead", error)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if adapter:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            # The adapter's own state dict in peft's file layout, so PeftModel.from_pretrained reads it.
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
                      str(out / "adapter_model.safetensors"))
            model.peft_config["default"].save_pretrained(out)
        else:
            save_raw(model, out / RAW_WEIGHTS)
            model.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        info = {"format": RAW, "save_error": error}
    info["adapter"] = adapter
    info.update(
        model_class=type(model).__name__,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )
    write_json(out / META, {**info, "config": model.config.to_dict()})
    from ablate.core.identity import folder_fingerprint

    info["fingerprint"] = folder_fingerprint(out)  # what stage 4 checks final/ against (verify_final)
    return info


def verify_final(model_dir: Path, summary: dict, what: str) -> dict:
    """The identity of a stage 3 model folder, refused in one line unless it is what its run recorded.

    ``summary["save"]["fingerprint"]`` is the digest of ``final/`` as saved; a LoRA adapter's base model (the
    path its adapter_config.json names) must still be the model it was trained on (``summary["model_identity"]``).
    """
    from ablate.core.identity import describe, model_identity

    recorded = (summary.get("save") or {}).get("fingerprint")
    if not recorded:
        raise BadInput(f"{what} does not record the digest of its final/ model (summary.json incomplete or edited); "
                       "rerun stage 3")
    identity = model_identity(str(model_dir))
    if identity["local"] != recorded:
        raise BadInput(f"{model_dir} changed after stage 3 saved it (digest {identity['local'][:12]}, recorded "
                       f"{recorded[:12]}): its weights or config were replaced; restore it or rerun stage 3")
    if "base" in identity and identity["base"] != summary.get("model_identity"):
        raise BadInput(f"the LoRA adapter {model_dir} was trained on {describe(summary.get('model_identity'))}, but "
                       f"its base model path now holds {describe(identity['base'])}; restore that base model")
    return identity


def save_raw(model, file: Path) -> None:
    # save_model drops the duplicate names of tied weights, which save_file refuses.
    save_safetensors_model(model, str(file))


def refuse_unfit_weights(what: str, problems: dict, against: str = "its config") -> None:
    """Raise one line naming the first few keys of each non-empty ``{label: keys}`` group."""
    parts = []
    for label, keys in problems.items():
        keys = sorted(map(str, keys))
        if keys:
            more = ", ..." if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{more})")
    if parts:
        raise BadInput(f"cannot load {what}: its weights do not fit {against}: {'; '.join(parts)}")


def checkpoint_format(path: Path) -> str | None:
    meta = Path(path) / META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("format")
    except (ValueError, AttributeError) as exc:  # bad JSON or bytes, or not an object
        raise ValueError(f"unreadable {META}: {exc}") from None


def load_raw(path: Path, dtype: torch.dtype, attn_implementation: str):
    """Rebuild the model from its config and fill it from the raw state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    file = path / RAW_WEIGHTS
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # Keys are compared here, not by from_pretrained: this path exists for models whose save_pretrained
    # failed, and the file holds the in-memory names, not a checkpoint layout for its key conversions.
    # Shapes first: load_state_dict would raise them as one multi-line RuntimeError.
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as weights:
        shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    refuse_unfit_weights(f"raw state dict '{path}'", {"of another shape": [
        f"{key} {shape} in checkpoint vs {expected[key]}"
        for key, shape in shapes.items() if expected.get(key, shape) != shape]})
    # save_model kept one name of each tied pair; load_model counts the other as loaded, not missing.
    missing, unexpected = load_safetensors_model(model, str(file), strict=False)
    refuse_unfit_weights(f"raw state dict '{path}'", {"missing": missing, "unexpected": unexpected})
    model.tie_weights()
    return model.to(dtype)
