"""`ablate bench-stage3`: packed vs padded stage 3 on the same rows: python -m pytest tests/test_bench_stage3.py -q

A tiny model, rows of uneven length (so padding exists), 2 steps, 2 runs of each. It reports both real-token
throughputs and their ratio, the losses of the two agree (the same objective), packing never pads more, and
--out holds the figures. Speed is measured by the benchmark, never asserted here.
"""

import json

import pytest

from ablate.cli import main

MASKS = ("causal", "prefill_bidir")


@pytest.fixture
def uneven_rows(tmp_path):
    """24 rows, half of about 20 tokens and half near --max-length 64: a batch pads the short rows to the long,
    packing puts two or three short rows in one sequence."""
    colors = ["red", "blue", "green", "yellow"]
    rows = [{"prompt": f"{'Ada has a box. ' * (7 if i % 2 == 0 else 1)}What color is the box?\nAnswer:",
             "response": " " + " and ".join(colors[: 1 + i % 4])} for i in range(24)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bench_stage3_compares_packed_with_padded(tiny_llama, uneven_rows, tmp_path, capsys):
    out = tmp_path / "bench-stage3.json"
    code = main(["bench-stage3", "--model", str(tiny_llama), "--data", str(uneven_rows), "--steps", "2",
                 "--repeats", "2", "--batch-size", "6", "--max-length", "64", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "padded tok/s" in printed and "packed tok/s" in printed and "ratio" in printed
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["repeats"] == 2 and result["pack_length"] is None
    assert result["row_attention"] and "each micro-batch packed into one sequence, attention per row" in printed
    assert set(result["masks"]) == set(MASKS)
    for mask in MASKS:
        figures = result["masks"][mask]
        assert mask in printed
        for mode in ("padded", "packed"):
            assert len(figures["seconds"][mode]) == 2  # alternating runs, each counted
            assert len(figures["losses"][mode]) == 2  # a loss per step
            assert figures["real_tokens_per_second"][mode] > 0
        speed = figures["real_tokens_per_second"]
        assert figures["ratio"] == pytest.approx(speed["packed"] / speed["padded"], rel=1e-2)
        assert figures["same_rows"]  # the same real tokens either way
        assert figures["losses_agree"] and figures["max_loss_difference"] <= 1e-4
        pad, fed = figures["padding_fraction"], figures["tokens_fed"]
        assert 0 < pad["padded"] and pad["packed"] <= pad["padded"]
        assert fed["packed"]["positions"] == fed["packed"]["real"] < fed["padded"]["positions"]  # no padding


BAD = {
    "--steps 0": (["--steps", "0"], "--steps must be at least 1"),
    "--repeats 0": (["--repeats", "0"], "--repeats must be at least 1"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "unknown mask": (["--mask", "causal,bogus"], "unknown mask 'bogus'"),
    "a mask twice": (["--mask", "causal,causal"], "names a mask twice"),
    "no mask": (["--mask", ","], "names no mask"),
    "pack length under max length": (["--pack-length", "32", "--max-length", "64"], "--pack-length 32 is shorter"),
    "unknown dtype": (["--dtype", "float8"], "unknown dtype 'float8'"),
    "missing data": (["--data", "/no/such/rows.jsonl"], "--data file not found"),
    "steps not a number": (["--steps", "many"], "Invalid value for '--steps'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_flags_are_one_line_exit_2(case, tiny_llama, uneven_rows, tmp_path, capsys):
    flags, message = BAD[case]
    argv = ["bench-stage3", "--model", str(tiny_llama), "--data", str(uneven_rows), "--device", "cpu",
            "--out", str(tmp_path / "never.json"), *flags]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"{case}: exit {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate: error:") and message in lines[0], err
    assert not (tmp_path / "never.json").exists()


def test_a_bad_flag_is_refused_before_the_demo_rows_or_model_are_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where smollm2 and the demo's rows would go
    assert main(["bench-stage3", "--steps", "0", "--device", "cpu"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
