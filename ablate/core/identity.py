"""What a run was made from, by identity rather than by path: models, task data, settings.

    python -c "from ablate.core.identity import model_identity; print(model_identity('/tmp/tiny'))"

A hub model is its id plus the resolved revision (the commit transformers
loaded). A local folder is a fingerprint: sha256 over the names and contents of
its weight, config and tokenizer files, so a checkpoint replaced at the same
path is a different model, and a folder moved elsewhere is the same one. Each
file's digest is cached by (path, size, mtime, inode, ctime) in ``~/.cache/ablate``, so
fingerprinting a multi-GB checkpoint costs its read once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ablate.errors import BadInput

log = logging.getLogger(__name__)

# Files that decide what a model computes; a README or a training log does not.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken", ".py")


def _cache_file() -> Path:
    from ablate.core.assets import cache_root

    return cache_root() / "file-digests.json"


class _Digests(dict):
    """The stat-keyed digest cache as loaded, remembering whether anything was added since."""

    def __setitem__(self, key, value):
        if self.get(key) != value:
            self.changed = True
        super().__setitem__(key, value)


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        cache = _Digests(data if isinstance(data, dict) else {})
    except (OSError, ValueError):
        cache = _Digests()
    cache.changed = False
    return cache


def _save_cache(cache: dict) -> None:
    """Written only when a digest was added, without entries whose file is gone (rotated checkpoints, old runs)."""
    from ablate.results.rundir import write_json

    if not getattr(cache, "changed", True):
        return  # a multi-MB rewrite per lookup made every stage 4 call ~0.3 s slower
    kept = {path: entry for path, entry in cache.items() if os.path.exists(path)}
    try:
        write_json(_cache_file(), kept)
    except OSError as exc:  # a read-only home costs speed only
        log.debug("cannot cache file digests: %s", exc)


def file_digest(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file, cached by its stat so an unchanged multi-GB file is read once."""
    path = Path(path).resolve()
    st = path.stat()
    # ctime too: `cp -p` or a restore can keep size, mtime and inode of a file whose bytes changed
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    own = cache is None
    cache = _load_cache() if own else cache
    hit = cache.get(str(path))
    if hit and hit[:4] == stamp:
        return hit[4]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    cache[str(path)] = [*stamp, digest.hexdigest()]
    if own:
        _save_cache(cache)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix in MODEL_SUFFIXES)
    if not files:
        raise BadInput(f"model folder {folder} holds no weight or config files")
    cache = _load_cache()
    total = hashlib.sha256()
    try:
        for p in files:
            total.update(f"{p.name}\0{file_digest(p, cache)}\n".encode())
    except OSError as exc:
        raise BadInput(f"cannot read model folder {folder}: {exc.strerror or exc}") from None
    _save_cache(cache)
    return total.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (a stage 3 checkpoint: weights, adapter, config,
    trainer state, optimizer, rng states); OSError when one cannot be read."""
    folder = Path(folder)
    cache = _load_cache()
    out = {p.relative_to(folder).as_posix(): file_digest(p, cache)
           for p in sorted(q for q in folder.rglob("*") if q.is_file())}
    _save_cache(cache)
    return out


def is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def model_identity(model: str) -> dict:
    """``{"local": fingerprint}`` for a folder (a LoRA adapter adds its base's identity), else ``{"hub": id, "revision": sha}``."""
    if is_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise BadInput(f"model path '{model}' does not exist or is not a directory")
        identity = {"local": folder_fingerprint(path)}
        adapter = path / "adapter_config.json"
        if adapter.is_file():
            try:
                base = json.loads(adapter.read_text())["base_model_name_or_path"]
            except (OSError, ValueError, KeyError, TypeError):
                raise BadInput(f"{adapter} does not name its base model (base_model_name_or_path)") from None
            identity["base"] = model_identity(base)
        return identity
    from transformers import AutoConfig  # not ablate.core.models, which imports checkpoints, which imports this

    try:
        revision = getattr(AutoConfig.from_pretrained(model), "_commit_hash", None)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"cannot load model '{model}': {first}") from None
    return {"hub": model, "revision": revision}


def describe(identity: dict | None) -> str:
    if not identity:
        return "an unrecorded model"
    if "hub" in identity:
        return f"{identity['hub']}@{(identity.get('revision') or 'unknown')[:12]}"
    return f"local model {identity['local'][:12]}" + (f" on {describe(identity['base'])}" if "base" in identity else "")


def task_data_digests(paths: dict[str, Path]) -> dict[str, str]:
    cache = _load_cache()
    out = {name: file_digest(path, cache) for name, path in sorted(paths.items())}
    _save_cache(cache)
    return out


# --- a task as lm-eval resolved it -----------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv", ".py", ".yaml")


