"""lm-eval surfaces ablate re-states or reaches into: python -m pytest tests/test_lm_eval_drift.py -q

Each test fails when an lm-eval upgrade changes one of them. What to do then: read the new
upstream code, bring ablate/core/lm_eval_model.py in line with it, then update ``PINNED`` here
(the failure message gives the new hash). A hash over the source is deliberately strict: a
change to a comment also fails, and costs one look.
"""

import hashlib
import importlib
import inspect

import lm_eval
import lm_eval.evaluator
import pytest
from lm_eval import simple_evaluate

from ablate.core import lm_eval_model
from ablate.core.lm_eval_model import SAMPLE_KEYS, PrefillMaskLM, sample_rows
from ablate.core.models import load_model
from ablate.core.tasks import load_tasks, task_manager

MODULE = "ablate/core/lm_eval_model.py"
# sha256 of inspect.getsource(...) for every surface, with the lm-eval release they were read from.
PINNED = {
    "lm_eval": "0.4.13",
    "sources": {
        # Re-stated by PrefillMaskLM._loglikelihood_tokens (with prefix sharing) and _forward.
        "lm_eval.models.huggingface:HFLM._loglikelihood_tokens":
            "994529f70fd23192506699a9e98fb83e6a63182494cc3e5997520582a28dc4f5",
        "lm_eval.models.huggingface:HFLM._model_call":
            "abbd2a81796f29be6f0ad3f5f0aecc2e655c57de04c4f4a0924b00dd9b6220f8",
        # Generation: _model_generate re-stated for non-causal masks (ablate.core.generation), inside
        # upstream's generate_until batching, left padding and `until` handling, with its stop criteria.
        "lm_eval.models.huggingface:HFLM._model_generate":
            "c080f2baae104b1e7678bd571691d710c5adecee684b7e873975df8bf5c66f87",
        "lm_eval.models.huggingface:HFLM.generate_until":
            "d7a28ec8c421c6c2ce53faa82a9f9b655f4f67c4dff670de4c12dc9773917418",
        "lm_eval.models.huggingface:stop_sequences_criteria":
            "50a9d2508c855c43012773d24b7e5373a8670c0bfb91c3be850b4d003b614609",
        # batch_size="auto": re-stated by PrefillMaskLM._detect_rows, with the helpers it imports.
        "lm_eval.models.huggingface:HFLM._detect_batch_size":
            "dedc24a330b8d1aff3562f3bcc69faecb3e69a2b54edab0ad9efe9491dd6a1d8",
        # Where the prompt boundary the mask reads is drawn, and the request tuples the loop receives.
        "lm_eval.api.model:TemplateLM.loglikelihood":
            "507df4a0fa1d0bae59b457b7624644fefcdf91c2f5fa3d234c97106b22580b5c",
        "lm_eval.api.model:TemplateLM._encode_pair":
            "374ff6fd67d4c664f6c7edebb62f8a140d81e43f45498f91bbd3b166e47677b6",
        # The task index (task_entry, single_yaml_task_folders) and the YAML loader (read_task_yaml).
        "lm_eval.tasks.manager:TaskManager.task_index":
            "bde9b49af8d623a373013f144f28efc1bee7ea587639eaa61109842e2c38e216",
        "lm_eval.tasks._index:TaskIndex":
            "5433fef70fe42d57d4baefd323c23c579bce054621ebd451d1e60c5c101754a3",
        "lm_eval.tasks._index:Entry":
            "7c40d68f63415cb7d6c6beadb83489286958338191df47bda1845e705b343ac5",
        "lm_eval.tasks._index:Kind":
            "e2f0e5eb829b686e92bb191a9618b42eeded7204bce2fecbd2ab5cf6112ae165",
        "lm_eval.tasks._yaml_loader:load_yaml":
            "26dc6213547a6834501f609147577567ab33d05226e4742ac17306e5ca607192",
        # Replaced by _quiet_git_hash: drop the replacement once upstream stops letting git print errors.
        "lm_eval.loggers.utils:get_git_commit_hash":
            "3b8396124d9caddcd239c17a719b7e38c700d9f8821f920999f9a997598bf170",
    },
}


