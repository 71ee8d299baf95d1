"""Probe gates: a stage YAML's ``gate: {metric: macro.acc, min: 0.40}`` marks a result ``gated``.

    python -c "from ablate.results.gates import check_gate; print(check_gate({'metric': 'macro.acc', 'min': 0.4}, {'macro': {'acc': 0.3}}))"

Later stages refuse to start from a gated run unless ``--ignore-gate``.
"""

from __future__ import annotations

from ablate.errors import BadInput
from ablate.results.rundir import GATED, Run


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


def refuse_gated(run: Run, ignore_gate: bool) -> None:
    """Later stages do not start from a gated run unless told to."""
    if run.status == GATED and not ignore_gate:
        raise BadInput(f"{run.path} is gated ({run.reason}); pass --ignore-gate to use it anyway")
