#!/usr/bin/env bash
# Set up, then run stages 1 and 2 offline on the bundled default: a tiny model built locally,
# the bundled ablate_tiny task and fixture rows for the study's five tasks.
#   bash scripts/local/quickstart.sh [runs-dir]
# The tiny model is random, so its accuracies sit near chance: this shows the pipeline, not a result.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/local/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
RUNS=${1:-runs}
MODEL=${ABLATE_TINY_MODEL:-.cache/tiny-llama}
[ -d "$MODEL" ] || .venv/bin/ablate tiny-model --out "$MODEL"
TASKS=ablate_tiny,hellaswag,piqa,arc_easy,arc_challenge,winogrande
DATA=()
for t in hellaswag piqa arc_easy arc_challenge winogrande; do DATA+=(--task-data "$t=ablate/task_data/$t.jsonl"); done
COMMON=(--model "$MODEL" --tasks "$TASKS" "${DATA[@]}" --device cpu --runs-dir "$RUNS")
.venv/bin/ablate stage1 "${COMMON[@]}"
.venv/bin/ablate stage2 --mask prefill_bidir "${COMMON[@]}"