def todo(what: str) -> str:
    return (f"lm-eval changed {what}: re-read upstream, update {MODULE}, "
            f"then update the pinned hash in tests/test_lm_eval_drift.py")


def resolve(surface: str):
    module, _, qualname = surface.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    return obj.fget if isinstance(obj, property) else obj


def test_installed_version_is_the_one_re_stated():
    assert lm_eval_model.LM_EVAL_VERSION == PINNED["lm_eval"], "keep LM_EVAL_VERSION and PINNED in step"
    assert lm_eval.__version__ == PINNED["lm_eval"], (
        f"lm-eval is {lm_eval.__version__}, {MODULE} re-states {PINNED['lm_eval']}: re-read upstream for every "
        f"surface in PINNED, update {MODULE} (and LM_EVAL_VERSION), then update PINNED")


@pytest.mark.parametrize("surface", sorted(PINNED["sources"]))
def test_pinned_source_is_unchanged(surface):
    try:
        obj = resolve(surface)
        source = inspect.getsource(obj)
    except (ImportError, AttributeError, TypeError, OSError) as exc:
        pytest.fail(f"{todo(surface)} (it is gone: {type(exc).__name__}: {exc})")
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == PINNED["sources"][surface], f"{todo(surface)} (new sha256 {digest})"


def test_the_git_hash_replacement_is_what_simple_evaluate_calls():
    assert lm_eval.evaluator.get_git_commit_hash is lm_eval_model._quiet_git_hash, todo(
        "how lm_eval.evaluator imports get_git_commit_hash")
    assert "get_git_commit_hash()" in inspect.getsource(lm_eval.evaluator.simple_evaluate), todo(
        "how simple_evaluate records the git hash")


@pytest.fixture(scope="module")
def tiny_run(tiny_models):
    """One real simple_evaluate through PrefillMaskLM: the bundled task, two documents."""
    model, tokenizer = load_model(str(tiny_models("llama")), "cpu", "float32", "sdpa")
    manager = task_manager(None, ["ablate_tiny"])
    tasks = load_tasks(manager, ["ablate_tiny"], {})
    lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=4, device="cpu")
    return simple_evaluate(model=lm, tasks=list(tasks.values()), limit=2, log_samples=True,
                           bootstrap_iters=0, task_manager=manager)


def test_sample_schema(tiny_run):
    samples = tiny_run["samples"]["ablate_tiny"]
    assert len(samples) == 2
    for sample in samples:
        missing = sorted({*SAMPLE_KEYS, "acc_norm"} - set(sample))
        assert not missing, todo(f"the simple_evaluate(log_samples=True) sample schema (no {missing})")
        arguments, responses = sample["arguments"], sample["filtered_resps"]
        assert len(arguments) == len(responses) == 4, todo("one argument and one response per choice")
        assert all(len(a) == 2 and all(isinstance(x, str) for x in a) for a in arguments), todo(
            "arguments: (context, continuation) strings per choice")
        assert all(isinstance(float(r[0]), float) and isinstance(r[1], bool) for r in responses), todo(
            "filtered_resps: (loglikelihood, is_greedy) per choice")
    rows = sample_rows(samples)
    assert [r["doc_id"] for r in rows] == [0, 1]
    assert all(r["correct"] == (r["pred"] == r["target"]) for r in rows), todo("acc against target")


def test_result_schema(tiny_run):
    # stages/evaluation.py task_metrics reads these keys of results["results"][task].
    result = tiny_run["results"]["ablate_tiny"]
    missing = sorted({"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} - set(result))
    assert not missing, todo(f"the simple_evaluate results schema (no {missing})")
