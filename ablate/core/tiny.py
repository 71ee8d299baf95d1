"""Tiny randomly initialised decoder LMs of real architectures, built offline.

    ablate tiny-model --arch llama --out /tmp/tiny-llama

Used by the tests and the offline quickstart, where the model hub is out of
reach. The tokenizer is a byte-level BPE trained with ``tokenizers`` on the
bundled task data, so every string encodes. A random model scores at chance:
these models test the plumbing, not the science.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ablate.errors import BadInput

TASK_DATA = Path(__file__).parent / "task_data"

_TEXT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "mistral3")


def corpus() -> list[str]:
    """Every string value in the bundled task data: enough to learn a small BPE."""
    texts: list[str] = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in sorted(TASK_DATA.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise BadInput(f"unknown tiny architecture '{arch}'; choose from {', '.join(ARCHS)}")
    text = {**_TEXT, **overrides}
    if arch == "mistral3":
        from transformers import Mistral3Config

        vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
        return Mistral3Config(text_config={"model_type": "ministral3", **text}, vision_config=vision,
                              image_token_index=text["vocab_size"] - 1)
    return AutoConfig.for_model(arch, **text)


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model plus tokenizer to ``out`` (save_pretrained format)."""
    from transformers import AutoModelForCausalLM, Mistral3ForConditionalGeneration

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if arch == "mistral3":
        model = Mistral3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer(config.get_text_config().vocab_size).save_pretrained(out)
    return out
