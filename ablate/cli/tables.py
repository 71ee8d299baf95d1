"""The result tables a stage command prints: stage 1/2 accuracy and stage 4 recovery.

    ablate stage2 --model /tmp/tiny --tasks ablate_tiny --mask prefill_bidir --device cpu   # ends with the table
"""

from __future__ import annotations

from ablate.results.finetuned import trained_with
from ablate.results.status import mask_name


def summary_table(metrics: dict) -> str:
    baseline = metrics.get("baseline") or {}
    lines = [f"{metrics['stage']}  model={metrics['model']}  mask={mask_name(metrics)}"]
    header = f"{'task':<16}{'acc':>9}{'stderr':>9}{'chance':>8}{'n':>7}"
    if baseline.get("run"):
        header += f"{'stage1':>9}{'delta':>9}{'retention':>10}"
    lines.append(header)

    def fmt(x, width, digits=4):
        return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'n/a':>{width}}"

    rows = list(metrics["tasks"].items()) + [("macro", metrics["macro"])]
    for name, t in rows:
        line = f"{name:<16}{fmt(t['acc'], 9)}{fmt(t.get('acc_stderr'), 9)}{fmt(t['chance'], 8, 3)}"
        line += f"{t.get('n', ''):>7}"
        if baseline.get("run"):
            b = baseline["macro"] if name == "macro" else baseline["tasks"][name]
            line += f"{fmt(b['acc_baseline'], 9)}{fmt(b['delta'], 9)}{fmt(b['retention'], 10, 3)}"
        lines.append(line)
    if baseline and not baseline.get("run"):
        lines.append(f"no stage 1 comparison: {baseline['reason']}")
    return "\n".join(lines)


def _num(x, digits=3):
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def _ci(pair):
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]" if pair else ""


def recovery_table(metrics: dict) -> str:
    lines = [f"stage 4 under {mask_name(metrics)}; stage 1: {metrics['stage1_run']}; "
             f"stage 2: {metrics['stage2_run'] or 'none (' + str(metrics['stage2_reason']) + ')'}"]
    for entry in metrics["checkpoints"]:
        checkpoint = (f"  [checkpoint at step {entry['step']} of a {entry['run_status']} run, not its final model]"
                      if entry["scored"] == "checkpoint" else "")
        trained = f"  [trained with {trained_with(entry)}]" if entry.get("train_mask_layers") else ""
        lines.append(f"\n{entry['label']}{trained}{'  [LEAKY]' if entry['leaky'] else ''}{checkpoint}")
        lines.append(f"{'task':<16}{'s1':>7}{'s2':>7}{'s4':>7}  {'retention':<22}{'gap_closed':<22}p(s4 vs s2)")
        rec = entry["recovery"]
        for name, r in [*rec["tasks"].items(), ("macro", rec["macro"])]:
            p = r["vs_stage2"]["p_value"] if r.get("vs_stage2") else None
            lines.append(f"{name:<16}{_num(r['acc_stage1']):>7}{_num(r['acc_stage2']):>7}{_num(r['acc_stage4']):>7}  "
                         f"{(_num(r['retention']) + ' ' + _ci(r['retention_ci95'])):<22}"
                         f"{(_num(r['gap_closed']) + ' ' + _ci(r['gap_closed_ci95'])):<22}{_num(p)}")
    return "\n".join(lines)


def study_table(m1: dict, m2: dict, m4: dict, seconds: dict[str, float]) -> str:
    """The real-model demo's closing summary: every accuracy with its interval, the two paired comparisons
    the study asks about, a plain verdict on each, and each stage's wall time."""
    from ablate.results.report import wilson

    def acc(task: dict) -> str:
        ci = wilson(task["acc"], task.get("n"))
        return f"{_num(task['acc'])} {_ci(ci)}" if ci else _num(task["acc"])

    def diff(r: dict) -> str:
        test = r["mcnemar"]
        return (f"{r['delta']:+.3f} [{r['delta_ci95'][0]:+.3f}, {r['delta_ci95'][1]:+.3f}], "
                f"McNemar p={test['p_value']:.3g} (+{test['gained']}/-{test['lost']} documents)")

    lines = []
    for task in m1["tasks"]:
        t1, t2 = m1["tasks"][task], m2["tasks"][task]
        lines += [f"task {task}: n={t1['n']}, chance {_num(t1['chance'])}; accuracy with its 95% Wilson interval",
                  f"  {'stage 1  causal':<54}{acc(t1)}", f"  {'stage 2  ' + mask_name(m2):<54}{acc(t2)}"]
        for entry in m4["checkpoints"]:
            what = "" if entry["scored"] == "final" else f" (checkpoint {entry['step']})"
            lines.append(f"  {'stage 4  finetuned ' + trained_with(entry) + what + ', read ' + mask_name(m4):<54}"
                         f"{acc(entry['tasks'][task])}")
        paired = ((m2.get("baseline") or {}).get("paired") or {}).get("tasks", {}).get(task)
        if paired:
            verdict = "the drop is established" if paired["delta"] < 0 and paired["delta_excludes_0"] else \
                "NO established drop"
            lines.append(f"  stage 2 - stage 1:\n    {diff(paired)}: {verdict} at 95%")
        h2h = ((m4.get("head_to_head") or {}).get("tasks") or {}).get(task)
        if h2h:
            if h2h["delta"] > 0 and h2h["delta_excludes_0"]:
                verdict = "finetuning with the mask beat causal finetuning"
            elif h2h["delta"] < 0 and h2h["delta_excludes_0"]:
                verdict = "causal finetuning beat finetuning with the mask"
            else:
                verdict = "no established difference between the two finetunes at this budget"
            after = next(e for e in m4["checkpoints"] if e["label"] == m4["head_to_head"]["after"])
            lines.append(f"  stage 4, {trained_with(after)}-finetuned - causal-finetuned, both read {mask_name(m4)}:\n"
                         f"    {diff(h2h)}: {verdict}")
    lines.append("wall time: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))
    return "\n".join(lines)