def _source(fn) -> str:
    import inspect

    try:
        return inspect.getsource(fn)
    except (TypeError, OSError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def _canonical(value, where: str, files: dict[str, Path]):
    """JSON-able, deterministic form of a resolved config value; local files become ``<file>`` and go to
    ``files`` (their contents are digested apart, so a moved file is the same task and an edited one is not)."""
    import re

    if isinstance(value, dict):
        return {str(k): _canonical(v, f"{where}.{k}", files) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}.{i}", files) for i, v in enumerate(value)]
    if isinstance(value, str):
        # A path, absolute or relative to the working folder (as datasets reads data_files).
        if len(value) < 4096 and "\n" not in value and (value.startswith(("/", "./", "../", "~"))
                                                        or Path(value).suffix in DATA_SUFFIXES):
            path = Path(value).expanduser()
            if path.exists():
                files[where] = path
                return "<file>"
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if callable(value):
        import inspect

        try:  # a !function's module may hold helpers the function calls
            module = inspect.getsourcefile(value)
            if module:
                files[f"{where}:module"] = Path(module)
        except TypeError:
            pass
        return _source(value)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _tree_digest(path: Path, cache: dict) -> str:
    if path.is_file():
        return file_digest(path, cache)
    total = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        total.update(f"{p.relative_to(path)}\0{file_digest(p, cache)}\n".encode())
    return total.hexdigest()


def _docs_digest(task) -> str:
    """sha256 over the documents lm-eval will score and draw few-shot examples from, after process_docs."""
    total = hashlib.sha256()
    for part, docs in (("eval", task.eval_docs), ("fewshot", _fewshot_docs(task))):
        total.update(f"{part}\n".encode())
        for doc in docs or []:
            total.update(json.dumps(doc, sort_keys=True, default=str).encode() + b"\n")
    return total.hexdigest()


def _fewshot_docs(task):
    try:
        return task.fewshot_docs()
    except Exception:  # a task without a few-shot source; lm-eval then samples from nothing
        return None


def task_identity(task, yaml_path: Path | None = None) -> dict:
    """One built lm-eval task by what decides its numbers.

    ``config``: each key of the resolved TaskConfig (YAML includes merged, templates, choices, target,
    metrics, filters, few-shot settings, delimiters; functions by their source) -> a short digest, so a
    mismatch names the key; ``files``: every local file the config names (data files, the YAML, a
    function's module) -> sha256; ``docs_sha256``: the documents themselves as lm-eval loaded them.
    """
    files: dict[str, Path] = {}
    raw = task.config.to_dict(keep_callable=True)
    config = {k: _canonical(v, k, files) for k, v in raw.items()}
    if yaml_path is not None and Path(yaml_path).is_file():  # named once, as the task's YAML
        files = {w: p for w, p in files.items() if p.resolve() != Path(yaml_path).resolve()}
        files["yaml"] = Path(yaml_path)
    cache = _load_cache()
    try:
        digests = {where: _tree_digest(path, cache) for where, path in sorted(files.items())}
    except OSError as exc:
        raise BadInput(f"task '{raw.get('task')}': cannot read {exc.filename}: {exc.strerror or exc}") from None
    _save_cache(cache)
    return {"config_sha256": _digest(config), "config": {k: _digest(v)[:16] for k, v in sorted(config.items())},
            "files": digests, "docs_sha256": _docs_digest(task)}


def mismatch(expected: dict, found: dict | None) -> list[str]:
    """What differs between two comparison records, readable: ``limit``, ``dtype``,
    ``tasks.mytask.config (doc_to_text)``, ``tasks.mytask.files (dataset_kwargs.data_files.test)``."""
    found = found if isinstance(found, dict) else {}
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if a == b:
            continue
        if key == "tasks" and isinstance(a, dict) and isinstance(b, dict):
            out += _task_mismatch(a, b)
        else:
            out.append(key)
    return out


def _task_mismatch(a: dict, b: dict) -> list[str]:
    out = []
    for name in sorted(set(a) | set(b)):
        ta, tb = a.get(name), b.get(name)
        if ta == tb:
            continue
        if not (isinstance(ta, dict) and isinstance(tb, dict)):
            out.append(f"tasks.{name} ({'not in the other run' if tb is None else 'not in this run' if ta is None else 'unrecorded'})")
            continue
        parts = []
        for part in sorted(set(ta) | set(tb)):
            pa, pb = ta.get(part), tb.get(part)
            if pa == pb or (part == "config_sha256" and ta.get("config") != tb.get("config")):
                continue
            if isinstance(pa, dict) and isinstance(pb, dict):
                keys = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
                parts.append(f"tasks.{name}.{part} ({', '.join(keys)})")
            else:
                parts.append(f"tasks.{name}.{part.removesuffix('_sha256')}")
        out += parts
    return out
