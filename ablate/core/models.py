"""Load a decoder LM and its tokenizer for text-only use, from the hub or a local path.

    python -c "from ablate.core.models import load_model; print(load_model('path/to/tiny', 'cpu', 'float32')[0])"

Llama, Mistral, Ministral3 and Qwen2/3 load through ``AutoModelForCausalLM``.
Mistral3 checkpoints (the study's model family, a vision-language wrapper) are
not mapped by it: their text config is loaded into the matching causal-LM class
and the language-model weights are renamed onto it, leaving the vision tower
unloaded.

Every path refuses weights that do not cover the config (missing, unexpected or
mis-shaped keys, unreadable files) with one ``BadInput`` line, instead of
evaluating randomly initialised layers.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ablate.core.checkpoints import RAW, checkpoint_format, load_raw, refuse_unfit_weights
from ablate.errors import BadInput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Checkpoint key layouts of vision-language wrappers (old and transformers-5 style) -> causal LM.
TEXT_ONLY_KEY_MAPPING = {
    r"^model\.language_model\.": "model.",
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head": "lm_head",
}
# The wrapper's non-text weights: left unloaded on purpose, so not unexpected.
TEXT_ONLY_SKIPPED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def resolve_device(device: str) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device '{device}' requested but CUDA is not available on this machine")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under accelerate launch / torchrun
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # CPU kernels are slow and inexact in half precision; GPUs run bf16.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def base_model(model):
    """The transformers model under a DistributedDataParallel wrapper (a training step's) or a peft one."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolved(model) -> dict:
    """What transformers resolved a loaded model to: its parameters' dtype and ``config._attn_implementation``
    (its only accessor in transformers 5; e.g. a flash attention request served by a hub kernel)."""
    base = base_model(model)
    return {"dtype": str(base.dtype).removeprefix("torch."), "attn_implementation": base.config._attn_implementation}


def check_resolved(model, record: dict, what: str) -> None:
    """Refuse, naming the key, a model that transformers resolved otherwise than ``record`` (a comparison
    record, made before the load from what was asked) says: what is recorded is what ran."""
    found = resolved(model)
    differ = [f"{key} '{value}' where '{record.get(key)}' was asked for" for key, value in found.items()
              if record.get(key) != value]
    if differ:
        raise BadInput(f"transformers loaded {what} with {'; '.join(differ)}; ask for what it resolves to "
                       "(--attn-implementation, --dtype), so that the run records what it computed with")


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def _path(model: str) -> str:
    # Absolute for local models, so name_or_path (which a LoRA adapter records as its base) works from any cwd.
    return str(Path(model).expanduser().resolve()) if _looks_local(model) else model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(model: str):
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise BadInput(f"model path '{model}' does not exist or is not a directory")
    try:
        return AutoConfig.from_pretrained(_path(model))
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load model '{model}': {_first_line(exc)}") from None


def loading_problems(info: dict, skipped: re.Pattern | None = None) -> dict:
    """``from_pretrained(output_loading_info=True)``'s report as ``refuse_unfit_weights`` groups.

    transformers already leaves out tied weights (e.g. ``lm_head.weight`` under
    ``tie_word_embeddings``) and non-persistent buffers such as rotary ``inv_freq``;
    its ``error_msgs`` never get here, as it raises a RuntimeError on them itself.
    """
    return {
        "missing": info["missing_keys"],
        "unexpected": [k for k in info["unexpected_keys"] if not (skipped and skipped.search(k))],
        "of another shape": [f"{key} {list(ckpt)} in checkpoint vs {list(expected)}"
                             for key, ckpt, expected in info["mismatched_keys"]],
    }


def _no_load_report(record: logging.LogRecord) -> bool:
    # transformers logs a multi-line table of what refuse_unfit_weights then says in one line; a
    # conversion-error table is kept, as the RuntimeError that follows it points there.
    message = record.getMessage()
    return "LOAD REPORT" not in message or "CONVERSION" in message


@contextmanager
def _quiet_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_no_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_no_load_report)


