"""Run directories: ``runs/<stage>/<YYYYmmdd-HHMMSS>/``, written atomically, never overwritten.

    python -c "from ablate.rundir import find_runs; print(find_runs('runs', 'stage1_baseline_eval'))"

A run carries an explicit status in ``status.txt`` (running -> completed |
failed | ...); readers trust it over the presence of other files.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

RUNNING, COMPLETED, FAILED, GATED = "running", "completed", "failed", "gated"
PACKAGES = ("ablate", "torch", "transformers", "lm_eval", "datasets", "accelerate", "safetensors", "tokenizers")


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: temporary file in the same folder, fsync, rename. Readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def new_run_dir(runs_dir: Path, stage: str) -> Path:
    """Create a fresh run directory; a second run in the same second gets a suffix."""
    base = Path(runs_dir) / stage
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        set_status(path, RUNNING)
        return path
    raise RuntimeError(f"could not create a run directory under {base}")


def set_status(run_dir: Path, status: str, reason: str = "") -> None:
    write_text(Path(run_dir) / "status.txt", status + (f"\n{reason}\n" if reason else "\n"))


def read_status(run_dir: Path) -> tuple[str, str]:
    try:
        lines = (Path(run_dir) / "status.txt").read_text().splitlines()
    except FileNotFoundError:
        return "unknown", "no status.txt"
    return (lines[0].strip() if lines else "unknown"), "\n".join(lines[1:]).strip()


@contextmanager
def failure_status(run_dir: Path, enabled: bool = True):
    """Mark the run failed, with the exception as the reason, if the block raises."""
    try:
        yield
    except BaseException as exc:
        if enabled:
            set_status(run_dir, FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise


def check_gate(gate: dict | None, results: dict) -> str | None:
    """The reason a result fails its stage's probe gate (``{metric: macro.acc, min: 0.4}``), or None."""
    if not gate:
        return None
    value = results
    for part in gate["metric"].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, (int, float)):
        return f"gate metric {gate['metric']} is missing from the results"
    if "min" in gate and value < gate["min"]:
        return f"{gate['metric']} = {value:.4g} is under the gate minimum {gate['min']}"
    if "max" in gate and value > gate["max"]:
        return f"{gate['metric']} = {value:.4g} is over the gate maximum {gate['max']}"
    return None


def refuse_gated(run: "Run", ignore_gate: bool) -> None:
    """Later stages do not start from a gated run unless told to."""
    from ablate.errors import BadInput

    if run.status == GATED and not ignore_gate:
        raise BadInput(f"{run.path} is gated ({run.reason}); pass --ignore-gate to use it anyway")


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
    env = {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
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


@dataclass(frozen=True)
class Run:
    path: Path
    status: str
    reason: str
    metrics: dict | None
    summary: dict | None
    error: str | None  # a metrics.json / summary.json that exists but cannot be read, by path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return self.path.parent.name


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(data, dict):
        return None, f"{path}: not a JSON object"
    return data, None


def load_run(path: Path) -> Run | None:
    """One run directory with its status and results; None when ``path`` is not a directory."""
    path = Path(path)
    if not path.is_dir():
        return None
    status, reason = read_status(path)
    metrics, error_m = _read_json(path / "metrics.json")
    summary, error_s = _read_json(path / "summary.json")
    return Run(path, status, reason, metrics, summary, error_m or error_s)


def find_runs(runs_dir: Path, stage: str) -> list[Run]:
    """All runs of a stage, oldest first; a corrupted results file is reported in ``Run.error``."""
    base = Path(runs_dir) / stage
    if not base.is_dir():
        return []
    return [load_run(p) for p in sorted(base.iterdir()) if p.is_dir()]


@contextmanager
def run_log(path: Path):
    """Copy ablate's and lm-eval's log records (INFO and up) and transformers' (at its own level) into the run's log."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("ablate", "lm_eval", "transformers")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    for lg in loggers[:2]:  # transformers' INFO would also reach its own console handler
        lg.setLevel(min(lg.level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
