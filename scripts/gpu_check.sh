#!/usr/bin/env bash
# What only a GPU can show, measured on this box: writes docs/gpu.md with measured figures only.
#   bash scripts/gpu_check.sh              # one GPU: under 8 minutes (GPU_CHECK_BUDGET_S, default 450)
#   bash scripts/gpu_check.sh --out FILE   # the page elsewhere; on CPU the page is written only with --out
# On a GPU: the runtime mask check (prefill_bidir vs the eager reference, ablate.core.mask_check) under sdpa
# and flex_attention on a tiny fp32 model and on SmolLM2-135M-Instruct in bf16, the same through the
# evaluation path; bf16 causal vs stock lm-eval (`ablate bench`); stage 3 steps and tokens per second; peak
# memory of each part (torch.cuda.max_memory_allocated); the real demo if the budget has room.
# On CPU: the tiny mask check only, and it says what it skipped. A part that fails is reported, not fatal.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/local/setup.sh
PY=.venv/bin/python
ABLATE=.venv/bin/ablate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a file}; shift 2 ;;
    *) echo "usage: bash scripts/gpu_check.sh [--out FILE]" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ablate-gpu-check.XXXXXX")
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
: > "$WORK/notes.txt"
left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { printf '%s\n' "$*" >> "$WORK/notes.txt"; echo "gpu_check: $*"; }
# step NAME SECONDS CMD...: CMD under a timeout, its output in WORK/NAME.log; a failure is noted, not fatal.
step() {
  local name=$1 secs=$2 rc=0
  shift 2
  if [ "$secs" -lt 20 ]; then note "$name: skipped: the ${BUDGET} s budget is spent"; return 0; fi
  echo "gpu_check: $name (up to ${secs} s)"
  timeout "$secs" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 124 ]; then note "$name: did not finish within ${secs} s"
  elif [ "$rc" != 0 ]; then note "$name: failed (exit $rc): $(tail -n 1 "$WORK/$name.log")"; fi
  return 0
}

cat > "$WORK/parts.py" <<'PYEOF'
"""The measured parts of scripts/gpu_check.sh: python parts.py PART WORK [MODEL DATA]."""
import json, statistics, sys, time
from pathlib import Path

import torch

part, work = sys.argv[1], Path(sys.argv[2])
cuda = torch.cuda.is_available()


def save(name, value):
    (work / f"{name}.json").write_text(json.dumps(value, indent=1))


def peak(reset=False):
    if not cuda:
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def prompt_pairs(tokenizer, data, n=3):
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:n]]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    return [(encode(r["question"]), encode(" " + r["answer"])) for r in rows]


def mask_checks(models, device):
    from ablate.core.mask_check import check_mask, check_rows
    from ablate.core.models import load_model

    out = []
    for label, path, dtype, data in models:
        for impl in ("sdpa", "flex_attention") if device == "cuda" else ("sdpa", "eager"):
            peak(reset=True)
            try:
                model, tokenizer = load_model(path, device, dtype, impl)
                rows = check_rows(prompt_pairs(tokenizer, data))
                record = check_mask(model, "prefill_bidir", rows, strict=False)
            except Exception as exc:  # noqa: BLE001 - reported on the page, the other parts go on
                record = {"backend": impl, "dtype": dtype, "device": device, "passed": False,
                          "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            out.append({"model": label, **record, "peak_mib": peak()})
            print(label, impl, record.get("passed"), record.get("max_diff"), record.get("tolerance"))
    return out


def evaluation_check(path, data):
    """The check as an evaluation makes it: PrefillMaskLM's first loglikelihood call records lm.mask_check."""
    from lm_eval.api.instance import Instance
    from ablate.core.lm_eval_model import PrefillMaskLM
    from ablate.core.models import load_model

    out = []
    for impl in ("sdpa", "flex_attention"):
        model, tokenizer = load_model(path, "cuda", "bfloat16", impl)
        rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:3]]
        lm = PrefillMaskLM(pretrained=model, tokenizer=tokenizer, mask="prefill_bidir", batch_size=4, device="cuda")
        try:
            lm.loglikelihood([Instance("loglikelihood", doc={}, idx=i, arguments=(r["question"], " " + r["answer"]))
                              for i, r in enumerate(rows)])
        except Exception as exc:  # noqa: BLE001
            print("evaluation check", impl, exc)
        out.append({"model": "SmolLM2-135M-Instruct (evaluation path)", **(lm.mask_check or {"backend": impl})})
    return out