def load_model(
    model: str,
    device: str,
    dtype: str,
    attn_implementation: str = "sdpa",
    tokenizer=None,
):
    """Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.

    A stage 3 ``final/`` folder loads here whichever way it was saved (ablate.core.checkpoints).
    Weights that do not cover the config are refused with ``BadInput``.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path, local = _path(model), _looks_local(model)
    log.debug("loading %s (%s, %s, %s)", model, device, str(torch_dtype).replace("torch.", ""), attn_implementation)
    try:
        if local and (Path(path) / "adapter_config.json").is_file():
            lm = load_adapter(Path(path), device, dtype, attn_implementation)
        else:
            lm = _load_weights(model, path, torch_dtype, attn_implementation)
    except SafetensorError as exc:  # neither OSError nor ValueError
        raise BadInput(f"cannot load model '{model}': unreadable safetensors file ({_first_line(exc)})") from None
    except (OSError, ImportError, ValueError) as exc:
        # A folder removed while loading reads as an invalid hub id to transformers.
        reason = "the folder is gone" if local and not Path(path).is_dir() else _first_line(exc)
        raise BadInput(f"cannot load model '{model}': {reason}") from None
    return lm.to(device).eval(), tokenizer or load_tokenizer(model)


def _load_weights(model: str, path: str, torch_dtype: torch.dtype, attn_implementation: str):
    config = load_config(model)
    if _looks_local(model) and checkpoint_format(path) == RAW:
        return load_raw(path, torch_dtype, attn_implementation)
    # Shapes that differ are reported in the loading info, to be refused below with their keys.
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True,
                  ignore_mismatched_sizes=True)
    with _quiet_load_report():
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            lm, info = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
            refuse_unfit_weights(f"model '{model}'", loading_problems(info))
        elif getattr(config, "text_config", None) is not None and type(config.text_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            lm, info = _load_text_only(path, config, kwargs)
            refuse_unfit_weights(f"the text model of '{model}'", loading_problems(info, TEXT_ONLY_SKIPPED))
        else:
            raise BadInput(f"model '{model}' ({config.model_type}) is not a decoder LM that ablate can load")
    return lm


def load_tokenizer(model: str):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    path = _path(model)
    if not (_looks_local(model) and (Path(path) / "adapter_config.json").is_file()):
        load_config(model)  # one clear error for a missing path or an unreachable hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load the tokenizer of '{model}': {_first_line(exc)}") from None
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
    return cls.from_pretrained(path, config=text_config, key_mapping=TEXT_ONLY_KEY_MAPPING, **kwargs)


def load_adapter(path: Path, device: str, dtype: str, attn_implementation: str):
    """A LoRA adapter folder: its base model with the adapter merged in, for evaluation."""
    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_pretrained(str(path))
    base_id = config.base_model_name_or_path
    if not base_id:
        raise BadInput(f"LoRA adapter '{path}' names no base model")
    try:
        base, _ = load_model(base_id, device, dtype, attn_implementation)
    except BadInput as exc:
        raise BadInput(f"LoRA adapter '{path}': its base model: {exc}") from None
    config.inference_mode = True
    model = get_peft_model(base, config)
    # What PeftModel.from_pretrained does, but keeping load_adapter's result, which it only warns
    # about. peft has no loading report for shapes: ignore_mismatched_sizes turns a shape that does
    # not fit the base into a missing key (and a warning) instead of a multi-line RuntimeError.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some weights of .* were not initialized")
        result = model.load_adapter(str(path), "default", ignore_mismatched_sizes=True)
    refuse_unfit_weights(f"LoRA adapter '{path}'", {
        "missing or of another shape": result.missing_keys, "unexpected": result.unexpected_keys,
    }, against=f"base model '{base_id}'")
    return model.merge_and_unload().eval()
