"""``ablate sweep``: stage 2 under several layer specs, the model loaded once, one stage 1 baseline for all.

    ablate tiny-model --out /tmp/tiny && ablate stage1 --model /tmp/tiny --tasks ablate_tiny --device cpu && \
    ablate sweep --model /tmp/tiny --tasks ablate_tiny --device cpu --blocks 1 --layers all

Each spec (``--layers`` as ``--mask-layers`` reads it, repeatable, plus ``--blocks K``: each block of K layers in
turn) is an ordinary stage 2 run in ``runs/``, compared with the same stage 1 run (named explicitly as each run's
baseline, so every spec is paired with the same documents and the same baseline). The specs are resolved on the
loaded model before any run folder exists; two specs naming the same layers are refused. The table and the plot
read each run's verified metrics (``ablate.results.verified``): the stage 2 minus stage 1 difference with its
paired 95% interval and exact McNemar test, per spec.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ablate.core import layer_masks
from ablate.errors import BadInput
from ablate.results import rundir
from ablate.results.rundir import STAGE2
from ablate.stages.config import EvalConfig

log = logging.getLogger(__name__)


def block_specs(blocks: int, layers: int) -> list[str]:
    """Each block of ``blocks`` consecutive layers, the last one shorter if ``layers`` is not a multiple."""
    if blocks < 1:
        raise BadInput(f"--blocks must be at least 1 layer, got {blocks}")
    return [f"{a}-{min(a + blocks, layers) - 1}" if blocks > 1 and a < layers - 1 else str(a)
            for a in range(0, layers, blocks)]


def run_sweep(config: EvalConfig, specs: list[str], blocks: int | None = None, echo=log.info) -> dict:
    """The sweep's stage 2 runs and their figures: ``{"stage1": path, "num_layers": n, "runs": [{spec, layers,
    run, acc, paired}]}``. Raises BadInput before any run when a spec, the baseline or the inputs are wrong."""
    from ablate.core.models import load_model, resolve_device
    from ablate.results.verified import verified
    from ablate.stages.evaluation import prepare
    from ablate.stages.stage2_ablation_eval import find_baseline, run_stage2

    if config.mask == "causal":
        raise BadInput("a layer sweep needs a mask other than causal (--mask prefill_bidir)")
    if blocks is not None and blocks < 1:
        raise BadInput(f"--blocks must be at least 1 layer, got {blocks}")
    if not specs and not blocks:
        raise BadInput("nothing to sweep: give --layers SPEC (repeatable) and/or --blocks K")
    for spec in specs:
        dataclasses.replace(config, mask_layers=spec)  # each spec's syntax, before anything loads
    device = resolve_device(config.device)
    inputs = prepare(config, device)  # the tasks, built once; the layers are not part of the comparison
    baseline = find_baseline(config, inputs.key)
    if baseline.get("run") is None:
        raise BadInput(f"a layer sweep compares each spec with stage 1: {baseline['reason']}; run `ablate stage1` "
                       "with the same settings first")
    stage1 = baseline["run"].path
    model, tokenizer = load_model(config.model, device, config.dtype, config.attn_implementation)
    n = layer_masks.num_layers(model.config)
    specs = list(specs) + (block_specs(blocks, n) if blocks else [])
    resolved = [layer_masks.check_spec(spec, model) for spec in specs]
    seen: dict = {}
    for spec, layers in zip(specs, resolved):
        if layers in seen:
            raise BadInput(f"--layers {spec} names the same layers as {seen[layers]} "
                           f"({layer_masks.describe(layers)}); sweep each set once")
        seen[layers] = spec
    out = {"stage1": str(stage1), "num_layers": n, "mask": config.mask, "runs": []}
    for i, (spec, layers) in enumerate(zip(specs, resolved), 1):
        canonical = layer_masks.describe(layers)
        echo(f"sweep {i}/{len(specs)}: {config.mask} in layers {canonical}")
        run_config = dataclasses.replace(config, stage=STAGE2, mask_layers=canonical, baseline=str(stage1))
        path = run_stage2(run_config, dataclasses.replace(inputs, config=run_config), loaded=(model, tokenizer))
        if path is None:  # a rank > 0 of `accelerate launch`
            continue
        metrics = verified(rundir.load_run(path), Path(config.runs_dir)).metrics  # as a reader shows it
        paired = (metrics.get("baseline") or {}).get("paired", {}).get("macro")
        out["runs"].append({"spec": spec, "layers": canonical, "count": len(layers), "run": str(path),
                            "status": metrics["status"], "acc": metrics["macro"]["acc"], "paired": paired})
    return out


def render(result: dict) -> str:
    """The sweep's table: per spec, stage 2's accuracy and its paired difference from stage 1."""
    lines = [f"layer sweep of {result['mask']} over {result['num_layers']} layers; stage 1: {result['stage1']}",
             f"{'layers':<16}{'n':>4}{'stage 2':>9}{'- stage 1':>11}  {'95% paired CI':<18}{'McNemar p':>10}  verdict"]
    for r in result["runs"]:
        p = r["paired"]
        if p is None:
            lines.append(f"{r['layers']:<16}{r['count']:>4}{r['acc']:>9.3f}  (no paired comparison)")
            continue
        lo, hi = p["delta_ci95"]
        verdict = ("drop established" if p["delta_excludes_0"] and p["delta"] < 0 else
                   "gain established" if p["delta_excludes_0"] else "not established")
        lines.append(f"{r['layers']:<16}{r['count']:>4}{r['acc']:>9.3f}{p['delta']:>+11.3f}  "
                     f"[{lo:+.3f}, {hi:+.3f}] {p['mcnemar']['p_value']:>10.3g}  {verdict}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """The difference from stage 1 per spec with its paired 95% interval, one bar each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["paired"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(runs) + 2), 3.2))
    x = range(len(runs))
    deltas = [r["paired"]["delta"] for r in runs]
    errors = [[d - r["paired"]["delta_ci95"][0] for d, r in zip(deltas, runs)],
              [r["paired"]["delta_ci95"][1] - d for d, r in zip(deltas, runs)]]
    ax.bar(x, deltas, yerr=errors, capsize=3, color="#4C72B0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), [r["layers"] for r in runs], rotation=45, ha="right")
    ax.set_xlabel(f"layers under {result['mask']} (causal elsewhere)")
    ax.set_ylabel("stage 2 - stage 1 accuracy")
    ax.set_title(f"accuracy change per layer set, 95% paired intervals ({result['num_layers']} layers)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
