"""Resolve lm-eval task names, custom task YAMLs and offline task data.

    ablate stage1 --model /tmp/tiny --tasks piqa --task-data piqa=ablate/core/task_data/piqa.jsonl

``--task-data TASK=FILE`` keeps the task's real lm-eval config (prompt
template, ``process_docs``, choices, metrics) and only swaps where its rows
come from: every split the config names reads FILE, which must hold rows in the
task's hub schema (JSONL, JSON, CSV or Parquet). A multiple-choice label may be
an index (``1`` or ``"1"``) or the text of a choice.

Everything is checked before any model work: only ``SCORED_OUTPUT_TYPES`` are
accepted, and a row whose label lm-eval could not place among its choices (it
would count it wrong whatever the model answers) is refused.

lm-eval's task index and YAML loader are private: they are reached only through
``ablate.core.lm_eval_model`` (tests/test_lm_eval_drift.py fails when they change).
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

from ablate.errors import BadInput
from ablate.results.rundir import write_json

log = logging.getLogger(__name__)

TASK_DATA = Path(__file__).parent / "task_data"
# Bundled tasks read their bundled rows unless --task-data says otherwise.
BUNDLED_DATA = {"ablate_tiny": TASK_DATA / "ablate_tiny" / "ablate_tiny.jsonl"}
# The five tasks of the study, with fixture rows the project wrote itself (not benchmark data).
STUDY_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
FIXTURE_DATA = {name: TASK_DATA / f"{name}.jsonl" for name in STUDY_TASKS}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# File suffix -> the `datasets` builder that reads it: --task-data files here, stage 3's --data (sft_data).
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# lm-eval output types the stages score (acc from per-choice loglikelihoods); add generation here.
SCORED_OUTPUT_TYPES = frozenset({"multiple_choice", "generate_until"})


def parse_task_data(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise BadInput(f"--task-data expects TASK=FILE, got '{item}'")
        path = Path(file).expanduser()
        if path.is_dir():
            raise BadInput(f"--task-data file for '{name}' is a directory: {file}")
        if not path.is_file():
            raise BadInput(f"--task-data file for '{name}' not found: {file}")
        if path.suffix not in LOADERS:
            raise BadInput(f"--task-data file {file}: unsupported format '{path.suffix}' (use {', '.join(LOADERS)})")
        _check_rows(path, name)
        out[name] = path.resolve()
    return out


def _check_rows(path: Path, task: str) -> None:
    try:
        with path.open("rb") as fh:
            raw = b"" if path.suffix == ".parquet" else fh.read()  # parquet is binary: only check it opens
    except OSError as exc:
        raise BadInput(f"--task-data file {path} for '{task}' cannot be read: {exc.strerror or exc}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # datasets would fail later with a traceback
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BadInput(f"--task-data file {path} line {line} is not UTF-8 text "
                       f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if path.suffix in (".jsonl", ".json") and not _json_rows(path):
        raise BadInput(f"--task-data file {path} for '{task}' has no rows")


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for each row, read as datasets' json loader reads a .json or .jsonl file."""
    text = path.read_text(encoding="utf-8-sig")  # datasets skips a UTF-8 byte-order mark too
    if text.lstrip().startswith("["):  # datasets reads a JSON array of objects as rows
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--task-data file {path} line {exc.lineno} is not valid JSON: {exc.msg}") from None
        rows = [(f"item {i}", item) for i, item in enumerate(items)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise BadInput(f"--task-data file {path} line {number} is not valid JSON: {exc.msg}") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise BadInput(f"--task-data file {path} {where} is not a JSON object")
    return rows


def _index_cache() -> Path:
    from importlib.metadata import version

    from ablate.core.assets import cache_root

    return cache_root() / f"lm_eval-{version('lm_eval')}-task-folders.json"


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
    from ablate.core.lm_eval_model import single_yaml_task_folders

    folders = single_yaml_task_folders()
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
        _check_include_path(Path(include_path))
        paths.append(include_path)
    if tasks:
        folders = _task_folders()
        local = TaskManager(include_path=paths, include_defaults=False)
        wanted = [t for t in tasks if t not in local.all_tasks]
        if all(t in folders for t in wanted):
            return TaskManager(include_path=sorted({folders[t] for t in wanted}) + paths, include_defaults=False)
        # A name that is no task, group or tag anywhere is refused from the cached names, not a 15 s index.
        check_task_names(None, wanted, names=set(_all_names()) | set(local.all_tasks))
    return TaskManager(include_path=paths)


def _all_names() -> list[str]:
    """Every task, group and tag name lm-eval bundles, cached per lm-eval version beside the folder index."""
    cache = _index_cache().with_name(_index_cache().name.replace("task-folders", "task-names"))
    try:
        return json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    try:
        write_json(cache, names)
    except OSError as exc:  # a read-only home only costs speed
        log.debug("cannot cache the lm-eval task names: %s", exc)
    return names


def check_task_names(manager, tasks: list[str], names=None) -> None:
    known = names if names is not None else manager.all_tasks
    for name in tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise BadInput(f"unknown task '{name}'{hint}")


def _check_include_path(root: Path) -> None:
    """lm-eval skips a YAML it cannot load (logged at debug level), so its task would just be 'unknown'.

    A readable mapping without ``task:`` is left alone: it may be a template other YAMLs include.
    """
    import yaml

    from ablate.core.lm_eval_model import read_task_yaml

    for path in sorted(root.glob("**/*.yaml")):
        if {"__pycache__", ".ipynb_checkpoints"} & set(path.parts):  # lm-eval does not read these
            continue
        try:
            read_task_yaml(path, resolve_functions=False)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{mark.name}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}" if mark else path
            raise BadInput(f"--include-path file {where}: {exc.problem or exc.context}") from None
        except Exception as exc:  # other YAML errors, a missing include, an include cycle, not a mapping
            raise BadInput(f"--include-path file {path} cannot be read as a task: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_output_type(name: str, output_type: str) -> None:
    if output_type not in SCORED_OUTPUT_TYPES:
        why = (" (a rolling loglikelihood has no prompt to read under a mask, and no accuracy)"
               if output_type == "loglikelihood_rolling" else "")
        raise BadInput(f"task '{name}' is {output_type}; ablate scores "
                       f"{', '.join(sorted(SCORED_OUTPUT_TYPES))} tasks only{why}")


def _retarget(manager, name: str, data: Path) -> tuple[dict, str | None]:
    """The task's config reading ``data``, and the field its labels come from where they were made indices."""
    from ablate.core.lm_eval_model import read_task_yaml, task_entry

    entry = task_entry(manager, name)
    if entry is None or entry.yaml_path is None or entry.kind != "task":
        kind = f"a {entry.kind}" if entry else "unknown"
        raise BadInput(f"--task-data needs a single YAML task; '{name}' is {kind}")
    try:
        cfg = read_task_yaml(entry.yaml_path, resolve_functions=True)
    except Exception as exc:  # a !function that does not import, a broken include
        raise BadInput(f"task '{name}': cannot load {entry.yaml_path}: {_one_line(exc)}") from None
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
    # lm-eval returns a bare field's value as is, and scores a string label such as "1" by looking it up
    # among the choice texts: never found, so always wrong. Local files often carry such labels (JSON,
    # CSV). A template target that renders all digits is read as a choice index instead (doc_to_target
    # in lm_eval/api/task.py); int labels render to the same index and choice texts stay strings.
    label = cfg.get("doc_to_target")
    if cfg.get("output_type") == "multiple_choice" and isinstance(label, str) and label.isidentifier():
        cfg["doc_to_target"] = "{{" + label + "}}"
        return cfg, label
    return cfg, None


def _check_template_fields(name: str, cfg: dict, data: Path) -> None:
    """Name the missing field up front: lm-eval would fail later with a template or parse error."""
    import jinja2
    from jinja2 import meta

    if data.suffix not in (".jsonl", ".json") or cfg.get("process_docs"):
        return
    env = jinja2.Environment()
    fields: set[str] = set()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = cfg.get(key)
        if isinstance(value, str):
            fields |= meta.find_undeclared_variables(env.parse(value if "{" in value else "{{" + value + "}}"))
    for where, row in _json_rows(data):
        missing = sorted(fields - set(row))
        if missing:
            raise BadInput(f"--task-data file {data} {where} lacks field(s) {', '.join(missing)} "
                           f"used by task '{name}'")


def load_tasks(manager, tasks: list[str], task_data: dict[str, Path], scored: bool = True) -> dict:
    """Build the lm-eval Task objects, checking that offline rows fit each task.

    ``scored=False`` for rows that are rendered, not scored (the demo's stage 3 rows: one ending each).
    """
    from ablate.core.lm_eval_model import task_entry

    unknown = set(task_data) - set(tasks)
    if unknown:
        raise BadInput(f"--task-data names tasks not in --tasks: {', '.join(sorted(unknown))}")
    for name in tasks:  # before any dataset is read; a group's members are checked once built
        entry = task_entry(manager, name)
        if entry is not None and entry.kind == "task" and entry.cfg is not None:
            _check_output_type(name, entry.cfg.get("output_type", "generate_until"))  # TaskConfig's default
    specs, label_fields, sources = [], {}, {}
    for name in tasks:
        data = task_data.get(name) or BUNDLED_DATA.get(name)
        if not data:
            specs.append(name)
            continue
        cfg, label_fields[name] = _retarget(manager, name, data)
        specs.append(cfg)
        sources[name] = data
    try:
        built = manager.load(specs)["tasks"]
    except Exception as exc:  # lm-eval and datasets raise many types for data they cannot use
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        source = f" from --task-data {', '.join(str(p) for p in task_data.values())}" if task_data else ""
        raise BadInput(f"cannot build tasks {', '.join(tasks)}{source}: {type(exc).__name__}: {first}") from None
    for name, task in built.items():
        _check_docs(name, task, sources.get(name), label_fields.get(name), scored)
    return built


def _check_docs(name: str, task, data: Path | None, label_field: str | None = None, scored: bool = True) -> None:
    """Refuse rows lm-eval would score as wrong whatever the model answers, before any model work.

    ``label_field``: where ``_retarget`` turned a bare-field target into a template, the raw field.
    """
    _check_output_type(name, task.OUTPUT_TYPE)
    docs = list(task.eval_docs)
    source = f"data file {data}" if data else "data"
    if not docs:
        raise BadInput(f"task '{name}' has no documents in its evaluation split ({source})")
    if task.OUTPUT_TYPE == "generate_until":
        for i, doc in enumerate(docs):
            try:
                task.doc_to_text(doc)
                task.doc_to_target(doc)
            except Exception as exc:
                raise BadInput(f"task '{name}': row {i} of its {source} does not fit the task schema "
                               f"({type(exc).__name__}: {_one_line(exc)})") from None
        return
    one_choice, twice = [], []
    for i, doc in enumerate(docs):
        try:
            text = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc)
        except Exception as exc:
            raise BadInput(f"task '{name}': row {i} of its {source} does not fit the task schema "
                           f"({type(exc).__name__}: {_one_line(exc)})") from None
        # process_results scores against doc_to_text for multiple-input tasks (winogrande: the options are
        # in the context), else doc_to_target; a gold it cannot place among the choices counts as wrong.
        gold = text if task.multiple_input else target
        retargeted = label_field is not None and not task.multiple_input
        raw = doc.get(label_field) if retargeted else gold
        if not _gold_in_choices(gold, choices):
            shown = "null" if raw is None else repr(raw)
            what = "a choice index" if task.multiple_input else "a choice index or one of the choices"
            raise BadInput(f"task '{name}': row {i} of its {source} has label {shown}, which is not {what} "
                           f"(it has {len(choices)} choices)")
        # A digit string that is also a choice text: lm-eval's bare field meant the text, the template the index.
        if retargeted and isinstance(gold, int) and raw in choices and choices.index(raw) != gold:
            raise BadInput(f"task '{name}': row {i} of its {source} has label {raw!r}, both the text of choice "
                           f"{choices.index(raw)} and index {gold}; write labels as integer indices")
        # Scored right whatever the model does (one choice), or decided by a tie (the gold's text twice).
        golds = gold if isinstance(gold, list) else [choices.index(gold) if isinstance(gold, str) else gold]
        if len(choices) < 2:
            one_choice.append(i)
        elif any(choices.count(choices[g]) > 1 for g in golds):
            twice.append(i)
    if scored and (one_choice or twice):
        def rows(found):
            return ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")

        parts = ([f"{len(one_choice)} have a single choice (rows {rows(one_choice)})"] if one_choice else []) + \
                ([f"{len(twice)} have their gold choice twice (rows {rows(twice)})"] if twice else [])
        raise BadInput(f"task '{name}': {len(one_choice) + len(twice)} of {len(docs)} documents of its {source} "
                       f"cannot be scored right or wrong: {'; '.join(parts)}")


def _gold_in_choices(gold, choices: list) -> bool:
    """Mirrors lm-eval's multiple_choice process_results, which scores a gold it maps to -100 as wrong."""
    if isinstance(gold, list):  # multiple targets: indices only
        return bool(gold) and all(isinstance(g, int) and 0 <= g < len(choices) for g in gold)
    if isinstance(gold, int):
        return 0 <= gold < len(choices)
    return isinstance(gold, str) and gold in choices
