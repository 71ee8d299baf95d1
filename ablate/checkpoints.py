"""Saving a finished model whatever goes wrong, and loading it back whatever format it took.

    python -c "from ablate.checkpoints import checkpoint_format; print(checkpoint_format('runs/.../final'))"

``save_pretrained`` (safetensors) is tried first. In the study it crashed at the
end of a finished finetune, so on any error the raw state dict is written with
``safetensors`` instead, beside ``checkpoint_meta.json`` (``"format":
"raw_state_dict"``), the model config and the tokenizer files.
``ablate.models.load_model`` reads both formats.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ablate.rundir import write_json

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
    return info


def save_raw(model, file: Path) -> None:
    # save_model drops the duplicate names of tied weights, which save_file refuses.
    save_safetensors_model(model, str(file))


def load_adapter(path: Path, device: str, dtype: str, attn_implementation: str):
    """A LoRA adapter folder: its base model with the adapter merged in, for evaluation."""
    from peft import PeftConfig, PeftModel

    from ablate.models import load_model

    base_id = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    base, _ = load_model(base_id, device, dtype, attn_implementation)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()


def checkpoint_format(path: Path) -> str | None:
    meta = Path(path) / META
    return json.loads(meta.read_text()).get("format") if meta.is_file() else None


def load_raw(path: Path, dtype: torch.dtype, attn_implementation: str):
    """Rebuild the model from its config and fill it from the raw state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = load_safetensors_model(model, str(path / RAW_WEIGHTS), strict=False)
    # Tied weights are stored once; anything else missing is a broken checkpoint.
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise ValueError(f"raw state dict at {path} does not fit {type(model).__name__}: "
                         f"missing {really_missing[:3]}, unexpected {list(unexpected)[:3]}")
    model.tie_weights()
    return model.to(dtype)
