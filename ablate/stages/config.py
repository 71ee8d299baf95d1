"""Stage configs: one frozen dataclass per stage kind, defaults from ``stages/<stage>.yaml``.

    python -c "from ablate.stages.config import load_eval_config; print(load_eval_config('stage1_baseline_eval', {}))"

Precedence: dataclass defaults < the stage YAML (saved field values) < ``--config FILE``
(``ablate.stages.study_file``) < flags typed on the command line.
The resolved config is written to each run directory as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ablate.errors import BadInput
from ablate.results.rundir import STAGE1, STAGE3_PREFIX, STAGE4
from ablate.stages.checks import (ATTN_IMPLEMENTATIONS, _check_gate, check_batch_size, check_leakage,  # noqa: F401
                                  check_mask_layers, check_report_to, check_runs_dir, check_runtime, check_seed,
                                  check_segments, check_types, resolve_mask)

STAGES_DIR = Path(__file__).resolve().parent  # each stage's YAML sits beside its module and ships in the wheel


MASK_LAYERS_HELP = ("apply --mask in these decoder layers only, the causal mask in the others (0-based: 0-7, "
                    "0,2,4, first:4, last:4, all; default: every layer)")


@dataclass(frozen=True)
class EvalConfig:
    """An lm-evaluation-harness run of one model under one attention mask (stages 1 and 2)."""

    stage: str = field(metadata={"help": "stage name; also the folder under runs/", "cli": False})
    model: str = field(default="", metadata={"help": "hub model id or local path"})
    tasks: tuple[str, ...] = field(default=(), metadata={"help": "lm-eval task names, comma-separated"})
    mask: str = field(default="causal", metadata={"help": "attention mask over the prompt (see `ablate masks`), or FILE.py:NAME, a mask function "
                                         "from a file (docs/masks.md)"})
    mask_layers: str | None = field(default=None, metadata={"help": MASK_LAYERS_HELP})
    mask_file: dict | None = field(default=None, metadata={
        "help": "a --mask path.py:name mask's file as resolved: its path, name and sha256", "cli": False})
    include_path: str | None = field(default=None, metadata={"help": "extra folder of lm-eval task YAMLs"})
    task_data: tuple[str, ...] = field(default=(), metadata={
        "help": "TASK=FILE: read a task's rows from a local file (repeatable)", "repeat": True})
    limit: float | None = field(default=None, metadata={"help": "documents per task (int) or fraction (<1), as lm-eval"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (task default when unset)"})
    batch_size: str = field(default="8", metadata={"help": "rows per forward (a row holds a context and all its choices), or 'auto'"})
    max_length: int | None = field(default=None, metadata={"help": "context window (model's own when unset)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention"})
    seed: int = field(default=1234, metadata={"help": "seeds python, numpy, torch and few-shot sampling"})
    runs_dir: str = field(default="runs", metadata={"help": "where run directories are created"})
    baseline: str | None = field(default=None, metadata={"help": "stage 2: the stage 1 run to compare against"})
    gate: dict | None = field(default=None, metadata={
        "help": "probe gate, e.g. {metric: macro.acc, min: 0.40}: a result past it marks the run gated", "cli": False})
    ignore_gate: bool = field(default=False, metadata={"help": "stage 2: compare with a gated stage 1 run anyway"})
    allow_label_leakage: bool = field(default=False, metadata={
        "help": "evaluate under a mask that lets scored tokens see their own future (diagnosis only: the run is "
                "marked leaky)"})
    config_file: dict | None = field(default=None, metadata={
        "help": "the --config file these values were read from: its path and sha256", "cli": False})

    def __post_init__(self):
        if not self.model:
            raise BadInput("no model given: pass --model (a hub id or a local path)")
        if not self.tasks:
            raise BadInput("no tasks given: pass --tasks a,b,c")
        resolve_mask(self)
        check_runtime(self.mask, self.device, self.dtype, self.attn_implementation)
        check_mask_layers(self.mask, self.mask_layers)
        check_leakage(self.mask, self.allow_label_leakage)
        if self.stage == STAGE1 and self.mask != "causal":
            raise BadInput("stage 1 is the causal baseline; use `ablate stage2 --mask ...` for other masks")
        check_types(self)
        if self.limit is not None and not (math.isfinite(self.limit) and self.limit > 0
                                           and (self.limit < 1 or self.limit == int(self.limit))):
            raise BadInput(f"--limit must be a whole number of documents or a fraction in (0, 1), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise BadInput(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.max_length is not None and self.max_length < 2:
            raise BadInput(f"--max-length must be at least 2 tokens, got {self.max_length}")
        check_seed(self.seed)
        check_runs_dir(self.runs_dir)
        _check_gate(self.gate)
        check_batch_size(self.batch_size)

    @property
    def lm_eval_limit(self) -> int | float | None:
        if self.limit is None:
            return None
        return int(self.limit) if self.limit >= 1 else self.limit

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_defaults(stage: str, cls=None) -> dict:
    path = STAGES_DIR / f"{stage}.yaml"
    if not path.is_file():  # every stage has one: its absence is a broken install, not "no defaults"
        raise BadInput(f"stage defaults {path} are missing; reinstall ablate")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInput(f"{path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected field: value pairs, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls or EvalConfig)}
    unknown = set(data) - known
    if unknown:
        raise BadInput(f"{path}: unknown fields {', '.join(sorted(unknown))}")
    return data


def layered(stage: str, cls, flags: dict) -> dict:
    """The package's stage YAML < the ``--config`` file's values for this stage < the flags given (None = not).

    ``flags["config_file"]`` is the file's path; the result holds ``{path, sha256}`` in its place.
    """
    from ablate.stages import study_file

    flags = dict(flags)
    file, record, from_file = flags.pop("config_file", None), None, {}
    if file is not None:
        values, record = study_file.read(file, SECTIONS)
        from_file = study_file.stage_values(values, study_file.section_of(stage), SECTIONS)
    given = {k: v for k, v in flags.items() if v is not None}
    return {**stage_defaults(stage, cls), **from_file, **given, "config_file": record}


def load_eval_config(stage: str, flags: dict) -> EvalConfig:
    """Merge the stage YAML, the --config file and the flags that were given (None = not given)."""
    values = layered(stage, EvalConfig, flags)
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




@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3: finetune under a mask, loss on response tokens only."""

    model: str = field(default="", metadata={"help": "hub model id or local path"})
    data: str = field(default="", metadata={"help": "JSONL/JSON/Parquet/CSV file or Hugging Face dataset id"})
    mask: str = field(default="prefill_bidir", metadata={"help": "training mask: prefill_bidir, causal, segment_bidir, or FILE.py:NAME (docs/masks.md)"})
    mask_layers: str | None = field(default=None, metadata={"help": MASK_LAYERS_HELP})
    mask_file: dict | None = field(default=None, metadata={
        "help": "a --mask path.py:name mask's file as resolved: its path, name and sha256", "cli": False})
    prompt_field: str = field(default="prompt", metadata={"help": "field holding the prompt"})
    response_field: str = field(default="response", metadata={"help": "field holding the response"})
    text_field: str | None = field(default=None, metadata={
        "help": "plain-text field, split at a random point into prompt and response (prefix-LM objective)"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "str.format template over a row's fields, e.g. 'Question: {question}\\nAnswer:' (lm-eval's gsm8k); "
                "replaces --prompt-field; the flag reads \\n and \\t as newline and tab"})
    response_template: str | None = field(default=None, metadata={
        "help": "the same for the response, e.g. ' {answer}'; replaces --response-field"})
    segment_separator: str | None = field(default=None, metadata={
        "help": "mask segment_bidir: the prompt's segments end after each occurrence of this text (e.g. '\\n\\n'; "
                "the flag reads \\n and \\t as newline and tab)"})
    segment_field: str | None = field(default=None, metadata={
        "help": "mask segment_bidir: a field holding each row's prompt as a list of its segments (joined, it is the "
                "prompt; replaces --prompt-field)"})
    split_range: tuple[float, float] = field(default=(0.25, 0.75), metadata={
        "help": "where plain text is split, as fractions of its tokens: LO,HI"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out file (default: a slice of --data)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --eval-data"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example, prompt and response"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "drop the first tokens of prompts that do not fit (default: refuse)"})
    packing: bool = field(default=True, metadata={
        "help": "pack each micro-batch's rows into one sequence (sdpa, which then attends once per row) or "
                "sequences of --pack-length tokens, each row attending to itself only (the same rows, mask and "
                "loss as padded batches, no padding); --no-packing pads each row to the batch's longest. Off by "
                "itself, with one log line, where it cannot be exact (FlashAttention)"})
    pack_length: int | None = field(default=None, metadata={
        "help": "tokens per packed sequence (default: the whole micro-batch under sdpa, --max-length under eager "
                "and flex_attention); at least --max-length, as a row is never split"})
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, constant)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    logging_steps: int = field(default=10, metadata={"help": "log loss and grad norm every N steps"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    eval_steps: int | None = field(default=None, metadata={"help": "eval_loss every N steps (default: at the end)"})
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints kept"})
    spike_factor: float = field(default=10.0, metadata={
        "help": "stop as diverged when grad norm exceeds this times its recent median"})
    spike_window: int = field(default=20, metadata={"help": "logged steps in the grad-norm median"})
    probe_samples: int = field(default=8, metadata={"help": "held-out samples in the leakage probe"})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (peft); unset = full finetune"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules"})
    allow_label_leakage: bool = field(default=False, metadata={
        "help": "diagnosis only: train even when the mask leaks labels (marked leaky)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on with CUDA"})
    seed: int = field(default=1234, metadata={"help": "seeds data order, split and initialisation"})
    runs_dir: str = field(default="runs", metadata={"help": "where run directories are created"})
    report_to: tuple[str, ...] = field(default=(), metadata={
        "help": "the Trainer's own logging integrations, comma-separated: tensorboard (into the run's "
                "tensorboard/), wandb (offline into the run folder unless WANDB_MODE says otherwise), ...; "
                "train_log.jsonl and the report's curves are written either way"})
    gate: dict | None = field(default=None, metadata={
        "help": "probe gate on summary.json, e.g. {metric: eval_loss, max: 3.0}: a result past it marks the run gated",
        "cli": False})
    config_file: dict | None = field(default=None, metadata={
        "help": "the --config file these values were read from: its path and sha256", "cli": False})

    def __post_init__(self):
        from transformers import SchedulerType

        check_types(self)
        check_seed(self.seed)
        check_runs_dir(self.runs_dir)
        _check_gate(self.gate)
        if not self.model:
            raise BadInput("no model given: pass --model (a hub id or a local path)")
        if not self.data:
            raise BadInput("no training data given: pass --data FILE or a dataset id")
        resolve_mask(self)
        check_runtime(self.mask, self.device, self.dtype, self.attn_implementation)
        check_mask_layers(self.mask, self.mask_layers)
        check_segments(self.mask, self.segment_separator, self.segment_field)
        self.row_format()  # refuses a malformed template before any data is read
        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise BadInput(f"unknown --lr-scheduler '{self.lr_scheduler}'; use one of {', '.join(schedulers)}")
        lo, hi = self.split_range
        if not 0 < lo <= hi < 1:
            raise BadInput(f"--split-range must satisfy 0 < LO <= HI < 1, got {lo},{hi}")
        if not 0 < self.eval_fraction < 1:
            raise BadInput(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("max_length", "max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps",
                     "save_steps", "save_total_limit", "spike_window", "probe_samples"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise BadInput(f"--pack-length {self.pack_length} is shorter than --max-length {self.max_length}; "
                           "a row is never split, so a sequence must hold the longest row")
        if self.lora_r is not None and self.lora_r < 1:
            raise BadInput(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.lora_alpha < 1:
            raise BadInput(f"--lora-alpha must be >= 1, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise BadInput(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0 or self.spike_factor <= 1:
            raise BadInput("--learning-rate and --max-grad-norm must be > 0 and --spike-factor > 1")
        if self.warmup_steps < 0:
            raise BadInput(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise BadInput(f"--eval-steps must be >= 1, got {self.eval_steps}")
        check_report_to(self.report_to)

    @property
    def stage(self) -> str:
        return STAGE3_PREFIX + self.mask

    def row_format(self):
        from ablate.core.sft_data import RowFormat

        return RowFormat(self.prompt_field, self.response_field, self.text_field,
                         self.prompt_template, self.response_template, self.segment_separator,
                         self.segment_field)

    def training_arguments(self, output_dir: Path, on_gpu: bool, is_main: bool = True):
        """The HF Trainer's arguments: the one place a stage 3 field becomes a Trainer setting."""
        import torch  # torch and transformers load only when a stage runs: `ablate --help` stays fast
        from transformers import TrainingArguments

        checkpointing = on_gpu if self.gradient_checkpointing is None else self.gradient_checkpointing
        # The integrations take their folders from the environment; each run's own go into its run folder.
        if "tensorboard" in self.report_to:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(output_dir).parent / "tensorboard")
        if "wandb" in self.report_to:
            os.environ["WANDB_DIR"] = str(Path(output_dir).parent)
            os.environ.setdefault("WANDB_MODE", "offline")  # a box may have no network; `wandb sync` later
        return TrainingArguments(
            output_dir=str(output_dir),
            max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler,
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            eval_strategy="steps" if self.eval_steps else "no",
            eval_steps=self.eval_steps,
            # bf16 autocast on GPU: over bf16 weights by default, over fp32 master weights with --dtype float32.
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            activation_checkpointing=checkpointing,
            remove_unused_columns=False,
            seed=self.seed,
            data_seed=self.seed,
            report_to=list(self.report_to) or "none",
            use_cpu=not on_gpu,
            disable_tqdm=not is_main,
            dataloader_num_workers=0,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_finetune_config(flags: dict) -> FinetuneConfig:
    values = layered("stage3_finetune", FinetuneConfig, flags)
    if isinstance(values.get("split_range"), str):
        try:
            values["split_range"] = tuple(float(x) for x in values["split_range"].split(","))
        except ValueError:
            raise BadInput(f"--split-range expects LO,HI, got '{values['split_range']}'") from None
    if isinstance(values.get("report_to"), str):
        values["report_to"] = [t.strip() for t in values["report_to"].split(",") if t.strip()]
    if "report_to" in values:
        values["report_to"] = tuple(values["report_to"])
    if "split_range" in values:
        values["split_range"] = tuple(values["split_range"])
        if len(values["split_range"]) != 2:
            raise BadInput("--split-range expects two numbers LO,HI")
    return FinetuneConfig(**values)


@dataclass(frozen=True)
class Stage4Config:
    """Stage 4: the finetuned models under the ablated mask, compared with stages 1 and 2."""

    checkpoints: tuple[str, ...] = field(default=(), metadata={
        "help": "stage 3 run directory (repeatable; default: the latest completed run of each mask)",
        "flag": "--checkpoint", "repeat": True})
    mask: str = field(default="prefill_bidir", metadata={"help": "mask to evaluate with (a name, or FILE.py:NAME)"})
    mask_layers: str | None = field(default=None, metadata={"help": MASK_LAYERS_HELP})
    mask_file: dict | None = field(default=None, metadata={
        "help": "a --mask path.py:name mask's file as resolved: its path, name and sha256", "cli": False})
    also_causal: bool = field(default=False, metadata={"help": "also evaluate each model with the causal mask"})
    stage1_run: str | None = field(default=None, metadata={"help": "the stage 1 run to compare with"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention"})
    batch_size: str | None = field(default=None, metadata={"help": "batch size (default: stage 1's)"})
    runs_dir: str = field(default="runs", metadata={"help": "where runs are read and written"})
    ignore_gate: bool = field(default=False, metadata={"help": "start from gated stage 1 or stage 3 runs anyway"})
    config_file: dict | None = field(default=None, metadata={
        "help": "the --config file these values were read from: its path and sha256", "cli": False})

    def __post_init__(self):
        check_types(self)
        check_runs_dir(self.runs_dir)
        resolve_mask(self)
        check_runtime(self.mask, self.device, self.dtype, self.attn_implementation)
        check_mask_layers(self.mask, self.mask_layers)
        if self.batch_size is not None:
            check_batch_size(self.batch_size)


def load_stage4_config(flags: dict) -> Stage4Config:
    values = layered(STAGE4, Stage4Config, flags)
    if "checkpoints" in values:
        values["checkpoints"] = tuple(values["checkpoints"])
    if values.get("batch_size") is not None:
        values["batch_size"] = str(values["batch_size"])
    return Stage4Config(**values)


# A study file's sections and the config each configures (ablate.stages.study_file reads them).
SECTIONS = {"stage1": EvalConfig, "stage2": EvalConfig, "stage3": FinetuneConfig, "stage4": Stage4Config}
