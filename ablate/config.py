"""Stage configs: one frozen dataclass per stage kind, defaults from ``stages/<stage>.yaml``.

    python -c "from ablate.config import load_eval_config; print(load_eval_config('stage1_baseline_eval', {}))"

Precedence: dataclass defaults < the stage YAML (saved field values) < flags.
The resolved config is written to each run directory as ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ablate.errors import BadInput

STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"
STAGE1, STAGE2 = "stage1_baseline_eval", "stage2_ablation_eval"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class EvalConfig:
    """An lm-evaluation-harness run of one model under one attention mask (stages 1 and 2)."""

    stage: str = field(metadata={"help": "stage name; also the folder under runs/"})
    model: str = field(default="", metadata={"help": "hub model id or local path"})
    tasks: tuple[str, ...] = field(default=(), metadata={"help": "lm-eval task names"})
    mask: str = field(default="causal", metadata={"help": "attention mask over the prompt (see `ablate masks`)"})
    include_path: str | None = field(default=None, metadata={"help": "extra folder of lm-eval task YAMLs"})
    task_data: tuple[str, ...] = field(default=(), metadata={"help": "TASK=FILE: read a task's rows from a local file"})
    limit: float | None = field(default=None, metadata={"help": "documents per task (int) or fraction (<1), as lm-eval"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (task default when unset)"})
    batch_size: str = field(default="8", metadata={"help": "batch size, or 'auto' as lm-eval"})
    max_length: int | None = field(default=None, metadata={"help": "context window (model's own when unset)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention"})
    seed: int = field(default=1234, metadata={"help": "seeds python, numpy, torch and few-shot sampling"})
    runs_dir: str = field(default="runs", metadata={"help": "where run directories are created"})
    baseline: str | None = field(default=None, metadata={"help": "stage 2: the stage 1 run to compare against"})

    def __post_init__(self):
        from ablate.masks import MASKS, check_attention_backend  # torch: imported only when a stage runs

        if not self.model:
            raise BadInput("no model given: pass --model (a hub id or a local path)")
        if not self.tasks:
            raise BadInput("no tasks given: pass --tasks a,b,c")
        if self.mask not in MASKS:
            raise BadInput(f"unknown mask '{self.mask}'; known masks: {', '.join(MASKS)}")
        if self.stage == STAGE1 and self.mask != "causal":
            raise BadInput("stage 1 is the causal baseline; use `ablate stage2 --mask ...` for other masks")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise BadInput(f"unknown attention implementation '{self.attn_implementation}'; "
                           f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        check_attention_backend(self.mask, self.attn_implementation)
        if self.limit is not None and self.limit <= 0:
            raise BadInput(f"--limit must be positive, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise BadInput(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size != "auto" and not (str(self.batch_size).isdigit() and int(self.batch_size) > 0):
            raise BadInput(f"--batch-size must be a positive integer or 'auto', got '{self.batch_size}'")

    @property
    def lm_eval_limit(self) -> int | float | None:
        if self.limit is None:
            return None
        return int(self.limit) if self.limit >= 1 else self.limit

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_defaults(stage: str) -> dict:
    path = STAGES_DIR / f"{stage}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = set(data) - known
    if unknown:
        raise BadInput(f"{path}: unknown fields {', '.join(sorted(unknown))}")
    return data


def load_eval_config(stage: str, flags: dict) -> EvalConfig:
    """Merge the stage YAML with the flags that were given (None = not given)."""
    values = {**stage_defaults(stage), **{k: v for k, v in flags.items() if v is not None}}
    if isinstance(values.get("tasks"), str):
        values["tasks"] = [t.strip() for t in values["tasks"].split(",") if t.strip()]
    if isinstance(values.get("task_data"), str):
        values["task_data"] = [values["task_data"]]
    for key in ("tasks", "task_data"):
        if key in values:
            values[key] = tuple(values[key])
    if "batch_size" in values:
        values["batch_size"] = str(values["batch_size"])
    return EvalConfig(stage=stage, **values)
