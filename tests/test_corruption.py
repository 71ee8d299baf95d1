"""Every file of every run x a corruption, read by every consumer: python -m pytest tests/test_corruption.py -q

One completed tiny study (stages 1-4) is built once. Each run file gets each
corruption in turn: deleted, truncated, garbage bytes, swapped with the same
file of another run, and "number edited": every numeric leaf of every JSON file
(and of the first and last row of every JSONL file) edited, one at a time
(x + 1, x * 1.5 + 0.1, a bool flipped). Each consumer then either refuses or
names the damaged run, or gives exactly the clean study's output:

- STATUS.md, the report's text and `ablate aggregate`, for every case; the full
  report with its plot (`ablate report`) for a garbled and a number-edited
  results file of each run.
  A result line (a STATUS.md bullet, a report table row, an aggregate line) that
  is not one of the clean study's must name damage: no wrong number is shown.
- stage 2's baseline (``find_baseline`` + ``baseline_block``) against a
  corrupted stage 1 run, for every case of the files it reads; a real
  ``ablate stage2`` for a few.
- ``ablate stage4`` against corrupted stage 1, 2 and 3 runs, and
  ``ablate stage3 --resume`` of a crashed run with corrupted files: the files
  each reads, structural corruptions and one number edit each.

A number edit nobody reads (a timing, a heartbeat) leaves the outputs identical,
which is a pass. The whole file takes about a minute on 2 cores; the study and
the crashed run are built side by side.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.results import aggregate, report, rundir
from ablate.results.samples import LEAKS
from ablate.results.status import collect, render
from ablate.stages.config import load_eval_config, load_finetune_config
from ablate.stages.stage1_baseline_eval import run_stage1
from ablate.stages.stage2_ablation_eval import run_stage2
from ablate.stages.stage3_finetune import run_stage3
from ablate.stages.stage4_post_ft_eval import Stage4Config, run_stage4

DATA = Path(__file__).parent / "data" / "sft.jsonl"
STRUCTURAL = ("deleted", "truncated", "garbage", "swapped")
READ = (".json", ".jsonl", ".txt")  # what the consumers read; weights and logs are other consumers'
SAYS = ("damaged", "unreadable", "no readable", "is **", "missing")  # how a line names a run's damage


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """A cache folder of this module's own (file digests, lm-eval's task index): the digests of thousands of
    earlier runs' files in ~/.cache would be rewritten at every fingerprint, and none is left behind there."""
    import os

    from ablate.core.assets import cache_root

    mine = tmp_path_factory.mktemp("cache")
    for index in cache_root().glob("lm_eval-*-task-folders.json"):
        (mine / "ablate").mkdir(exist_ok=True)
        shutil.copy(index, mine / "ablate" / index.name)
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(mine)
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="module")
def crash(tiny_models, tmp_path_factory):
    """A stage 3 run killed (SIGKILL) during its final evaluation, after its last checkpoint, started in a process
    of its own while the study is built."""
    import os
    import subprocess
    import sys

    runs = tmp_path_factory.mktemp("crashed") / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "ablate", "stage3", "--mask", "causal", "--model",
                             str(tiny_models("llama")), "--data", str(DATA), "--device", "cpu", "--max-steps", "2",
                             "--save-steps", "2", "--warmup-steps", "0", "--max-length", "64", "--runs-dir", str(runs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ABLATE_FAULT_KILL_AT": "eval"})
    yield runs, proc
    proc.kill()


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory, crash):
    runs = tmp_path_factory.mktemp("clean") / "runs"
    model = str(tiny_models("llama"))
    evals = dict(model=model, tasks="ablate_tiny", device="cpu", runs_dir=str(runs), limit=8)
    run_stage1(load_eval_config(rundir.STAGE1, evals))
    run_stage2(load_eval_config(rundir.STAGE2, {**evals, "mask": "prefill_bidir"}))
    ft = dict(model=model, data=str(DATA), device="cpu", runs_dir=str(runs), max_steps=2, warmup_steps=0,
              save_steps=100, learning_rate=1e-3, max_length=64)
    for mask in ("causal", "prefill_bidir"):
        run_stage3(load_finetune_config({**ft, "mask": mask}))
    run_stage4(Stage4Config(device="cpu", runs_dir=str(runs)))
    return runs


# ---------------------------------------------------------------- the corruptions

def edited(value):
    """A number changed the way a hand edit would: a bool flipped, an int + 1, a float * 1.5 + 0.1."""
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else value * 1.5 + 0.1


