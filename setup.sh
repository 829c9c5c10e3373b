#!/usr/bin/env bash
# Set up shortcut-ray in .venv (and the GCS emulator, used by the tests, in .venv-gcs). Idempotent.
#   bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on the project's CI machines 2.13.0 is the CPU build on local disk; elsewhere
# pip takes it from PyPI (a CUDA build on Linux). Set TORCH_SPEC to use another build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,latents]"
# The GCS emulator lives in its own venv: its pinned dependencies clash with mlflow's (RAY_NOTES §2).
if [ ! -x .venv-gcs/bin/gcp-storage-emulator ]; then
  "$PY" -m venv .venv-gcs
  .venv-gcs/bin/python -m pip install -q gcp-storage-emulator
fi
echo "shortcut-ray is set up in .venv"
