"""Run folders written by hand as ablate writes them, for the tests of what reads runs (STATUS.md, the report).

Every number is verified by its readers (``ablate.results.verified``), so a hand-made run carries what a real one
does: per-document samples with their digests, a stage 3 train log ending with the run's end record, and the
digests of config.json and env.json. The numbers are built with the stages' own functions.
"""

import hashlib
import json
import uuid
from pathlib import Path

from ablate.results import rundir
from ablate.results.files import write_json, write_jsonl
from ablate.results.samples import LEAKS, macro, mean_loss, record_files, task_metrics


def _folder(runs: Path, stage: str, run_id: str, status: str, reason: str, config: dict, created: float) -> Path:
    path = Path(runs) / stage / run_id
    path.mkdir(parents=True)
    write_json(path / rundir.RUN_FILE, {"uid": uuid.uuid4().hex, "stage": stage, "created": created, "name": run_id})
    write_json(path / "config.json", config)
    write_json(path / "env.json", {"git_sha": "0" * 40, "git_dirty": False, "hostname": "box"})
    rundir.set_status(path, status, reason)
    return path


def eval_run(runs: Path, stage: str, run_id: str, tasks: dict[str, tuple[int, int, int]], mask: str = "causal",
             status: str = "completed", baseline: Path | None = None, seed: int = 0, created: float = 0.0,
             comparison: dict | None = None, extra: dict | None = None) -> Path:
    """An evaluation run; ``tasks``: name -> (documents right, documents, choices per document). With
    ``baseline`` (a stage 1 run), stage 2's ``baseline`` block against it; ``extra``: more metrics fields."""
    from ablate.results.recovery import baseline_block
    from ablate.results.samples import verified_samples

    path = _folder(runs, stage, run_id, status, "", {"seed": seed, "mask": mask}, created)
    rows = {name: [{"doc_id": i, "target": 0, "logprobs": [0.0] * choices, "pred": 0 if i < right else 1,
                    "correct": i < right} for i in range(n)] for name, (right, n, choices) in tasks.items()}
    samples = {}
    for name, task_rows in rows.items():
        write_jsonl(path / f"samples_{name}.jsonl", task_rows)
        data = (path / f"samples_{name}.jsonl").read_bytes()
        samples[name] = {"file": f"samples_{name}.jsonl", "sha256": hashlib.sha256(data).hexdigest(),
                         "rows": len(task_rows)}
    per_task = {name: task_metrics({"acc,none": right / n}, rows[name]) for name, (right, n, _) in tasks.items()}
    metrics = {"stage": stage, "run_id": run_id, "status": status, "model": "m", "mask": mask,
               "leaky": LEAKS[mask], "seed": seed, "comparison": {"model": {"local": "m"}, "seed": seed,
                                                                  **(comparison or {})},
               "tasks": per_task, "macro": macro(per_task), "samples": samples, "files": record_files(path),
               **(extra or {})}
    if baseline is not None:
        s1 = rundir.load_run(baseline)
        metrics["baseline"] = baseline_block(metrics, {"run": s1, "correct": verified_samples(s1)}, rows)
    write_json(path / "metrics.json", metrics)
    return path


def stage3_run(runs: Path, mask: str, run_id: str, status: str = "completed", reason: str = "",
               losses=(1.4, 1.3), norms=(0.9, 3.1), eval_loss: float | None = 1.3752, probe=(1.1, 1.1),
               steps_per_second: float = 2.425, save: str | None = "raw_state_dict") -> Path:
    """A stage 3 run: one train log row per step, the end record, and the summary that caches them."""
    path = _folder(runs, rundir.STAGE3_PREFIX + mask, run_id, status, reason, {"seed": 0, "mask": mask}, 0.0)
    steps = [{"step": i + 1, "time": 0.0, "loss": loss, "grad_norm": norm} for i, (loss, norm) in
             enumerate(zip(losses, norms))]
    probe_block = {"before": None, "after": {"loss_mask": probe[0], "loss_causal": probe[1]}}
    end = {"eval_loss": eval_loss, "probe": probe_block, "train_steps_per_second": steps_per_second}
    write_jsonl(path / "train_log.jsonl", [*steps, {"step": len(steps), "time": 0.0, "end": end}])
    summary = {"stage": rundir.STAGE3_PREFIX + mask, "run_id": run_id, "status": status, "leaky": False,
               "mask": mask, "model_identity": {"local": "m"}, "train_loss": mean_loss(steps), **end,
               "grad_norm": {"last": norms[-1], "max": max(norms)},
               "leakage_guard": {"passed": True, "first_leak": None, "allowed_by_flag": False},
               "save": {"format": save} if save else None, "files": record_files(path)}
    write_json(path / "summary.json", summary)
    return path


def edit_json(path: Path, change) -> None:
    """Edit a run's JSON file in place, the way a hand edit would."""
    data = json.loads(Path(path).read_text())
    change(data)
    write_json(path, data)
