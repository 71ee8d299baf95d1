"""Bad input and faults through the CLI: python -m pytest tests/test_bad_input.py -q

Every case goes through ``ablate.cli.main`` (the console entry point) against a
study folder holding real runs and models, and asserts: the exit code, stderr
is one line starting ``ablate: error:``, no traceback, and every file that
existed before is byte for byte unchanged (no run directory appears either).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ablate.cli import main
from ablate.core.tasks import FIXTURE_DATA
from ablate.core.tiny import build_tiny_model

PIQA_ROW = {"goal": "Keep a door open.", "sol1": "Use a wedge.", "sol2": "Use a cloud.", "label": 0}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _only_run(runs: Path, stage: str) -> Path:
    (path,) = [p for p in (runs / stage).iterdir() if p.is_dir()]
    return path


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    """A folder with a model, another model, broken models, bad data and completed stage 1/2/3 runs."""
    root = tmp_path_factory.mktemp("study")
    model = Path(tiny_models("llama"))
    other = build_tiny_model(root / "other-model", seed=1)
    runs, other_runs = root / "runs", root / "other-runs"
    common = ["--tasks", "ablate_tiny", "--device", "cpu", "--limit", "4"]
    assert main(["stage1", "--model", str(model), *common, "--runs-dir", str(runs)]) == 0
    assert main(["stage2", "--model", str(model), *common, "--runs-dir", str(runs)]) == 0
    assert main(["stage1", "--model", str(other), *common, "--runs-dir", str(other_runs)]) == 0
    assert main(["stage1", "--model", str(model), "--tasks", "ablate_tiny", "--device", "cpu", "--limit", "3",
                 "--runs-dir", str(other_runs)]) == 0
    assert main(["stage3", "--mask", "prefill_bidir", "--model", str(model), "--data", "tests/data/sft.jsonl",
                 "--max-steps", "2", "--save-steps", "2", "--device", "cpu", "--max-length", "64",
                 "--runs-dir", str(runs)]) == 0
    p = {
        "model": str(model), "other": str(other), "runs": str(runs),
        "s1": str(_only_run(runs, "stage1_baseline_eval")), "s2": str(_only_run(runs, "stage2_ablation_eval")),
        "s3": str(_only_run(runs, "stage3_finetune_prefill_bidir")),
    }
    limits = {json.loads((d / "config.json").read_text())["limit"]: d
              for d in (other_runs / "stage1_baseline_eval").iterdir()}
    p["s1_other"], p["s1_limit3"] = str(limits[4]), str(limits[3])
    # Models whose weights do not cover their config.
    more_layers = root / "more-layers"
    shutil.copytree(model, more_layers)
    cfg = json.loads((more_layers / "config.json").read_text())
    (more_layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    other_arch = root / "other-arch"
    shutil.copytree(model, other_arch)
    (other_arch / "config.json").write_text(json.dumps(
        {**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 32, "n_head": 4}))
    dropped = root / "dropped-tensor"
    shutil.copytree(model, dropped)
    tensors = load_file(str(dropped / "model.safetensors"))
    tensors.pop(sorted(k for k in tensors if "layers.0" in k)[0])
    save_file(tensors, str(dropped / "model.safetensors"), metadata={"format": "pt"})
    p.update(more_layers=str(more_layers), truncated=str(truncated), other_arch=str(other_arch), dropped=str(dropped))
    # Task data and task folders.
    data = root / "data"
    data.mkdir()
    p["bad_json"] = _jsonl(data / "bad_json.jsonl", [PIQA_ROW])
    with open(p["bad_json"], "a") as fh:
        fh.write("{not json\n")
    p["out_of_range"] = _jsonl(data / "range.jsonl", [PIQA_ROW, {**PIQA_ROW, "label": 7}])
    p["null_label"] = _jsonl(data / "null.jsonl", [PIQA_ROW, {**PIQA_ROW, "label": None}])
    p["word_label"] = _jsonl(data / "word.jsonl", [PIQA_ROW, {**PIQA_ROW, "label": "second"}])
    p["no_field"] = _jsonl(data / "nofield.jsonl", [{k: v for k, v in PIQA_ROW.items() if k != "sol2"}])
    (data / "latin1.jsonl").write_bytes(json.dumps({**PIQA_ROW, "goal": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    p["latin1"] = str(data / "latin1.jsonl")
    (data / "rows.txt").write_text("x\n")
    p["txt"] = str(data / "rows.txt")
    (data / "empty.jsonl").write_text("\n")
    p["empty"] = str(data / "empty.jsonl")
    p["sft_missing_field"] = _jsonl(data / "sft_bad.jsonl", [{"prompt": "a", "answer": "b"}] * 4)
    broken_yaml = root / "broken_tasks"
    broken_yaml.mkdir()
    (broken_yaml / "mine.yaml").write_text("task: mine\ndataset_path: json\n  output_type: [unclosed\n")
    p["broken_yaml"] = str(broken_yaml)
    gen = root / "gen_tasks"
    gen.mkdir()
    (gen / "gen.yaml").write_text("task: my_gen\ndataset_path: json\noutput_type: loglikelihood_rolling\n"
                                  "test_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{q}}\"\n"
                                  "metric_list:\n  - metric: word_perplexity\n")
    p["gen_tasks"] = str(gen)
    unscored = root / "unscored_tasks"  # tasks that compute no right or wrong per document
    unscored.mkdir()
    metric = "    aggregation: mean\n    higher_is_better: true\n"
    (unscored / "norm.yaml").write_text("task: my_norm\ndataset_path: json\noutput_type: multiple_choice\n"
                                        "test_split: test\ndoc_to_text: \"{{goal}}\"\ndoc_to_target: label\n"
                                        "doc_to_choice: \"{{[sol1, sol2]}}\"\nmetric_list:\n  - metric: acc_norm\n" + metric)
    (unscored / "bleu.yaml").write_text("task: my_bleu\ndataset_path: json\noutput_type: generate_until\n"
                                        "test_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
                                        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
                                        "metric_list:\n  - metric: bleu\n" + metric)
    p["unscored_tasks"] = str(unscored)
    p["gen_data"] = _jsonl(data / "gen.jsonl", [{"q": "1+1=", "a": "2"}])
    p["a_file"] = _jsonl(data / "a_file.jsonl", [PIQA_ROW])
    p["piqa"] = str(FIXTURE_DATA["piqa"])
    p["gsm8k"] = _jsonl(data / "gsm8k.jsonl", [{"question": f"{n} + 1?", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"}
                                                 for n in range(4)])
    # A LoRA adapter folder (adapter_config.json, no config.json), as peft saves one.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(root / "adapter")
    p["adapter"] = str(root / "adapter")
    p["root"] = str(root)
    return p


def snapshot(root: str) -> dict:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(root).rglob("*")) if f.is_file()}


EVAL = "--model {model} --tasks ablate_tiny --device cpu --limit 4 --runs-dir {runs}"
S4 = "--device cpu --runs-dir {runs}"
S3 = "--model {model} --data tests/data/sft.jsonl --device cpu --max-steps 2 --max-length 64 --runs-dir {runs}"
REMOTE = "--host 127.0.0.1 --session s1"

CASES = {
    # stage 1 / stage 2 options
    "unknown task": ("stage1 " + EVAL.replace("ablate_tiny", "piqqa"), "unknown task 'piqqa'"),
    "unknown mask": ("stage2 --mask bidir " + EVAL, "unknown mask 'bidir'"),
    "stage 1 with a non-causal mask": ("stage1 --mask prefill_bidir " + EVAL, "No such option"),
    "missing model path": ("stage1 " + EVAL.replace("{model}", "./no/such/model"), "does not exist"),
    "flash attention with prefix mask": ("stage2 --attn-implementation flash_attention_2 " + EVAL,
                                         "FlashAttention only supports causal"),
    "unknown attention": ("stage1 --attn-implementation fast " + EVAL, "unknown attention implementation"),
    "batch size 0": ("stage1 --batch-size 0 " + EVAL, "--batch-size must be"),
    "batch size words": ("stage1 --batch-size many " + EVAL, "--batch-size must be"),
    "unknown device": ("stage1 --device gpu " + EVAL.replace("--device cpu ", ""), "unknown device 'gpu'"),
    "cuda without cuda": ("stage1 --device cuda " + EVAL.replace("--device cpu ", ""), "CUDA is not available"),
    "unknown dtype": ("stage1 --dtype fp8 " + EVAL, "unknown dtype 'fp8'"),
    "limit nan": ("stage1 " + EVAL.replace("--limit 4", "--limit nan"), "--limit must be a finite number"),
    "limit negative": ("stage1 " + EVAL.replace("--limit 4", "--limit -5"), "--limit must be"),
    "limit fractional count": ("stage1 " + EVAL.replace("--limit 4", "--limit 2.5"), "--limit must be a whole"),
    "limit words": ("stage1 " + EVAL.replace("--limit 4", "--limit abc"), "Invalid value for '--limit'"),
    "max length negative": ("stage1 --max-length -5 " + EVAL, "--max-length must be at least 2"),
    "max length zero": ("stage2 --max-length 0 " + EVAL, "--max-length must be at least 2"),
    "few-shot negative": ("stage1 --num-fewshot -1 " + EVAL, "--num-fewshot must be >= 0"),
    "seed negative": ("stage1 --seed -1 " + EVAL, "--seed must be in"),
    "seed too large": ("stage1 --seed 99999999999 " + EVAL, "--seed must be in"),
    "unknown flag": ("stage1 --bogus 1 " + EVAL, "No such option: --bogus"),
    "unknown command": ("stage5", "No such command 'stage5'"),
    "task data not TASK=FILE": ("stage1 --task-data piqa " + EVAL, "--task-data expects TASK=FILE"),
    "task data missing file": ("stage1 --task-data ablate_tiny=/no/file.jsonl " + EVAL, "not found"),
    "task data unsupported format": ("stage1 --task-data ablate_tiny={txt} " + EVAL, "unsupported format"),
    "task data for another task": ("stage1 --task-data piqa={piqa} " + EVAL, "names tasks not in --tasks"),
    "task data invalid JSON": ("stage1 --task-data piqa={bad_json} " + EVAL.replace("ablate_tiny", "piqa"),
                               "is not valid JSON"),
    "task data label out of range": ("stage1 --task-data piqa={out_of_range} " + EVAL.replace("ablate_tiny", "piqa"),
                                     "piqa"),
    "task data null label": ("stage1 --task-data piqa={null_label} " + EVAL.replace("ablate_tiny", "piqa"), "piqa"),
    "task data word label": ("stage1 --task-data piqa={word_label} " + EVAL.replace("ablate_tiny", "piqa"), "piqa"),
    "task data missing field": ("stage1 --task-data piqa={no_field} " + EVAL.replace("ablate_tiny", "piqa"),
                                "lacks field(s) sol2"),
    "task data not UTF-8": ("stage1 --task-data piqa={latin1} " + EVAL.replace("ablate_tiny", "piqa"), "UTF-8"),
    "task data empty": ("stage1 --task-data piqa={empty} " + EVAL.replace("ablate_tiny", "piqa"), "has no rows"),
    "include path not a folder": ("stage1 --include-path {a_file} " + EVAL, "is not a directory"),
    "include path broken YAML": ("stage1 --include-path {broken_yaml} " + EVAL, "mine.yaml"),
    "rolling loglikelihood task": ("stage1 --include-path {gen_tasks} --task-data my_gen={gen_data} "
                                   + EVAL.replace("ablate_tiny", "my_gen"), "is loglikelihood_rolling"),
    "baseline is a stage 2 run": ("stage2 --baseline {s2} " + EVAL, "is a stage2_ablation_eval run, not"),
    "baseline is not a run": ("stage2 --baseline {root} " + EVAL, "is not a run directory"),
    "baseline of another model": ("stage2 --baseline {s1_other} " + EVAL, "differs from this run in model"),
    "baseline with other settings": ("stage2 --baseline {s1_limit3} " + EVAL, "differs from this run in limit"),
    "model with more layers than weights": ("stage1 " + EVAL.replace("{model}", "{more_layers}"), "more-layers"),
    "model with a truncated safetensors": ("stage1 " + EVAL.replace("{model}", "{truncated}"), "truncated"),
    "model config of another architecture": ("stage1 " + EVAL.replace("{model}", "{other_arch}"), "other-arch"),
    "model missing a tensor": ("stage1 " + EVAL.replace("{model}", "{dropped}"), "dropped-tensor"),
    "runs dir is a file": ("stage1 " + EVAL.replace("{runs}", "{a_file}"), "cannot write runs under"),
    # checked before the run folder: what lm-eval or the request loop would refuse only once the run has begun
    "few-shot larger than the pool": ("stage1 --num-fewshot 50 " + EVAL, "has 24 few-shot example(s) to draw from"),
    "few-shot default larger than the pool": ("stage1 --task-data gsm8k={gsm8k} "
                                              + EVAL.replace("ablate_tiny", "gsm8k"), "fewer than its num_fewshot 5"),
    "few-shot pool is the evaluated rows": ("stage1 --task-data piqa={piqa} --num-fewshot 1 "
                                            + EVAL.replace("ablate_tiny", "piqa"), "shown its own answer"),
    "few-shot pool is the evaluated rows, stage 2": ("stage2 --task-data piqa={piqa} --num-fewshot 2 "
                                                     + EVAL.replace("ablate_tiny", "piqa"), "shown its own answer"),
    "answers longer than max length": ("stage2 --task-data piqa={piqa} --max-length 4 "
                                       + EVAL.replace("ablate_tiny", "piqa"), "more than --max-length 4 holds"),
    "multiple choice without acc": ("stage1 --include-path {unscored_tasks} --task-data my_norm={a_file} "
                                    + EVAL.replace("ablate_tiny", "my_norm"), "computes acc_norm; ablate scores"),
    "generation without exact match": ("stage1 --include-path {unscored_tasks} --task-data my_bleu={gsm8k} "
                                       + EVAL.replace("ablate_tiny", "my_bleu"), "computes bleu; ablate scores"),
    "generation longer than max length": ("stage1 --task-data gsm8k={gsm8k} --num-fewshot 0 --max-length 8 "
                                          + EVAL.replace("ablate_tiny", "gsm8k"), "generates up to 256 tokens"),
    # stage 3
    "resume a completed run": ("stage3 --mask prefill_bidir --resume --run-dir {s3} --runs-dir {runs}", "completed"),
    "resume a stage 1 run": ("stage3 --mask prefill_bidir --resume --run-dir {s1} --runs-dir {runs}", "stage1"),
    "resume with new settings": ("stage3 --resume --max-steps 9 --runs-dir {runs}", "drop --max-steps"),
    "run dir without resume": ("stage3 --run-dir {s3} " + S3, "--run-dir only goes with --resume"),
    "lora dropout 1": ("stage3 --lora-r 4 --lora-dropout 1.0 " + S3, "--lora-dropout must be in [0, 1)"),
    "learning rate nan": ("stage3 --learning-rate nan " + S3, "--learning-rate must be a finite number"),
    "learning rate 0": ("stage3 --learning-rate 0 " + S3, "--learning-rate and --max-grad-norm must be > 0"),
    "warm-up negative": ("stage3 --warmup-steps -1 " + S3, "--warmup-steps must be >= 0"),
    "max steps 0": ("stage3 " + S3.replace("--max-steps 2", "--max-steps 0"), "--max-steps must be >= 1"),
    "eval steps 0": ("stage3 --eval-steps 0 " + S3, "--eval-steps must be >= 1"),
    "split range malformed": ("stage3 --split-range 0.5 " + S3, "--split-range expects"),
    "training data missing": ("stage3 " + S3.replace("tests/data/sft.jsonl", "/no/data.jsonl"), "not found"),
    "training data missing fields": ("stage3 " + S3.replace("tests/data/sft.jsonl", "{sft_missing_field}"),
                                     "lacks field(s) response"),
    "template names a missing field": ("stage3 --prompt-template Q:{{question}} " + S3,
                                       "lacks field(s) question named by --prompt-template 'Q:{question}'"),
    "template with an unbalanced brace": ("stage3 --prompt-template Q:{{question " + S3,
                                          "--prompt-template 'Q:{question': expected '}'"),
    "template with a text field": ("stage3 --text-field prompt --response-template {{response}} " + S3,
                                   "do not go with --text-field"),
    "leaking training mask": ("stage3 --mask full_bidir " + S3, "leaks labels"),
    "leaking evaluation mask": ("stage2 --mask full_bidir " + EVAL, "pass --allow-label-leakage"),
    "unknown scheduler": ("stage3 --lr-scheduler bogus " + S3, "unknown --lr-scheduler 'bogus'"),
    "stage 3 seed negative": ("stage3 --seed -5 " + S3, "--seed must be in"),
    "max length 2 for the data": ("stage3 " + S3.replace("--max-length 64", "--max-length 2"),
                                  "do not fit --max-length 2 with a response token"),
    "max length 1 with truncated prompts": ("stage3 --truncate-prompts "
                                            + S3.replace("--max-length 64", "--max-length 1"),
                                            "0 supervised (response) tokens"),
    "lora targets the model lacks": ("stage3 --lora-r 8 --lora-target-modules nope " + S3,
                                     "Target modules {'nope'} not found in the base model"),
    "adapter as the stage 3 model": ("stage3 " + S3.replace("{model}", "{adapter}"), "is a LoRA adapter"),
    "scheduler needing arguments": ("stage3 --lr-scheduler cosine_with_min_lr " + S3, "min_lr"),
    "plateau scheduler without evaluation": ("stage3 --lr-scheduler reduce_lr_on_plateau " + S3,
                                             "requires an eval strategy"),
    # stage 4
    "stage 1 run is a stage 2 run": ("stage4 --stage1-run {s2} " + S4, "is a stage2_ablation_eval run, not"),
    "stage 1 run of another model": ("stage4 --stage1-run {s1_other} " + S4, "recovery needs the baseline of the same"),
    "checkpoint is a stage 1 run": ("stage4 --checkpoint {s1} " + S4, "is a stage1_baseline_eval run, not stage3"),
    "checkpoint does not exist": ("stage4 --checkpoint /no/such/run " + S4, "is not a run directory"),
    "stage 4 batch size 0": ("stage4 --batch-size 0 " + S4, "--batch-size must be"),
    "stage 4 unknown mask": ("stage4 --mask bogus " + S4, "unknown mask 'bogus'"),
    # reading commands
    "status of a missing runs folder": ("status --runs-dir /no/runs", "does not exist"),
    "report of a missing runs folder": ("report --runs-dir /no/runs", "does not exist"),
    "aggregate of a missing runs folder": ("aggregate --runs-dir /no/runs", "does not exist"),
    # remote (fails before any connection)
    "remote port 0": ("remote sync --port 0 --host 127.0.0.1", "--port"),
    "remote port words": ("remote sync --port abc --host 127.0.0.1", "Invalid value for '--port'"),
    "remote session with a dot": ("remote watch --host 127.0.0.1 --session a.b", "session name"),
    "remote poll 0": ("remote watch --poll-seconds 0 " + REMOTE, "--poll-seconds"),
    "remote key missing": ("remote sync --host 127.0.0.1 --key /no/key", "SSH key file not found"),
    "bench unknown task": ("bench --model {model} --tasks piqqa --limit 2 --device cpu", "unknown task 'piqqa'"),
    "bench batch size 0": ("bench --model {model} --tasks piqa --batch-size 0 --device cpu", "--batch-size must be"),
    # demo and tools
    "demo unknown preset": ("demo --preset huge --workdir {root}/demo", "unknown preset 'huge'"),
    "demo workdir is a file": ("demo --preset smoke --workdir {a_file}", "is not a folder"),
    "tiny model over an existing folder": ("tiny-model --out {root}", "already exists"),
    "tiny model unknown architecture": ("tiny-model --arch gpt9 --out {root}/new-model", "gpt9"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, study, capsys):
    template, message = CASES[case]
    argv = template.format(**study).split()
    before = snapshot(study["root"])
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"{case}: exit {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate: error:"), f"{case}: {err}"
    assert message in lines[0], f"{case}: {lines[0]}"
    assert "Traceback" not in out + err
    assert snapshot(study["root"]) == before, f"{case}: files changed"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
