"""Load a decoder LM and its tokenizer for text-only use, from the hub or a local path.

    python -c "from ablate.models import load_model; print(load_model('path/to/tiny', 'cpu', 'float32')[0])"

Llama, Mistral, Ministral3 and Qwen2/3 load through ``AutoModelForCausalLM``.
Mistral3 checkpoints (the study's model family, a vision-language wrapper) are
not mapped by it: their text config is loaded into the matching causal-LM class
and the language-model weights are renamed onto it, leaving the vision tower
unloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ablate.errors import BadInput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Checkpoint key layouts of vision-language wrappers (old and transformers-5 style) -> causal LM.
TEXT_ONLY_KEY_MAPPING = {
    r"^model\.language_model\.": "model.",
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head": "lm_head",
}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device '{device}' requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # CPU kernels are slow and inexact in half precision; GPUs run bf16.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def _path(model: str) -> str:
    # Absolute for local models, so name_or_path (which a LoRA adapter records as its base) works from any cwd.
    return str(Path(model).expanduser().resolve()) if _looks_local(model) else model


def load_config(model: str):
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise BadInput(f"model path '{model}' does not exist or is not a directory")
    try:
        return AutoConfig.from_pretrained(_path(model))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot load model '{model}': {first}") from None


def load_model(
    model: str,
    device: str,
    dtype: str,
    attn_implementation: str = "sdpa",
    tokenizer=None,
):
    """Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.

    A stage 3 ``final/`` folder loads here whichever way it was saved (ablate.checkpoints).
    """
    from ablate.checkpoints import RAW, checkpoint_format, load_adapter, load_raw

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = _path(model)
    if _looks_local(model) and (Path(path) / "adapter_config.json").is_file():
        return load_adapter(Path(path), device, dtype, attn_implementation), tokenizer or load_tokenizer(model)
    config = load_config(model)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    try:
        if _looks_local(model) and checkpoint_format(path) == RAW:
            lm = load_raw(path, torch_dtype, attn_implementation)
        elif type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            lm = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        elif getattr(config, "text_config", None) is not None and type(config.text_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            lm = _load_text_only(path, config, kwargs)
        else:
            raise BadInput(f"model '{model}' ({config.model_type}) is not a decoder LM that ablate can load")
    except (OSError, ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"cannot load model '{model}': {first}") from None
    return lm.to(device).eval(), tokenizer or load_tokenizer(model)


def load_tokenizer(model: str):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    path = _path(model)
    if not (_looks_local(model) and (Path(path) / "adapter_config.json").is_file()):
        load_config(model)  # one clear error for a missing path or an unreachable hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"cannot load the tokenizer of '{model}': {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_text_only(path: str, config, kwargs):
    text_config = config.text_config
    # Wrappers tie the LM head at the top level (Mistral3 does); the text config alone may not say so.
    if getattr(config, "tie_word_embeddings", None) is not None:
        text_config.tie_word_embeddings = config.tie_word_embeddings
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    log.info("loading the text model of %s as %s", config.model_type, cls.__name__)
    lm, info = cls.from_pretrained(
        path, config=text_config, key_mapping=TEXT_ONLY_KEY_MAPPING, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise BadInput(f"text-only load of '{path}' left weights uninitialised: {missing[:5]}")
    return lm