if part == "tiny":
    data = work / "tiny_rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Ada has a red box. What color is the box of Ada?", "answer": "red"},
        {"question": "Sam has three apples and buys two more. How many apples?", "answer": "5"},
        {"question": "The cat sat on the mat. Where did the cat sit?", "answer": "on the mat"}]) + "\n")
    models = [("tiny llama", str(work / "tiny-llama"), "float32", data),
              ("tiny qwen2, sliding layers", str(work / "tiny-qwen2-sliding"), "float32", data)]
    if cuda:  # bf16 on CUDA needs no fetched model
        models += [(label, path, "bfloat16", rows) for label, path, _, rows in models]
    save("mask_tiny", mask_checks(models, "cuda" if cuda else "cpu"))
elif part == "real":
    model, data = sys.argv[3], sys.argv[4]
    checks = mask_checks([("SmolLM2-135M-Instruct", model, "bfloat16", data)], "cuda")
    save("mask_real", checks)  # kept if the evaluation path below fails
    save("mask_real", checks + evaluation_check(model, data))
elif part == "stage3":
    from ablate.core.models import load_tokenizer
    from ablate.stages.config import FinetuneConfig
    from ablate.stages.stage3_finetune import run_stage3

    model, data = sys.argv[3], sys.argv[4]
    config = FinetuneConfig(model=model, data=data, prompt_field="question", response_field="answer",
                            mask="prefill_bidir", max_steps=40, batch_size=8, max_length=512, logging_steps=10,
                            save_steps=1000, device="cuda", runs_dir=str(work / "runs"))
    peak(reset=True)
    run_dir = run_stage3(config)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    tokenizer = load_tokenizer(model)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:400]]
    lengths = [min(len(tokenizer(r["question"] + " " + r["answer"])["input_ids"]), 512) for r in rows]
    steps = summary.get("train_steps_per_second")
    save("stage3", {"status": summary.get("status"), "steps": summary.get("global_step"), "batch_size": 8,
                    "train_runtime_s": summary.get("train_runtime"), "steps_per_second": steps,
                    "mean_example_tokens": round(statistics.mean(lengths), 1), "examples_measured": len(lengths),
                    "tokens_per_second": round(steps * 8 * statistics.mean(lengths), 1) if steps else None,
                    "peak_mib": peak(), "mask_check": summary.get("mask_check")})
PYEOF

cat > "$WORK/render.py" <<'PYEOF'
"""docs/gpu.md from the parts' JSON files: python render.py WORK (the page on stdout)."""
import json, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path

import lm_eval, torch, transformers

work = Path(sys.argv[1])
load = lambda name: json.loads((work / f"{name}.json").read_text()) if (work / f"{name}.json").is_file() else None
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
out = ["# GPU check", "",
       f"Measured by `bash scripts/gpu_check.sh` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC at commit {sha}.",
       f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
       f"lm-eval {lm_eval.__version__}. Every figure below was measured by that run; nothing is estimated "
       "except where a line says how it is derived.", ""]
notes = (work / "notes.txt").read_text().strip()
if notes:
    out += ["## Skipped or failed", ""] + [f"- {line}" for line in notes.splitlines()] + [""]
