"""What a run ran on: git sha and dirty flag, package versions, device (a run's ``env.json``).

    python -c "from ablate.results.environment import environment; print(environment('cpu'))"

On a rented box the code arrives without ``.git``: ``ablate remote launch``
writes ``.ablate-source.json`` beside it (the laptop's sha, dirty flag, a digest
of the uncommitted diff, and each copied file's sha256). A run reads its
provenance from there and checks the files still are what was copied.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SOURCE_FILE = ".ablate-source.json"
CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or the copy on a box) this ablate runs from
PACKAGES = ("ablate", "torch", "transformers", "lm_eval", "datasets", "accelerate", "safetensors", "tokenizers")


def _git(*args: str, cwd: Path | None = None, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                             cwd=cwd or Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() if strip else out.stdout) if out.returncode == 0 else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(root: Path, files: list[str]) -> dict:
    """What ``ablate remote launch`` copies from the checkout at ``root`` (run on the laptop)."""
    sha = _git("rev-parse", "HEAD", cwd=root)
    tracked = set((_git("ls-files", "-z", cwd=root, strip=False) or "").split("\0")) if sha else set()
    untracked = sorted(f for f in files if f not in tracked)
    diff = hashlib.sha256((_git("diff", "HEAD", "--binary", cwd=root, strip=False) or "").encode())
    for f in untracked:  # files git does not track yet are part of what ran
        diff.update(f"\0{f}\0{_sha256(root / f)}".encode())
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=root)) or bool(untracked) if sha else None
    return {"git_sha": sha, "git_dirty": dirty, "diff_sha256": diff.hexdigest() if dirty else None,
            "untracked": untracked, "from_host": platform.node(), "copied_at": time.time(),
            "files": {f: _sha256(root / f) for f in files}}


def source_of_code(root: Path = CODE_ROOT) -> dict | None:
    """The provenance ``ablate remote launch`` left beside the code, checked against the files; None without one."""
    try:
        record = json.loads((Path(root) / SOURCE_FILE).read_text())
        files = dict(record.pop("files"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    changed = []
    for rel, digest in sorted(files.items()):
        try:
            if _sha256(Path(root) / rel) != digest:
                changed.append(rel)
        except OSError:
            changed.append(rel)
    record["changed_since_copy"] = changed  # edited on the box after the copy: the sha alone no longer says what ran
    if changed:
        record["git_dirty"] = True
    return record


def environment(device: str) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    sha = _git("rev-parse", "HEAD")
    source = None if sha else source_of_code()
    env = {
        "git_sha": sha if sha else (source or {}).get("git_sha"),
        "git_dirty": (bool(_git("status", "--porcelain", "--untracked-files=no")) if sha
                      else (source or {}).get("git_dirty")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "packages": versions,
        "device": device,
    }
    if source is not None:
        env["source"] = source  # copied from another machine: its sha, diff digest, host, and edits since
    import torch

    if torch.cuda.is_available():
        env["cuda"] = {"version": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i)
                                                              for i in range(torch.cuda.device_count())]}
    return env


def provenance(run_dir: Path) -> str:
    """One line: which code ran a run, and where (its env.json), e.g. ``code 1a2b3c4d5e6f + uncommitted ..., on box-one``."""
    try:
        env = json.loads((Path(run_dir) / "env.json").read_text())
    except (OSError, ValueError):
        return "no readable env.json"
    if not isinstance(env, dict):
        return "no readable env.json"
    source = env.get("source") if isinstance(env.get("source"), dict) else {}
    sha = env.get("git_sha")
    code = f"code `{str(sha)[:12]}`" if sha else "code of unknown commit (no git, no provenance from a launch)"
    if env.get("git_dirty"):
        diff = source.get("diff_sha256")
        code += " + uncommitted changes" + (f" (diff sha256 `{diff[:12]}`)" if diff else "")
    if source.get("changed_since_copy"):
        code += f", {len(source['changed_since_copy'])} file(s) edited on the box after the copy"
    if source.get("from_host"):
        code += f", copied from `{source['from_host']}`"
    return f"{code}, ran on `{env.get('hostname') or 'unknown host'}`"
