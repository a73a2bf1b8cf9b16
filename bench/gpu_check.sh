#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU: the `gpu` tests and `./run.sh bench --only gpu,loader`,
# every log and figure into one folder ($OUT, else runs/gpu_check). Built for the H200 lent to some
# development sessions (its own python3 with torch; the missing packages travel as wheels in .whl/,
# made by bench/gpu_wheels.sh); on a machine of your own with the project's .venv it runs as is.
#   bench/gpu_wheels.sh                           # here, once: the wheels
#   OUT=/tmp/out bench/gpu_check.sh               # there: about 6 minutes
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, timm, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
  nproc
} 2>&1 | tee "$OUT/machine.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
if [ "$PY" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the machine's own Python: add what it lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the wheels of .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
fi

status=0
timeout 240 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 300 "$PY" -m bench --only gpu,loader --repeats 2 --workdir /tmp/gpu_bench --write "$OUT/bench_gpu.md" \
  2>&1 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "gpu check: $([ $status = 0 ] && echo passed || echo FAILED), logs in $OUT"
exit $status
