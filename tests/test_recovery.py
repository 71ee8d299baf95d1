"""Recovery arithmetic against hand-computed numbers: python -m pytest tests/test_recovery.py -q"""

import numpy as np
import pytest

from ablate.recovery import macro_recovery, mcnemar, ratios, task_recovery


def test_ratios_by_hand():
    # study-like numbers: s1=0.70, s2=0.35, s4=0.56, chance 0.25
    r = ratios(0.70, 0.35, 0.56, 0.25)
    assert r["retention"] == pytest.approx(0.8)
    assert r["gap_closed"] == pytest.approx(0.6)  # (0.56-0.35)/(0.70-0.35) = 0.21/0.35
    assert r["above_chance_retention"] == pytest.approx(0.31 / 0.45)


def test_zero_and_tiny_gaps_are_undefined_not_huge():
    r = ratios(0.50, 0.50, 0.60, 0.50)
    assert r["gap_closed"] is None and r["above_chance_retention"] is None
    assert r["retention"] == pytest.approx(1.2)
    assert ratios(0.504, 0.50, 0.9, 0.25)["gap_closed"] is None  # gap of 0.004 < one accuracy point
    assert ratios(0.0, 0.0, 0.3, 0.25)["retention"] is None


def test_mcnemar_exact():
    before = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    after = np.array([1, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=bool)
    # discordant: lost 1 (index 1), gained 4 (3..6); p = 2 * P(X<=1 | n=5) = 2 * 6/32
    assert mcnemar(before, after) == {"lost": 1, "gained": 4, "p_value": pytest.approx(0.375)}
    assert mcnemar(before, before)["p_value"] == 1.0


def test_task_recovery_point_values_and_intervals():
    c1 = np.array([1] * 8 + [0] * 2)  # 0.8
    c2 = np.array([1] * 4 + [0] * 6)  # 0.4
    c4 = np.array([1] * 7 + [0] * 3)  # 0.7
    r = task_recovery(c1, c2, c4, chance=0.5, seed=0)
    assert r["acc_stage1"] == 0.8 and r["acc_stage2"] == 0.4 and r["acc_stage4"] == 0.7
    assert r["retention"] == pytest.approx(0.875)
    assert r["gap_closed"] == pytest.approx(0.75)
    assert r["above_chance_retention"] == pytest.approx(0.2 / 0.3)
    lo, hi = r["retention_ci95"]
    assert lo < 0.875 < hi
    assert r["vs_stage2"]["gained"] == 3 and r["vs_stage2"]["lost"] == 0
    assert task_recovery(c1, c2, c4, chance=0.5, seed=0) == r  # seeded


def test_interval_is_undefined_when_the_gap_is_zero():
    c = np.array([1, 0] * 10)
    r = task_recovery(c, c, c, chance=0.25)
    assert r["gap_closed"] is None and r["gap_closed_ci95"] is None
    assert r["retention"] == pytest.approx(1.0)


def test_macro_recovery_averages_tasks():
    a = (np.array([1, 1, 1, 1]), np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0]))
    b = (np.array([1, 1, 0, 0]), np.array([0, 0, 0, 0]), np.array([1, 0, 0, 0]))
    per = {"a": task_recovery(*a, chance=0.5), "b": task_recovery(*b, chance=0.25)}
    m = macro_recovery(per, {"a": a, "b": b})
    assert m["acc_stage1"] == pytest.approx(0.75) and m["acc_stage2"] == pytest.approx(0.25)
    assert m["acc_stage4"] == pytest.approx(0.5)
    assert m["gap_closed"] == pytest.approx(0.5) and m["retention"] == pytest.approx(2 / 3)
    assert m["chance"] == pytest.approx(0.375)
    assert m["vs_stage2"] == {"lost": 1, "gained": 3, "p_value": pytest.approx(0.625)}