checks = (load("mask_tiny") or []) + (load("mask_real") or [])
if checks:
    out += ["## prefill_bidir vs the eager reference (ablate.core.mask_check)", "",
            "Tolerance = max(10 x the causal run-vs-eager difference, 4 eps x logit scale, 0.1% of the mask's own "
            "effect); the masked logits must "
            "also differ from the causal ones at prompt positions by more than it.", "",
            "| model | backend | dtype | device | max diff | tolerance | causal diff | masked vs causal | passed | peak MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    for c in checks:
        passed = f(c.get("passed")) + (f" ({c['error']})" if c.get("error") else "")
        out.append(f"| {c.get('model', '')} | {c.get('backend', '')} | {c.get('dtype', '')} | {c.get('device', '')} | "
                   f"{f(c.get('max_diff'))} | {f(c.get('tolerance'))} | {f(c.get('causal_diff'))} | "
                   f"{f(c.get('masked_vs_causal'))} | {passed} | {f(c.get('peak_mib'))} |")
    out.append("")
bench = load("bench")
if bench:
    out += [f"## Causal ({bench['dtype']}, {bench['attn_implementation']}) vs stock lm-eval: `ablate bench`", "",
            f"{bench['model']}, batch size {bench['batch_size']}, limit {bench['limit']}, {bench['repeats']} runs each.", "",
            "| task | docs | identical predictions | max dLL | wall ratio | stock tok/s | ablate tok/s | acc stock | acc ablate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in bench["tasks"].items():
        out.append(f"| {name} | {t['documents']} | {t['identical_predictions']} | {t['max_loglikelihood_difference']:.2e} | "
                   f"{t['wall_ratio']} | {t['tokens_per_second']['stock']} | {t['tokens_per_second']['ablate']} | "
                   f"{t['accuracy']['stock']:.3f} | {t['accuracy']['ablate']:.3f} |")
    out.append("")
s3 = load("stage3")
if s3:
    mc = s3.get("mask_check") or {}
    out += ["## Stage 3 (prefill_bidir, full finetune, bf16)", "",
            f"- status {s3['status']}, {s3['steps']} steps of {s3['batch_size']} examples in {s3['train_runtime_s']} s: "
            f"{s3['steps_per_second']} steps/s (the Trainer's figure)",
            f"- tokens per second: {s3['tokens_per_second']} (derived: steps/s x batch x the mean tokens of "
            f"{s3['examples_measured']} training examples, {s3['mean_example_tokens']})",
            f"- peak memory: {s3['peak_mib']} MiB (torch.cuda.max_memory_allocated)",
            f"- its mask check before step 1: {mc.get('passed') if mc else 'not recorded'}", ""]
for impl in ("sdpa", "flex_attention"):
    b3 = load(f"bench_stage3_{impl}")
    if not b3:
        continue
    out += [f"## Stage 3 packed vs padded ({b3['dtype']}, {impl}): `ablate bench-stage3`", "",
            f"{b3['rows']} rows, batch {b3['batch_size']}, max length {b3['max_length']}, pack length "
            f"{b3['pack_length'] or 'one sequence per micro-batch'}, attention per row: {b3.get('row_attention')}, "
            f"{b3['steps']} steps x {b3['repeats']} runs each.", "",
            "| mask | padded real tok/s | packed real tok/s | ratio | peak MiB padded / packed | losses agree |",
            "| --- | --- | --- | --- | --- | --- |"]
    for mask, t in b3["masks"].items():
        mem = {m: round(v / 2**20) if v else None for m, v in t["peak_memory_bytes"].items()}
        out.append(f"| {mask} | {t['real_tokens_per_second']['padded']} | {t['real_tokens_per_second']['packed']} | "
                   f"{t['ratio']} | {mem['padded']} / {mem['packed']} | {t['losses_agree']} "
                   f"({t['max_loss_difference']:.1e}) |")
    out.append("")
demo = load("demo")
if demo:
    out += ["## The real demo (`ablate demo --device cuda`)", "", f"- {demo['seconds']} s, exit {demo['rc']}"]
    out += [f"- {line}" for line in demo.get("lines", [])] + [""]
print("\n".join(out))
PYEOF

GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

# The CPU part (and its CUDA twin on a GPU): the mask check on tiny models, one with sliding-window layers.
step tiny_models 120 bash -c "'$ABLATE' tiny-model --arch llama --out '$WORK/tiny-llama' && \
  '$PY' -c 'from ablate.core.tiny import build_tiny_model as b; \
b(\"$WORK/tiny-qwen2-sliding\", arch=\"qwen2\", use_sliding_window=True, sliding_window=2, max_window_layers=1)'"
step mask_tiny "$(left)" "$PY" "$WORK/parts.py" tiny "$WORK"

if [ "$GPU" = 1 ]; then
  MODEL="" DATA=""
  if timeout 120 "$ABLATE" fetch > "$WORK/fetch.log" 2>&1; then
    MODEL=$(awk '$1 == "model" {print $2}' "$WORK/fetch.log" | tail -n 1)
    DATA=$(awk '$1 == "gsm8k" || $1 == "data" {print $2}' "$WORK/fetch.log" | head -n 1)
    [ -n "$DATA" ] || DATA=$("$PY" -c 'from ablate.core.assets import gsm8k; print(gsm8k())')
  else
    note "real model: skipped: ablate fetch failed: $(tail -n 1 "$WORK/fetch.log")"
  fi
  if [ -n "$MODEL" ]; then
    step mask_real "$(left)" "$PY" "$WORK/parts.py" real "$WORK" "$MODEL" "$DATA"
    l=$(left); step bench $((l < 150 ? l : 150)) "$ABLATE" bench --device cuda --dtype bfloat16 --limit 100 \
      --repeats 2 --out "$WORK/bench.json"
    l=$(left); step stage3 $((l < 150 ? l : 150)) "$PY" "$WORK/parts.py" stage3 "$WORK" "$MODEL" "$DATA"
    for impl in sdpa flex_attention; do  # packed vs padded stage 3 on the demo's rows, bf16 (issue 20)
      l=$(left); step "bench_stage3_$impl" $((l < 150 ? l : 150)) "$ABLATE" bench-stage3 --device cuda \
        --dtype bfloat16 --attn-implementation "$impl" --steps 3 --repeats 2 --out "$WORK/bench_stage3_$impl.json"
    done
    t0=$(date +%s)
    step demo "$(left)" "$ABLATE" demo --device cuda --workdir "$WORK/demo"
    if [ -d "$WORK/demo/runs" ] && ! grep -q "^demo:" "$WORK/notes.txt"; then
      "$PY" - "$WORK" "$(($(date +%s) - t0))" <<'PYEOF'
import json, sys
from pathlib import Path
work, seconds = Path(sys.argv[1]), int(sys.argv[2])
lines = []
for m in sorted((work / "demo" / "runs").glob("*/*/metrics.json")) + sorted((work / "demo" / "runs").glob("*/*/summary.json")):
    d = json.loads(m.read_text())
    check = (d.get("mask_check") or {}).get("passed")
    acc = (d.get("macro") or {}).get("acc")
    lines.append(f"{m.parent.parent.name} ({d.get('mask', '')}): status {d.get('status', 'completed')}"
                 + (f", macro acc {acc:.3f}" if isinstance(acc, float) else "") + f", mask check passed: {check}")
(work / "demo.json").write_text(json.dumps({"seconds": seconds, "rc": 0, "lines": lines}))
PYEOF
    fi
  fi
else
  note "CPU only: skipped the bf16 bench against stock lm-eval, the CUDA sdpa and flex_attention mask checks, the real model, stage 3 tokens per second, peak GPU memory and the bf16 demo (they need a GPU)"
fi

"$PY" "$WORK/render.py" "$WORK" > "$WORK/gpu.md"
if [ -z "$OUT" ] && [ "$GPU" = 1 ]; then OUT=docs/gpu.md; fi
if [ -n "$OUT" ]; then
  cp "$WORK/gpu.md" "$OUT"
  echo "gpu_check: wrote $OUT ($(( $(date +%s) - START )) s; logs in $WORK)"
else
  cat "$WORK/gpu.md"
  echo "gpu_check: no GPU, so docs/gpu.md is left as it is (--out FILE writes this page; logs in $WORK)"
fi
