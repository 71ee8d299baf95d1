"""The offline demo: synthetic world -> tiny LM trained from scratch -> the four stages -> report.

    ablate demo --preset synthetic   # the synthetic world's full size
    ablate demo --preset smoke       # the test suite's small preset, same path

(``ablate demo`` with no preset runs the study on a real pretrained model: ablate/demo/real.py.)

Everything runs on CPU with no network. The tiny model (a Llama config from
transformers, word-level tokenizer trained with ``tokenizers``) is pretrained on
the world's corpus with the HF Trainer and cached under the demo folder, so a
second run skips it. Then the stages are a study file,
``<workdir>/world-<preset>-seed<N>/study.yaml``, run by ``ablate study``'s own
function (``ablate.demo.study``): stage 1, stage 2 (``prefill_bidir``), stage 3
with both masks, stage 4, the report and STATUS.md. A second run reuses every
completed stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ablate.results import rundir
from ablate.demo.world import FAMILIES, write_world


@dataclass(frozen=True)
class Preset:
    n_eval: int
    n_corpus: int
    n_finetune: int
    hidden: int
    layers: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float


PRESETS = {
    # Chosen by measuring on a 2-core CPU: 2 layers x 128 at lr 1e-3 learned more recall (0.50) than
    # 3 x 96 at 3e-3 (0.22) or 3 x 128 at 1e-3 (0.40) in the same 800 steps (docs/demo.md).
    "synthetic": Preset(n_eval=60, n_corpus=30000, n_finetune=600, hidden=128, layers=2, pretrain_steps=800,
                   finetune_steps=100, pretrain_lr=1e-3),
    "smoke": Preset(n_eval=12, n_corpus=3000, n_finetune=80, hidden=32, layers=2, pretrain_steps=60,
                    finetune_steps=6, pretrain_lr=3e-3),
}


def build_tokenizer(corpus: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"])
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def pretrain(world: dict, out: Path, preset: Preset, seed: int, echo=print) -> Path:
    """Train the tiny LM from scratch on the world's corpus; cached in ``out`` (``pretrain.json`` marks it done)."""
    marker = out / "pretrain.json"
    if marker.is_file():
        echo(f"pretrained model found at {out}: skipping pretraining "
             f"({json.loads(marker.read_text())['train_runtime']:.0f} s when it was trained)")
        return out
    import torch
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    tokenizer = build_tokenizer(world["corpus"])
    lines = world["corpus"].read_text().splitlines()
    examples = [{"input_ids": tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]} for line in lines]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=preset.hidden, intermediate_size=4 * preset.hidden,
                         num_hidden_layers=preset.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=preset.pretrain_steps, per_device_train_batch_size=128,
        learning_rate=preset.pretrain_lr, lr_scheduler_type="cosine", warmup_steps=preset.pretrain_steps // 20,
        weight_decay=0.01, logging_steps=max(1, preset.pretrain_steps // 10), save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=False, logging_strategy="steps",
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rundir.write_json(marker, {"train_loss": result.training_loss, "train_runtime": result.metrics["train_runtime"],
                               "steps": preset.pretrain_steps, "preset": asdict(preset), "seed": seed,
                               "parameters": sum(p.numel() for p in model.parameters())})
    return out


def study_values(model: Path, world: dict, preset: Preset, seed: int, workdir: Path) -> dict:
    """Every stage's settings, as the study file holds them (the rest are the package's stage YAMLs)."""
    return {
        "model": str(model), "tasks": list(FAMILIES), "include_path": str(world["tasks_dir"]),
        "task_data": [f"{name}={path}" for name, path in world["task_data"].items()],
        "device": "cpu", "dtype": "float32", "seed": seed,
        "batch_size": 32,  # evaluation rows per batch; stage 3 has its own below
        "runs_dir": str(workdir / "runs"),
        "stage2": {"mask": "prefill_bidir"},
        "stage3": {"data": str(world["finetune"]), "eval_fraction": 0.1, "max_steps": preset.finetune_steps,
                   "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0, "batch_size": 16,
                   "gradient_accumulation_steps": 1, "logging_steps": max(1, preset.finetune_steps // 10),
                   "save_steps": preset.finetune_steps, "max_length": 64},
        "stage4": {"mask": "prefill_bidir", "also_causal": True},
        "study": {"masks": ["causal", "prefill_bidir"], "report": str(workdir / "docs" / "RESULTS.md")},
    }


def run_demo(workdir: Path, preset_name: str = "synthetic", seed: int = 0, echo=print) -> dict:
    from ablate.demo.study import run_demo_study
    from ablate.errors import BadInput

    preset = PRESETS[preset_name]
    started = time.time()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir {workdir} exists and is not a folder")
    workdir = workdir.resolve()
    # One world per preset and seed: another seed's runs keep the task data they were scored on.
    world_dir = workdir / f"world-{preset_name}-seed{seed}"
    world = write_world(world_dir, seed=seed, n_eval=preset.n_eval, n_corpus=preset.n_corpus,
                        n_finetune=preset.n_finetune)
    echo(f"world written to {world_dir} (tasks, corpus, finetuning set)")
    model = pretrain(world, workdir / f"model-{preset_name}-seed{seed}", preset, seed, echo)
    about = [f"The synthetic demo's study (ablate demo --preset {preset_name} --seed {seed}), written by "
             "ablate/demo/run.py:", "a tiny Llama pretrained on the synthetic world (ablate/demo/world.py), its four "
             "task families."]
    out = run_demo_study(world_dir / "study.yaml", study_values(model, world, preset, seed, workdir), about, echo)
    macro = json.loads((out["stage1"] / "metrics.json").read_text())["macro"]
    margin = macro["acc"] - macro["chance"]
    echo(f"stage 1 macro accuracy {macro['acc']:.4f} vs chance {macro['chance']:.4f} (+{margin:.4f}): "
         + ("the floor of +0.3 holds" if margin >= 0.3 else
            "UNDER the +0.3 floor: too little for an ablation to remove"))
    out["seconds"] = round(time.time() - started, 1)
    return out
