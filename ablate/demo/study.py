"""The demo's one driver: each demo's settings written as a study file and run by ``ablate study``'s function.

    ablate demo --preset smoke --workdir /tmp/d
    ablate study --config /tmp/d/world-smoke-seed0/study.yaml    # the same study again: every stage is reused

Both demos (``real.py``, ``run.py``) build their data and model, then call ``run_demo_study`` with the values
each stage runs with. It writes them as ``study.yaml`` beside the data (what a researcher reads and reruns)
and runs it with ``ablate.stages.study.run_study``: stage 1 -> 2 -> 3 (both masks) -> 4 -> report -> status,
reusing every stage whose completed run matches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from ablate.results.files import write_text
from ablate.results.rundir import STAGE1, STAGE2, STAGE4

# run_study's stage names -> the demo's keys (the closing summary, demo-<preset>-seed<N>.json).
KEYS = {STAGE1: "stage1", STAGE2: "stage2", "stage3_finetune_causal": "stage3_causal",
        "stage3_finetune_prefill_bidir": "stage3_prefill_bidir", STAGE4: "stage4"}


def write_study_file(path: Path, values: dict, about: list[str]) -> Path:
    """``values`` as a study YAML (``ablate.stages.study_file``), ``about`` as its opening comment lines."""
    header = "".join(f"# {line}\n" for line in [*about, f"Rerun (completed stages are reused): "
                                                          f"ablate study --config {path}"])
    write_text(Path(path), header + yaml.safe_dump(values, sort_keys=False, width=120))
    return Path(path)


def run_demo_study(path: Path, values: dict, about: list[str], echo: Callable[[str], None]) -> dict:
    """Write the study file and run it; returns the demo's keys, each stage's wall time and how it was had."""
    from ablate.stages.study import run_study

    write_study_file(path, values, about)
    echo(f"\n== the study: {path} ==")
    done = run_study(path, say=echo)
    out = {key: done[stage] for stage, key in KEYS.items()}

    def mask(stage: str) -> str:  # each label from the run it names
        return json.loads((done[stage] / "metrics.json").read_text())["mask"]

    labels = {STAGE1: "stage 1 (causal)", STAGE2: f"stage 2 ({mask(STAGE2)})", "stage3_finetune_causal":
              "stage 3 (causal)", "stage3_finetune_prefill_bidir": "stage 3 (prefill_bidir)",
              STAGE4: f"stage 4 ({mask(STAGE4)})"}
    out["stage_seconds"] = {labels[s]: done["seconds"][s] for s in KEYS}
    out["how"] = {labels[s]: done["how"][s] for s in KEYS}  # ran, reused or resumed
    out.update(study=Path(path), report=done["report"], plot=done["report"].with_name("RESULTS_accuracy.png"),
               status=done["status"])
    return out
