#!/usr/bin/env bash
# Set up and run the test suite (the README's test command; .ci/run calls it).
#   bash scripts/local/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
ABLATE_EXTRAS=test,vast,curves bash scripts/local/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
