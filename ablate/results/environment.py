"""What a run ran on: git sha and dirty flag, package versions, device (a run's ``env.json``).

    python -c "from ablate.results.environment import environment; print(environment('cpu'))"
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("ablate", "torch", "transformers", "lm_eval", "datasets", "accelerate", "safetensors", "tokenizers")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    sha = _git("rev-parse", "HEAD")
    env = {
        "git_sha": sha,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "packages": versions,
        "device": device,
    }
    import torch

    if torch.cuda.is_available():
        env["cuda"] = {"version": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i)
                                                              for i in range(torch.cuda.device_count())]}
    return env
