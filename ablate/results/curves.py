"""Stage 3's training curves: train loss, eval loss and grad norm against steps, every run, one PNG.

    ablate report --runs-dir runs --out docs/RESULTS.md    # writes docs/RESULTS_curves.png beside it

Read from each stage 3 run's ``train_log.jsonl`` (one row per Trainer log call; the Trainer's
own integrations, ``--report-to tensorboard,wandb``, get the same numbers). The study diagnosed its
degenerate objective from curves like these: an implausibly low early loss under the leaking mask and
grad norms spiking to ~102. A diverged, gated, crashed or leaky run is drawn too and says so in its label.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ablate.results import rundir
from ablate.results.rundir import STAGE3_PREFIX

PANELS = (("loss", "train loss"), ("eval_loss", "eval loss (held out)"), ("grad_norm", "grad norm (before clipping)"))


def read_log(run: rundir.Run) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(step, value)]`` of one run's train_log.jsonl; unreadable lines and non-finite values are skipped."""
    out: dict[str, list[tuple[int, float]]] = {key: [] for key, _ in PANELS}
    try:
        lines = (run.path / "train_log.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key in out:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[key].append((step, float(value)))
    # The last value per step: the eval after the last step can repeat the periodic one at that step.
    return {key: sorted(dict(points).items()) for key, points in out.items()}


def label(run: rundir.Run) -> str:
    s = run.summary or {}
    mask = s.get("mask") or run.stage.removeprefix(STAGE3_PREFIX)
    notes = [str(run.status)] if run.status != rundir.COMPLETED else []
    notes += ["LEAKY"] if s.get("leaky") else []
    return f"{mask} {run.run_id}" + (f" ({', '.join(notes)})" if notes else "")


def plot_curves(runs_dir: Path, path: Path) -> list[str]:
    """Draw every stage 3 run's curves into ``path``; the labels drawn (empty, and no file, when none logged)."""
    runs = [r for stage in rundir.stages_with_prefix(Path(runs_dir), STAGE3_PREFIX)
            for r in rundir.find_runs(Path(runs_dir), stage)]
    logs = [(label(r), read_log(r)) for r in runs]
    logs = [(name, log) for name, log in logs if any(log.values())]
    if not logs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 3.8), sharex=True)  # one eval point too
    for ax, (key, title) in zip(axes, PANELS):
        for i, (name, log) in enumerate(logs):
            points = log[key]
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 20 else None,
                        markersize=3, linewidth=1.2, label=name, color=plt.get_cmap("tab10").colors[i % 10])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if key == "grad_norm":
            ax.set_yscale("log")  # a spike of ~100 beside norms of ~1 stays readable
        if not any(log[key] for _, log in logs):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from ablate.results.files import write_bytes
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())  # atomic, and never onto a symlink
    return [name for name, _ in logs]
