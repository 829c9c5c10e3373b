#!/usr/bin/env bash
# The one GPU check of the hot path (bench/gpu_suite.py), for a bare machine with only PyTorch:
#   bash bench/gpu_suite.sh              # GPU: < 8 min; JSON + log in $OUT (device tool) or bench/results
#   bash bench/gpu_suite.sh --dry-run    # CPU plumbing check, every stage shrunk (also SHRINK=1)
# Extra arguments go to the driver (--stages env,train_eager --budget-s 300 ...).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
# The optional data_wait stage needs Ray: a carried .whl/ (bench/trim_ray_wheel.py + jsonschema's wheels)
if ls .whl/ray-*.whl >/dev/null 2>&1 && ! "$PY" -c "import ray" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ray-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/ray-site"
fi
case " $* " in *" --dry-run "*) LOG="$DEST/gpu_suite_dryrun.log" ;; *) [ "${SHRINK:-0}" = 1 ] && LOG="$DEST/gpu_suite_dryrun.log" || LOG="$DEST/gpu_suite.log" ;; esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv | tee "$LOG.nvsmi"
"$PY" -m bench.gpu_suite --out "$DEST" "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
