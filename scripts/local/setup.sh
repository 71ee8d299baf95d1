#!/usr/bin/env bash
# Set up ablate in ./.venv (idempotent). Used by quickstart.sh, test.sh and .ci/run.
#   bash scripts/local/setup.sh
# On a machine without an NVIDIA GPU it installs the CPU build of torch (torch==2.13.0 resolves
# to a CPU wheel on the project's machines; set TORCH_SPEC to choose another). On a GPU box whose
# Python already has torch, the venv sees that install (--system-site-packages) and keeps it.
# ABLATE_EXTRAS picks the optional extras (default: test; the laptop's test.sh adds vast).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

# rsync moves checkpoints home at line speed (`ablate remote sync` falls back to slower SFTP without it).
if ! command -v rsync >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq rsync >/dev/null) \
      || echo "setup: could not install rsync; syncs from this box use SFTP"
  else
    echo "setup: rsync is not installed; syncs from this box use SFTP"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch}"
  else
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
.venv/bin/python -m pip install -q -e ".[${ABLATE_EXTRAS:-test}]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, transformers, lm_eval; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
