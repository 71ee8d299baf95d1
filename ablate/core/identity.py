"""What a run was made from, by identity rather than by path: models, task data, settings.

    python -c "from ablate.core.identity import model_identity; print(model_identity('/tmp/tiny'))"

A hub model is its id plus the resolved revision (the commit transformers
loaded). A local folder is a fingerprint: sha256 over the names and contents of
its weight, config and tokenizer files, so a checkpoint replaced at the same
path is a different model, and a folder moved elsewhere is the same one. Each
file's digest is cached by (path, size, mtime, inode) in ``~/.cache/ablate``, so
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
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ablate"
    return root / "file-digests.json"


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    from ablate.results.rundir import write_json

    try:
        write_json(_cache_file(), cache)
    except OSError as exc:  # a read-only home costs speed only
        log.debug("cannot cache file digests: %s", exc)


def file_digest(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file, cached by its stat so an unchanged multi-GB file is read once."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    own = cache is None
    cache = _load_cache() if own else cache
    hit = cache.get(str(path))
    if hit and hit[:3] == stamp:
        return hit[3]
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
    from ablate.core.models import load_config

    revision = getattr(load_config(model), "_commit_hash", None)
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


def mismatch(expected: dict, found: dict | None) -> list[str]:
    """The keys of two comparison records that differ (all of ``expected``'s when ``found`` is absent)."""
    found = found or {}
    return sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
