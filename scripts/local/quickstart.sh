#!/usr/bin/env bash
# Set up, then run the offline demo: a synthetic world, a tiny LM trained from scratch on CPU,
# stage 1 -> 2 -> 3 (both masks) -> 4 -> report -> STATUS.md, all under ./demo/.
#   bash scripts/local/quickstart.sh [extra `ablate demo` flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/local/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/ablate demo "$@"
