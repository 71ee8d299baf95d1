#!/usr/bin/env bash
# Set up, then run the demo: the study on SmolLM2-135M-Instruct (fetched once from the package index)
# with a task built from GSM8K: stage 1 -> 2 -> 3 (both masks) -> 4 -> report -> STATUS.md, under ./demo/.
# About 10 minutes on a 2-core CPU (docs/demo.md); --preset smoke runs the small synthetic one.
#   bash scripts/local/quickstart.sh [extra `ablate demo` flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/local/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the model and data come from the package index
exec .venv/bin/ablate demo "$@"