def leaves(data, at=()):
    """Paths to every numeric leaf (bools included) of a JSON value."""
    if isinstance(data, (bool, int, float)):
        yield at
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, (*at, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from leaves(value, (*at, i))


def with_edit(data, path):
    data = json.loads(json.dumps(data))
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = edited(holder[path[-1]])
    return data


def number_edits(path: Path):
    """``(label, bytes)`` for each numeric leaf of a JSON file (and of a JSONL file's first and last rows),
    written the way ablate writes the file, so that only the number differs."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return
        for at in leaves(data):
            yield f"number {'.'.join(map(str, at))}", (json.dumps(with_edit(data, at), indent=2) + "\n").encode()
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for i in sorted({0, len(rows) - 1}):
            for at in leaves(rows[i]):
                changed = [*rows[:i], with_edit(rows[i], at), *rows[i + 1:]]
                yield f"number row {i} {'.'.join(map(str, at))}", "".join(json.dumps(r) + "\n" for r in changed).encode()


def structural(path: Path, how: str, runs: Path, swap_from: Path | None = None) -> bytes | None:
    data = path.read_bytes()
    if how == "deleted":
        return None
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "garbage":
        return b"\x00\xff garbage \xfe" * 7
    # swapped: the same file of another run of another stage, where there is one
    others = [p for p in sorted((swap_from or runs).rglob(path.name)) if p.parent.parent != path.parent.parent
              and "checkpoints" not in p.parts]
    return others[0].read_bytes() if others else b"{}"


def run_files(runs: Path, under: Path | None = None) -> list[Path]:
    return sorted(p for p in (under or runs).rglob("*") if p.is_file() and p.suffix in READ
                  and "checkpoints" not in p.parts and "final" not in p.parts and not p.name.startswith("."))


def cases(runs: Path, files: list[Path], numbers: str = "every", swap_from: Path | None = None):
    """``(file, label, new bytes or None for deleted)``; ``numbers``: every numeric leaf, or only the first;
    ``swap_from``: the runs folder a swapped file comes from (``runs``)."""
    for path in files:
        for how in STRUCTURAL:
            yield path, how, structural(path, how, runs, swap_from)
        for i, (label, data) in enumerate(number_edits(path)):
            if numbers == "every" or i == 0:
                yield path, label, data


class corrupted:
    """Apply one case in place for the length of a ``with`` block; the file's bytes come back after."""

    def __init__(self, path: Path, data: bytes | None):
        self.path, self.data, self.original = path, data, path.read_bytes()

    def __enter__(self):
        self.path.unlink() if self.data is None else self.path.write_bytes(self.data)

    def __exit__(self, *exc):
        self.path.write_bytes(self.original)


def run_of(path: Path, runs: Path) -> str:
    rel = path.relative_to(runs)
    return str(Path("RUNS") / rel.parts[0] / rel.parts[1])


def names(text: str, run: str) -> bool:
    return any(run in line and any(w in line for w in SAYS) for line in text.splitlines())


# ---------------------------------------------------------------- STATUS.md, the report, aggregate

def outputs(runs: Path, image: Path | None = None) -> dict[str, str]:
    """STATUS.md, the report's text and aggregate's, from one reading of the runs; paths as RUNS."""
    stages = collect(runs)
    damaged: list[str] = []
    texts = {"status": render(runs, stages), "report": report.render(runs, image, stages),
             "aggregate": aggregate.render(aggregate.aggregate(runs, damaged, stages=stages), damaged)}
    return {k: v.replace(str(runs), "RUNS") for k, v in texts.items()}


def result_lines(name: str, text: str) -> list[str]:
    """The lines that carry numbers: STATUS.md's result bullets, the report's table rows, aggregate's lines."""
    lines = [line for line in text.splitlines()
             if re.search(r"\d", re.sub(r"RUNS/\S*|[Ss]tage \d[AB]?|95%", "", line))]
    if name == "status":
        section, out = "", []
        for line in lines:
            section = line if line.startswith("## ") else section
            if line.startswith("- ") and (section.startswith("## Key Results") or section in (
                    "## Stage 3 Outcomes", "## Stage 4 Recovery", "## Provenance")):
                out.append(line)
        return out
    if name == "report":
        return [line for line in lines if line.startswith("| ")]
    return lines


def check(clean: dict, got: dict, run: str, case: str) -> None:
    named = names(got["status"], run)
    assert got["status"] == clean["status"] or named, f"{case}: STATUS.md changed without naming {run}"
    assert got["report"] == clean["report"] or names(got["report"], run) or named, f"{case}: report changed silently"
    assert got["aggregate"] == clean["aggregate"] or names(got["aggregate"], run) or named, \
        f"{case}: aggregate changed silently"
    for name, text in got.items():  # no number that the clean study does not show, whatever else is said
        known = set(result_lines(name, clean[name]))
        wrong = [line for line in result_lines(name, text) if line not in known and not any(w in line for w in SAYS)]
        assert not wrong, f"{case}: {name} shows {wrong[0]!r}, not a clean result"


def test_status_report_and_aggregate_never_show_a_wrong_number(study):
    clean = outputs(study)
    assert "damaged" not in clean["status"] and "damaged" not in clean["report"] + clean["aggregate"]
    checked = 0
    for path, how, data in cases(study, run_files(study)):
        with corrupted(path, data):
            got = outputs(study)
        check(clean, got, run_of(path, study), f"{how} {path.relative_to(study)}")
        checked += 1
    assert checked >= 600, checked  # six runs: ~50 files each way, ~400 numbers


def test_the_full_report_and_its_plot_name_damaged_results(study, tmp_path):
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--runs-dir", str(study), "--out", str(out)]) == 0
    clean = out.read_text().replace(str(study), "RUNS")
    for path in run_files(study):
        if path.name not in ("metrics.json", "summary.json"):
            continue
        for how in ("garbage", "number"):
            data = structural(path, how, study) if how != "number" else next(number_edits(path))[1]
            with corrupted(path, data):
                assert main(["report", "--runs-dir", str(study), "--out", str(out)]) == 0
            text = out.read_text().replace(str(study), "RUNS")
            assert text == clean or names(text, run_of(path, study)), f"{how} {path}: report changed silently"


def test_the_torch_free_mask_table_agrees_with_the_registry():
    from ablate.core.masks import MASKS

    # The package's own masks; a mask from a file carries its verdict in its run's config.json (test_user_masks).
    assert LEAKS == {name: spec.leaks_labels for name, spec in MASKS.items() if spec.source is None}


# ---------------------------------------------------------------- stage 2's baseline

def stage1_files(runs: Path) -> list[Path]:
    return run_files(runs, next((runs / rundir.STAGE1).iterdir()))


def test_stage2_compares_with_a_corrupted_stage1_only_by_refusing(study, capsys):
    from ablate.errors import BadInput
    from ablate.results.recovery import baseline_block
    from ablate.stages.stage2_ablation_eval import find_baseline

    s2 = rundir.find_runs(study, rundir.STAGE2)[-1]
    metrics = json.loads(json.dumps(s2.metrics))
    rows = {t: [json.loads(line) for line in (s2.path / f"samples_{t}.jsonl").read_text().splitlines()]
            for t in metrics["tasks"]}
    config = load_eval_config(rundir.STAGE2, dict(model=s2.config["model"], tasks="ablate_tiny", device="cpu",
                                                  runs_dir=str(study), limit=8, mask="prefill_bidir"))

    def baseline():
        try:
            return json.loads(json.dumps(baseline_block(metrics, find_baseline(config, metrics["comparison"]), rows)))
        except BadInput as exc:
            assert "\n" not in str(exc)
            return "refused"

    clean = baseline()
    assert clean == metrics["baseline"]
    for path, how, data in cases(study, stage1_files(study)):
        with corrupted(path, data):
            got = baseline()
        # refused, no comparison at all (a reason, no number), or the clean one
        assert got == "refused" or got["run"] is None or got == clean, f"{how} {path.relative_to(study)}"
    # the real command: one line, exit 2, no stage 2 run
    for path, data in [(p, next(number_edits(p))[1]) for p in stage1_files(study) if p.name == "metrics.json"] + [
            (p, structural(p, "truncated", study)) for p in stage1_files(study) if p.name.startswith("samples_")]:
        before = set((study / rundir.STAGE2).iterdir())
        capsys.readouterr()
        with corrupted(path, data):
            code = main(["stage2", "--model", s2.config["model"], "--tasks", "ablate_tiny", "--mask", "prefill_bidir",
                         "--limit", "8", "--device", "cpu", "--runs-dir", str(study)])
        err = capsys.readouterr().err.strip()
        made = set((study / rundir.STAGE2).iterdir()) - before
        for new in made:
            shutil.rmtree(new)  # the study stays clean for the other tests
        assert code == 2 and len(err.splitlines()) == 1 and str(path.parent) in err and not made, err


# ---------------------------------------------------------------- stage 4

VOLATILE = {"run_id", "timing", "files", "wall_seconds", "mask_check", "oom_retries", "peak_memory"}


def numbers(value):
    """A stage's results without what differs between two identical runs (timings, its own id, file digests)."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


def stage4_inputs(runs: Path) -> list[Path]:
    return [p for stage in (rundir.STAGE1, rundir.STAGE2, rundir.STAGE3_PREFIX + "causal",
                            rundir.STAGE3_PREFIX + "prefill_bidir") for p in run_files(runs, runs / stage)
            if p.name not in ("history.jsonl", "process.json")]  # a completed run's writer records: not read


def test_stage4_on_corrupted_stage1_2_3_runs_refuses_or_gives_the_clean_result(study, capsys):
    s4 = rundir.find_runs(study, rundir.STAGE4)[-1]
    clean = numbers(s4.metrics)
    full = 0
    for path, how, data in cases(study, stage4_inputs(study), numbers="first"):
        if data == path.read_bytes():
            continue  # the same bytes (a status.txt swapped with another run's): no corruption
        before = set((study / rundir.STAGE4).iterdir())
        capsys.readouterr()
        with corrupted(path, data):
            code = main(["stage4", "--device", "cpu", "--runs-dir", str(study)])
        err = capsys.readouterr().err.strip()
        made = set((study / rundir.STAGE4).iterdir()) - before
        case = f"{how} {path.relative_to(study)}"
        if code == 2:
            assert len(err.splitlines()) == 1 and not made, f"{case}: {err}"
        else:
            full += 1
            assert code == 0 and len(made) == 1, f"{case}: exit {code}: {err[-2000:]}"
            (new,) = made
            got = numbers(json.loads((new / "metrics.json").read_text()))
            shutil.rmtree(new)
            assert got == clean, f"{case}: stage 4 gave other results"
    print(f"stage 4: {full} full runs")


# ---------------------------------------------------------------- stage 3 --resume

RESUMED = ("status", "mask", "leaky", "global_step", "train_loss", "eval_loss", "grad_norm", "probe")
RESUME_READS = ("status.txt", "run.json", "process.json", "config.json", "history.jsonl", "train_log.jsonl")


@pytest.fixture(scope="module")
def crashed(crash):
    """The crashed stage 3 run: what `ablate stage3 --resume` continues."""
    runs, proc = crash
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-2000:]
    (path,) = (runs / (rundir.STAGE3_PREFIX + "causal")).iterdir()
    assert rundir.load_run(path).status == rundir.CRASHED
    return path


def resumed(crashed_run: Path, where: Path, corrupt=None) -> tuple[int, str, dict | None]:
    """``ablate stage3 --resume`` of a fresh copy of the crashed run (``corrupt(copy)`` applied first)."""
    from ablate.results.verified import verified_run

    copy = where / "runs" / crashed_run.parent.name / crashed_run.name
    shutil.copytree(crashed_run, copy)
    if corrupt:
        corrupt(copy)
    code = main(["stage3", "--resume", "--run-dir", str(copy)])
    run = rundir.load_run(copy)
    if code != 0:
        return code, "", None
    checked = verified_run(run, copy.parent.parent)
    assert not checked.error, checked.error  # what it wrote verifies: status shows its numbers
    return code, "", {**{k: run.summary[k] for k in RESUMED}, "weights": run.summary["save"]["fingerprint"]}


def test_resume_of_a_crashed_run_with_corrupted_files_refuses_or_gives_the_clean_result(crashed, study, tmp_path,
                                                                                       capsys):
    code, _, clean = resumed(crashed, tmp_path / "clean")
    assert code == 0 and clean["status"] == "completed"
    files = [crashed / name for name in RESUME_READS]
    assert all(p.is_file() for p in files)
    full, seen = 0, []
    for i, (path, how, data) in enumerate(cases(crashed.parent.parent, files, numbers="first", swap_from=study)):
        if data == path.read_bytes():
            continue

        def corrupt(copy, name=path.name, data=data):
            (copy / name).unlink() if data is None else (copy / name).write_bytes(data)

        capsys.readouterr()
        code, _, got = resumed(crashed, tmp_path / str(i), corrupt)
        err = capsys.readouterr().err.strip()
        case = f"{how} {path.name}"
        seen.append(f"{case}: exit {code} {err.splitlines()[-1][:160] if code == 2 else ''}")
        if code == 2:
            assert len(err.splitlines()) == 1, f"{case}: {err}"
        else:
            full += 1
            assert code == 0 and got == clean, f"{case}: exit {code}, other results: {err[-3000:]}"
    print("\n".join(seen) + f"\nresume: {full} full resumes")
