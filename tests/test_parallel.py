"""Data-parallel evaluation on the existing engine: python -m pytest tests/test_parallel.py -q

Two CPU processes under torchrun (what `accelerate launch --multi_gpu` does on GPUs) split the
documents the way lm-eval's own data-parallel mode does; rank 0 writes one run whose per-document
results equal a one-process run's.
"""

import json
import subprocess
import sys
from pathlib import Path

from ablate.core.tasks import FIXTURE_DATA

ARGS = ["stage2", "--mask", "prefill_bidir", "--tasks", "ablate_tiny,piqa", "--task-data",
        f"piqa={FIXTURE_DATA['piqa']}", "--device", "cpu", "--batch-size", "4"]


def run(tmp_path, model, name, launcher):
    runs = tmp_path / name
    proc = subprocess.run([*launcher, "-m", "ablate", *ARGS, "--model", str(model), "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (runs / "stage2_ablation_eval").iterdir()
    return proc, run_dir


def rows(run_dir: Path, task: str):
    return [json.loads(line) for line in (run_dir / f"samples_{task}.jsonl").read_text().splitlines()]


def test_two_processes_equal_one(tiny_llama, tmp_path):
    one_proc, one = run(tmp_path, tiny_llama, "one", [sys.executable])
    two_proc, two = run(tmp_path, tiny_llama, "two", [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", "2"])
    # Each process scored half of the 24 + 8 documents' 112 requests; rank 0 alone printed the run.
    assert two_proc.stderr.count("Tokenizing inputs: 100%") == 2 and "56/56" in two_proc.stderr
    assert two_proc.stdout.count("run directory:") == 1
    for task in ("ablate_tiny", "piqa"):
        a, b = rows(one, task), rows(two, task)
        assert [r["doc_id"] for r in a] == [r["doc_id"] for r in b]
        assert [r["pred"] for r in a] == [r["pred"] for r in b]
        assert max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r["logprobs"], s["logprobs"])) < 1e-5
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["macro"] == m2["macro"]
    for task, metrics in m1["tasks"].items():  # stderr sums the gathered documents in another order
        def rounded(values):
            return {k: round(v, 12) if isinstance(v, float) else v for k, v in values.items()}

        assert rounded(metrics) == rounded(m2["tasks"][task])
