"""Resolve lm-eval task names, custom task YAMLs and offline task data.

    ablate stage1 --model /tmp/tiny --tasks piqa --task-data piqa=ablate/task_data/piqa.jsonl

``--task-data TASK=FILE`` keeps the task's real lm-eval config (prompt
template, ``process_docs``, choices, metrics) and only swaps where its rows
come from: every split the config names reads FILE, which must hold rows in the
task's hub schema (JSONL, JSON, CSV or Parquet).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

from ablate.errors import BadInput
from ablate.rundir import write_json

log = logging.getLogger(__name__)

TASK_DATA = Path(__file__).parent / "task_data"
# Bundled tasks read their bundled rows unless --task-data says otherwise.
BUNDLED_DATA = {"ablate_tiny": TASK_DATA / "ablate_tiny" / "ablate_tiny.jsonl"}
# The five tasks of the study, with fixture rows the project wrote itself (not benchmark data).
STUDY_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
FIXTURE_DATA = {name: TASK_DATA / f"{name}.jsonl" for name in STUDY_TASKS}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def parse_task_data(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise BadInput(f"--task-data expects TASK=FILE, got '{item}'")
        path = Path(file).expanduser()
        if not path.is_file():
            raise BadInput(f"--task-data file for '{name}' not found: {file}")
        if path.suffix not in LOADERS:
            raise BadInput(f"--task-data file {file}: unsupported format '{path.suffix}' (use {', '.join(LOADERS)})")
        _check_rows(path, name)
        out[name] = path.resolve()
    return out


def _check_rows(path: Path, task: str) -> None:
    if path.suffix == ".jsonl":
        rows = 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"--task-data file {path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise BadInput(f"--task-data file {path} line {number} is not a JSON object")
            rows += 1
        if rows == 0:
            raise BadInput(f"--task-data file {path} for '{task}' has no rows")


def _index_cache() -> Path:
    from importlib.metadata import version

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ablate"
    return root / f"lm_eval-{version('lm_eval')}-task-folders.json"


def _task_folders() -> dict[str, str]:
    """Folder of every single-YAML lm-eval task, cached per lm-eval version.

    Indexing all ~15k bundled task YAMLs takes lm-eval ~15 s on a small CPU; a
    TaskManager over just the folders of the requested tasks is built in well under one.
    """
    cache = _index_cache()
    try:
        return json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    from lm_eval.tasks import TaskManager

    folders = {name: str(entry.yaml_path.parent) for name, entry in TaskManager().task_index.items()
               if entry.kind.name == "TASK" and entry.yaml_path is not None}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, folders)
    except OSError as exc:  # a read-only home only costs speed
        log.debug("cannot cache the lm-eval task index: %s", exc)
    return folders


def task_manager(include_path: str | None = None, tasks: list[str] | None = None):
    """A TaskManager that knows ``tasks`` (all of lm-eval's when a name is a group or tag)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DATA)]
    if include_path:
        if not Path(include_path).is_dir():
            raise BadInput(f"--include-path '{include_path}' is not a directory")
        paths.append(include_path)
    if tasks:
        folders = _task_folders()
        local = TaskManager(include_path=paths, include_defaults=False)
        wanted = [t for t in tasks if t not in local.all_tasks]
        if all(t in folders for t in wanted):
            return TaskManager(include_path=sorted({folders[t] for t in wanted}) + paths, include_defaults=False)
    return TaskManager(include_path=paths)


def check_task_names(manager, tasks: list[str]) -> None:
    for name in tasks:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise BadInput(f"unknown task '{name}'{hint}")


def _retarget(manager, name: str, data: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.yaml_path is None or entry.kind.name != "TASK":
        raise BadInput(f"--task-data needs a single YAML task; '{name}' is a {entry.kind.name.lower()}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    splits = {cfg[k] for k in SPLIT_KEYS if cfg.get(k)}
    cfg.update(
        dataset_path=LOADERS[data.suffix],
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data) for split in sorted(splits)}},
    )
    cfg.pop("custom_dataset", None)
    _check_template_fields(name, cfg, data)
    return cfg


def _check_template_fields(name: str, cfg: dict, data: Path) -> None:
    """Name the missing field up front: lm-eval would fail later with a template or parse error."""
    import jinja2
    from jinja2 import meta

    if data.suffix != ".jsonl" or cfg.get("process_docs"):
        return
    env = jinja2.Environment()
    fields: set[str] = set()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = cfg.get(key)
        if isinstance(value, str):
            fields |= meta.find_undeclared_variables(env.parse(value if "{" in value else "{{" + value + "}}"))
    for number, line in enumerate(data.read_text().splitlines(), 1):
        if line.strip():
            missing = sorted(fields - set(json.loads(line)))
            if missing:
                raise BadInput(f"--task-data file {data} line {number} lacks field(s) {', '.join(missing)} "
                               f"used by task '{name}'")


def load_tasks(manager, tasks: list[str], task_data: dict[str, Path]) -> dict:
    """Build the lm-eval Task objects, checking that offline rows fit each task."""
    unknown = set(task_data) - set(tasks)
    if unknown:
        raise BadInput(f"--task-data names tasks not in --tasks: {', '.join(sorted(unknown))}")
    specs = []
    for name in tasks:
        data = task_data.get(name) or BUNDLED_DATA.get(name)
        specs.append(_retarget(manager, name, data) if data else name)
    try:
        built = manager.load(specs)["tasks"]
    except Exception as exc:  # lm-eval and datasets raise many types for data they cannot use
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        source = f" from --task-data {', '.join(str(p) for p in task_data.values())}" if task_data else ""
        raise BadInput(f"cannot build tasks {', '.join(tasks)}{source}: {type(exc).__name__}: {first}") from None
    for name, task in built.items():
        _check_docs(name, task, task_data.get(name))
    return built


def _check_docs(name: str, task, data: Path | None) -> None:
    if task.OUTPUT_TYPE != "multiple_choice":
        log.warning("task %s is %s: ablate reports acc for multiple-choice tasks only", name, task.OUTPUT_TYPE)
        return
    docs = list(task.eval_docs)
    source = f"data file {data}" if data else "data"
    if not docs:
        raise BadInput(f"task '{name}' has no documents in its evaluation split ({source})")
    for i, doc in enumerate(docs):
        try:
            task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc)
        except Exception as exc:
            raise BadInput(f"task '{name}': row {i} of its {source} does not fit the task schema "
                           f"({type(exc).__name__}: {exc})") from None
        # Winogrande-style tasks put the choice in the context and return a string target.
        if isinstance(target, int) and not 0 <= target < len(choices):
            raise BadInput(f"task '{name}': row {i} of its {source} has target {target!r} "
                           f"outside its {len(choices)} choices")
