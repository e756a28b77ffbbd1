#!/usr/bin/env bash
# The one command a session lent a GPU passes to the device tool's `run` (docs/benchmarks.md, GPU):
#   run(command="bash benchmarks/gpu-run.sh", carry=[".whl"], timeout_s=600)
# after `python benchmarks/gpu_wheels.py` has filled .whl/ here. Arguments go to benchmarks/gpu.py.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nic-gpu-out}
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run python benchmarks/gpu_wheels.py and carry .whl" | tee "$OUT/log"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee "$OUT/log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export CUFILE_LOGFILE_PATH=/dev/null
# SIGINT at 500 s: gpu.py then writes what it measured (its budget is 450 s), well inside the call's limit.
{
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv
    timeout -s INT -k 30 500 python3 benchmarks/gpu.py "$@"
} 2>&1 | tee "$OUT/log"
