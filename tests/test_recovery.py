"""Recovery arithmetic against hand-computed numbers: python -m pytest tests/test_recovery.py -q"""

import numpy as np
import pytest

from ablate.results.recovery import macro_recovery, mcnemar, ratios, task_recovery


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
    # 0.8 on 10 two-choice documents does not establish being above chance (0.5): undefined, not 0.667
    assert r["above_chance_retention"] is None and "not established" in r["undefined"]["above_chance_retention"]
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


def test_a_one_document_gap_is_noise_not_a_ratio():
    # the demo's case: 60 documents, stage 2 lost one of stage 1's correct answers, stage 4 gained four
    c1 = np.array([1] * 13 + [0] * 47)
    c2 = np.array([1] * 12 + [0] * 48)
    c4 = np.array([1] * 17 + [0] * 43)
    r = task_recovery(c1, c2, c4, chance=0.25)
    assert ratios(13 / 60, 12 / 60, 17 / 60, 0.25)["gap_closed"] == pytest.approx(5.0)  # what naive arithmetic says
    assert r["gap_closed"] is None and r["gap_closed_ci95"] is None
    assert "not established" in r["undefined"]["gap_closed"]
    assert r["retention"] == pytest.approx(17 / 13) and r["retention_ci95"] is not None
    assert "above_chance_retention" in r["undefined"]  # 13/60 - 0.25 < 0: nothing above chance to retain


def test_paired_difference_by_hand():
    from ablate.results.recovery import paired_difference

    before = {"a": np.array([1] * 60 + [0] * 40), "b": np.array([1, 0] * 10)}
    after = {"a": np.array([1] * 40 + [0] * 60), "b": np.array([1, 0] * 10)}
    d = paired_difference(before, after, seed=0)
    a = d["tasks"]["a"]
    assert (a["before"], a["after"], a["delta"]) == (0.6, 0.4, pytest.approx(-0.2))
    assert a["mcnemar"]["lost"] == 20 and a["mcnemar"]["gained"] == 0 and a["mcnemar"]["p_value"] < 1e-5
    lo, hi = a["delta_ci95"]
    assert lo < -0.2 < hi < 0 and a["delta_excludes_0"]  # 20 of 100 documents lost, none gained
    assert a["ratio"] == pytest.approx(2 / 3) and a["ratio_ci95"][0] < 2 / 3 < a["ratio_ci95"][1]
    b = d["tasks"]["b"]
    assert b["delta"] == 0 and b["delta_ci95"] == [0.0, 0.0] and not b["delta_excludes_0"]  # identical answers
    m = d["macro"]
    assert m["delta"] == pytest.approx(-0.1) and m["n"] == 120 and m["mcnemar"]["lost"] == 20
    assert m["delta_ci95"][0] < -0.1 < m["delta_ci95"][1] < 0
    assert paired_difference(before, after, seed=0) == d
    with pytest.raises(ValueError, match="same ones"):
        paired_difference({"a": np.array([1, 0])}, {"a": np.array([1])})


def test_pairs_compare_every_two_trainings_with_one_model_each():
    from scipy.stats import false_discovery_control

    from ablate.results.recovery import head_to_head, pairs

    rng = np.random.default_rng(0)

    def entry(label, mask, layers=None):
        return {"label": label, "train_mask": mask,
                "train_mask_layers": None if layers is None else {"layers": layers, "num_layers": 30}}

    results = [entry("c", "causal"), entry("p", "prefill_bidir"), entry("l", "prefill_bidir", "0-9"),
               entry("s1", "segment_bidir"), entry("s2", "segment_bidir")]  # two of one training: left out
    correct = {e["label"]: {"t": {d: bool(rng.random() < 0.6 + 0.1 * i) for d in range(40)}}
               for i, e in enumerate(results)}
    block = pairs(results, correct)
    assert block["left_out"] == ["segment_bidir"]
    got = [(p["before_training"], p["after_training"]) for p in block["pairs"]]
    assert got == [("causal", "prefill_bidir"), ("causal", "prefill_bidir in layers 0-9 of 30"),
                   ("prefill_bidir", "prefill_bidir in layers 0-9 of 30")]  # causal first, then by name
    for p in block["pairs"]:
        before = np.mean(list(correct[p["before"]]["t"].values()))
        after = np.mean(list(correct[p["after"]]["t"].values()))
        assert (p["macro"]["before"], p["macro"]["after"]) == pytest.approx((before, after))
    q = false_discovery_control([p["macro"]["mcnemar"]["p_value"] for p in block["pairs"]])
    assert [p["macro"]["mcnemar"]["q_value"] for p in block["pairs"]] == pytest.approx(list(q))
    assert head_to_head(results, correct) is None  # not the one classic pair
    classic = pairs(results[:2], correct)["pairs"]
    assert len(classic) == 1 and classic[0]["tasks"] == head_to_head(results[:2], correct)["tasks"]
    assert pairs(results[3:], correct) == {"pairs": [], "left_out": ["segment_bidir"]}
