"""A mask from a file, loaded, named by its digest and registered: ``--mask path/to/masks.py:name``.

    python -c "from ablate.core.mask_files import resolve; print(resolve('tests/data/user_masks.py:prefill', None))"

What the function may be and how it is probed: ablate.core.user_masks.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ablate.core.masks import MASKS, MaskSpec
from ablate.core.user_masks import line, parse, probe
from ablate.errors import BadInput


def label_of(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:8]}"


def resolve(value: str, source: dict | None) -> tuple[str, dict | None]:
    """The mask name a run uses and the file it came from: ``path.py:name`` is loaded, probed and registered as
    ``name@<sha8>``; a name with ``source`` (a config re-read) is loaded again from the recorded file, whose
    digest must be the recorded one. Anything else is returned as it is (a built-in mask, or unknown)."""
    parsed = parse(value)
    if parsed is not None:
        path, name = parsed
        data = _read(path, value)
        source = {"path": str(path.resolve()), "name": name, "sha256": hashlib.sha256(data).hexdigest()}
    elif source is not None:
        if not isinstance(source, dict) or not all(isinstance(source.get(k), str) for k in ("path", "name", "sha256")):
            raise BadInput(f"mask '{value}': its recorded mask file is not {{path, name, sha256}} (edited?)")
        if value != label_of(source["name"], source["sha256"]):
            raise BadInput(f"mask '{value}' is not the recorded mask file's {label_of(source['name'], source['sha256'])}")
        data = _read(Path(source["path"]), value)
        if hashlib.sha256(data).hexdigest() != source["sha256"]:
            raise BadInput(f"mask file {source['path']} changed since this run was configured (its sha256 is not "
                           f"the recorded {source['sha256'][:12]}...); restore it, or start a new run with "
                           f"--mask {source['path']}:{source['name']}")
    else:
        return value, None
    label = label_of(source["name"], source["sha256"])
    if label not in MASKS:
        register(label, _load(Path(source["path"]), source["name"], data), source)
    verdict = verdict_of(MASKS[label])
    if "verdict" in source and source["verdict"] != verdict:  # the same file, probed otherwise (another version)
        raise BadInput(f"mask '{label}': its probes now say {verdict}, not the recorded {source['verdict']} (another "
                       "version of ablate probes it otherwise); rerun with this version")
    # Recorded with the file (config.json, digested in the run's results): what readers take the mask to be.
    return label, {**source, "verdict": verdict}


def verdict_of(spec: MaskSpec) -> dict:
    return {"leaks_labels": spec.leaks_labels, "shares_context": spec.shares_context,
            "causal_continuation": spec.causal_continuation, "needs_segments": spec.needs_segments}


def _read(path: Path, value: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInput(f"--mask {value}: cannot read {path}: {exc.strerror or exc}") from None


def _load(path: Path, name: str, data: bytes):
    spec = importlib.util.spec_from_loader(f"ablate_user_mask_{hashlib.sha256(data).hexdigest()[:16]}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    try:
        exec(compile(data, str(path), "exec"), module.__dict__)  # the bytes that were digested, not a re-read
    except Exception as exc:
        raise BadInput(f"mask file {path} does not run: {type(exc).__name__}: {line(exc)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BadInput(f"mask file {path} defines no function '{name}'")
    return fn


def register(label: str, fn, source: dict) -> None:
    verdict = probe(fn, label)
    MASKS[label] = MaskSpec(
        label, None, f"from {source['path']}:{source['name']} (sha256 {source['sha256'][:12]}...)",
        leaks_labels=verdict["leaks_labels"], shares_context=verdict["shares_context"],
        needs_segments=verdict["needs_segments"], pattern=fn, causal_continuation=verdict["causal_continuation"],
        source={k: source[k] for k in ("path", "name", "sha256")})
