"""Loading refuses weights that do not cover the config: python -m pytest tests/test_loading.py -q

Each fault is made on a copy of a tiny model and must give one BadInput line
naming the path and the offending keys, never a traceback or random weights.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ablate.core.checkpoints import save_final
from ablate.errors import BadInput
from ablate.core.models import load_model

IDS = torch.tensor([[1, 5, 9, 33, 2, 7]])


def copy(src, dst, config=None, weights=None, file="model.safetensors"):
    """Copy a model folder; ``config`` edits its config dict, ``weights`` its state dict."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    if weights:
        state = load_file(dst / file)
        weights(state)
        save_file(state, dst / file, metadata={"format": "pt"})
    return dst


def check_refused(path, match):
    with pytest.raises(BadInput, match=match) as info:
        load_model(str(path), "cpu", "float32")
    message = str(info.value)
    assert "\n" not in message and str(path.name) in message
    return message


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def llama(tiny_models, tmp_path):
    return copy(tiny_models("llama"), tmp_path / "llama")


# hub id / local folder (AutoModelForCausalLM.from_pretrained)


def test_a_good_model_loads(llama):
    model, tokenizer = load_model(str(llama), "cpu", "float32")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token


def test_tied_lm_head_is_not_missing(tiny_models):
    model, _ = load_model(str(tiny_models("llama", tie_word_embeddings=True)), "cpu", "float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_lm_head_absent_is_missing(llama):
    copy(llama, llama.parent / "nohead", weights=lambda s: s.pop("lm_head.weight"))
    check_refused(llama.parent / "nohead", r"1 missing \(lm_head\.weight\)")


def test_more_layers_than_weights(llama, capfd):
    copy(llama, llama.parent / "deeper", config=lambda c: c.update(num_hidden_layers=3))
    message = check_refused(llama.parent / "deeper", r"weights do not fit its config: 9 missing \(model\.layers\.2\.")
    assert "unexpected" not in message
    assert "LOAD REPORT" not in capfd.readouterr().err  # the one line replaces transformers' table


def test_deleted_tensor(llama):
    copy(llama, llama.parent / "holed", weights=lambda s: s.pop("model.layers.0.mlp.up_proj.weight"))
    check_refused(llama.parent / "holed", r"1 missing \(model\.layers\.0\.mlp\.up_proj\.weight\)")


def test_unexpected_tensor(llama):
    copy(llama, llama.parent / "extra", weights=lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    check_refused(llama.parent / "extra", r"1 unexpected \(model\.layers\.0\.extra\.weight\)")


def test_shape_mismatch_is_an_error_not_a_reinit(llama):
    copy(llama, llama.parent / "wider", config=lambda c: c.update(intermediate_size=96))
    check_refused(llama.parent / "wider", r"6 of another shape \(model\.layers\.0\.mlp\.down_proj\.weight "
                                    r"\[32, 64\] in checkpoint vs \[32, 96\]")


def test_config_of_another_architecture(llama):
    copy(llama, llama.parent / "gpt2", config=lambda c: c.update(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=1, n_embd=32, n_head=4))
    check_refused(llama.parent / "gpt2", r"missing \(transformer\..*; \d+ unexpected \(model\.embed_tokens\.weight")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(llama, damage):
    file = llama / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    check_refused(llama, "unreadable safetensors file")


@pytest.mark.parametrize("text", [b"{not json", b'{"model_type": "llama", "x": "\xff\xfe"}', b""])
def test_unreadable_config(llama, text):
    (llama / "config.json").write_bytes(text)
    check_refused(llama, "config.json' is not a valid JSON file")


def test_no_weight_files(llama):
    (llama / "model.safetensors").unlink()
    check_refused(llama, "no file named model.safetensors")


def test_path_vanishing_between_checks(llama, monkeypatch):
    import ablate.core.models

    load_config = ablate.core.models.load_config

    def then_vanish(model):
        config = load_config(model)
        shutil.rmtree(llama)
        return config

    monkeypatch.setattr(ablate.core.models, "load_config", then_vanish)
    check_refused(llama, "cannot load model .*llama': the folder is gone")


# Mistral3 text-only


def test_mistral3_text_weight_missing(tiny_models, tmp_path):
    path = copy(tiny_models("mistral3"), tmp_path / "m3",
                weights=lambda s: s.pop("language_model.model.layers.1.self_attn.q_proj.weight"))
    message = check_refused(path, r"text model of .*: 1 missing \(model\.layers\.1\.self_attn\.q_proj\.weight\)")
    assert "vision" not in message  # the unloaded vision tower is not unexpected


# stage 3 raw_state_dict


@pytest.fixture
def raw(tmp_path, monkeypatch):
    """Save ``source`` through the raw fallback, as stage 3 does when save_pretrained fails."""
    from transformers import PreTrainedModel

    def save(source, name="raw"):
        model, tokenizer = load_model(str(source), "cpu", "float32")
        with monkeypatch.context() as patch:
            patch.setattr(PreTrainedModel, "save_pretrained", lambda *a, **k: 1 / 0)
            assert save_final(model, tokenizer, tmp_path / name)["format"] == "raw_state_dict"
        return tmp_path / name, model

    return save


@pytest.mark.parametrize("tied", [False, True])
def test_raw_round_trip(tiny_models, raw, tied):
    path, model = raw(tiny_models("llama", tie_word_embeddings=tied))
    stored = load_file(path / "raw_state_dict.safetensors")
    assert ("model.embed_tokens.weight" in stored) is not tied  # a tied pair is stored once
    reloaded, _ = load_model(str(path), "cpu", "float32")
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_raw_key_removed(llama, raw):
    path, _ = raw(llama)
    copy(path, path.parent / "raw-holed", file="raw_state_dict.safetensors",
         weights=lambda s: s.pop("model.norm.weight"))
    check_refused(path.parent / "raw-holed", r"raw state dict .*: 1 missing \(model\.norm\.weight\)")


def test_raw_untied_lm_head_removed(llama, raw):
    path, _ = raw(llama)
    copy(path, path.parent / "raw-nohead", file="raw_state_dict.safetensors",
         weights=lambda s: s.pop("lm_head.weight"))
    check_refused(path.parent / "raw-nohead", r"1 missing \(lm_head\.weight\)")


def test_raw_unexpected_key(llama, raw):
    path, _ = raw(llama)
    copy(path, path.parent / "raw-extra", file="raw_state_dict.safetensors",
         weights=lambda s: s.update({"model.extra": torch.zeros(2)}))
    check_refused(path.parent / "raw-extra", r"1 unexpected \(model\.extra\)")


def test_raw_shape_mismatch(llama, raw):
    path, _ = raw(llama)
    copy(path, path.parent / "raw-wider", config=lambda c: c.update(intermediate_size=96))
    check_refused(path.parent / "raw-wider", r"raw state dict .*: 6 of another shape \(model\.layers\.0\.mlp\.down_proj")


def test_raw_truncated(llama, raw):
    path, _ = raw(llama)
    file = path / "raw_state_dict.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    check_refused(path, "unreadable safetensors file")


def test_raw_unreadable_meta(llama, raw):
    path, _ = raw(llama)
    (path / "checkpoint_meta.json").write_bytes(b"\xff{")
    check_refused(path, "cannot load model .*raw': unreadable checkpoint_meta.json")


# LoRA adapters


def adapter(base_path, out, edit=None):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model(str(base_path), "cpu", "float32")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # as stage 3 does
    if edit:
        file = out / "adapter_model.safetensors"
        state = load_file(file)
        edit(state)
        save_file(state, file)
    return out


LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_adapter_merges_as_peft_loads_it(llama, tmp_path):
    from peft import PeftModel

    path = adapter(llama, tmp_path / "lora")
    merged, _ = load_model(str(path), "cpu", "float32")
    assert type(merged).__name__ == "LlamaForCausalLM"
    base, _ = load_model(str(llama), "cpu", "float32")
    plain = logits(base)
    reference = PeftModel.from_pretrained(base, str(path)).eval()
    torch.testing.assert_close(logits(merged), logits(reference), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged), plain)


def test_adapter_key_missing(llama, tmp_path):
    path = adapter(llama, tmp_path / "lora", lambda s: s.pop(LORA_A))
    check_refused(path, r"LoRA adapter .* do not fit base model .*: 1 missing or of another shape \(.*q_proj\.lora_A")


def test_adapter_shape_mismatch(llama, tmp_path):
    path = adapter(llama, tmp_path / "lora", lambda s: s.update({LORA_A: torch.zeros(8, 32)}))
    check_refused(path, r"1 missing or of another shape \(base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A")


def test_adapter_unexpected_key(llama, tmp_path):
    untargeted = LORA_A.replace("q_proj", "k_proj")
    path = adapter(llama, tmp_path / "lora", lambda s: s.update({untargeted: torch.zeros(4, 32)}))
    check_refused(path, r"1 unexpected \(.*k_proj\.lora_A")


def test_adapter_base_gone(llama, tmp_path):
    path = adapter(llama, tmp_path / "lora")
    shutil.rmtree(llama)
    check_refused(path, r"LoRA adapter .*: its base model: model path .*llama' does not exist")


def test_adapter_truncated(llama, tmp_path):
    path = adapter(llama, tmp_path / "lora")
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    check_refused(path, "unreadable safetensors file")
