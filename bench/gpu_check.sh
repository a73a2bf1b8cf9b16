#!/usr/bin/env bash
# The GPU check: the `gpu` tests, the GPU bench (python -m bench.gpu: the phase config's training
# steps with its loader, bf16, channels_last, submit) and the loader section, each part under a time
# box, every log and figure written into one folder ($OUT, else runs/gpu_check) as it is measured.
#
# On a machine of your own with a CUDA GPU and this checkout's .venv (./run.sh test made it):
#   bench/gpu_check.sh                            # figures in runs/gpu_check/, about 6 minutes at most
#   GPU_CHECK_COMPILE=1 bench/gpu_check.sh        # also model.compile against eager (minutes more)
# On the GPU machine lent to some development sessions (an image with torch 2.11 but no wandb or
# albumentations; nothing reachable from it), the missing packages travel as wheels:
#   bench/gpu_wheels.sh                           # here, once: .whl/ (git-ignored)
#   device run, carry [".whl"], timeout_s 420: bash bench/gpu_check.sh    # OUT is set there
# Rehearsed on a CPU (every step above, CUDA swapped for the CPU, sizes shrunk, time boxes scaled),
# in an environment built like that image plus exactly the carried wheels:
#   bench/rehearsal_env.sh && bench/gpu_wheels.sh # once: .rehearsal/env (about 5 minutes, 8 GB)
#   bench/gpu_check.sh --rehearse                 # or REHEARSE=1; OUT defaults to runs/gpu_rehearsal
#
# The budget on one H100, worst case = the sum of the time boxes (BENCHMARKS.md, "GPU", has the
# arithmetic that each part fits its box): set-up (machine.txt, wheels) 20 s + tests 80 s + the
# compiled-step test 30 s + bench 200 s (its data 15, then bench/gpu.py TIMEOUTS: modes 85,
# precision 30, layout 30, submit 40) + loader 30 s = 360 s. A part that runs out of time loses its own figures only; the others are kept.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REHEARSE=${REHEARSE:-0}
[ "${1:-}" = --rehearse ] && REHEARSE=1
T_TESTS=80 T_COMPILE_TEST=30 T_BENCH=200 T_LOADER=30
started=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if [ "$REHEARSE" = 1 ]; then
  OUT=${OUT:-runs/gpu_rehearsal}
  PY=.rehearsal/env/bin/python
  [ -x "$PY" ] || { echo "error: no $PY: build it with bench/rehearsal_env.sh" >&2; exit 2; }
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: run bench/gpu_wheels.sh" >&2; exit 2; }
  SITE=.rehearsal/site DEVICE=cpu SCALE=${REHEARSE_TIME_SCALE:-20} SIZES=--quick REPEATS=1
  export GPU_TESTS_DEVICE=cpu
else
  OUT=${OUT:-runs/gpu_check}
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  SITE=/tmp/site DEVICE=cuda SCALE=1 SIZES="" REPEATS=2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")
{
  date -u
  [ "$REHEARSE" = 1 ] && echo "REHEARSAL on the CPU: no figure here is a GPU figure"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  echo "cores $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"
if [ "$REHEARSE" != 1 ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
fi
# The machine's own Python (or the rehearsal's, built like it): add what it lacks, the way the
# device README says, so the carried versions come first on the path.
if [ "$PY" != .venv/bin/python ] && ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "error: installing the wheels of .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=$(realpath "$SITE"):$PWD
fi
# What is imported once the wheels are on the path (the carried timm, not the image's).
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
import importlib
import importlib.metadata as md
DISTS = {"typing_extensions": "typing_extensions", "ptflops": "ptflops", "imagecorruptions": "imagecorruptions-imaug"}
for name in ("torch", "torchvision", "timm", "accelerate", "albumentations", "pydantic", "typing_extensions", "onnx",
             "onnxruntime", "numpy", "pyautoattack", "ptflops", "onnx2pytorch", "imagecorruptions", "wandb"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None) or md.version(DISTS.get(name, name))
        print(f"{name} {version} from {module.__file__}")
    except Exception as exc:  # noqa: BLE001 - one line per package, whatever stops it
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF
echo "set-up: $(($(date +%s) - started)) s" | tee -a "$OUT/machine.txt"

status=0
cpu_seconds() {  # CPU seconds (user + sys) of this script's finished child processes so far, into $CPU
  times >"$WORK/times"  # in this shell: a subshell's `times` starts from zero
  CPU=$(awk 'END {gsub(/s/, ""); split($1, u, "m"); split($2, k, "m"); printf "%.0f", u[1] * 60 + u[2] + k[1] * 60 + k[2]}' \
    "$WORK/times")
}
step() {  # step NAME SECONDS LOG COMMAND...: one time-boxed part; its failure marks the check failed
  local name=$1 seconds=$2 log=$3 t0 c0
  shift 3
  cpu_seconds
  t0=$(date +%s) c0=$CPU
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$OUT/$log"
  local code=${PIPESTATUS[0]}
  cpu_seconds
  echo "[$name] exit $code in $(($(date +%s) - t0)) s wall, $((CPU - c0)) s CPU (time box $seconds s)" \
    | tee -a "$OUT/$log"
  [ "$code" = 0 ] || status=1
}
# the compiled step in a box of its own: its compilation time is the least known, and a timeout
# there must not take the other tests' results with it
step tests $((T_TESTS * SCALE)) gpu_tests.log \
  "$PY" -m pytest tests -m gpu -k "not compile" -q -p no:cacheprovider -o addopts="" --durations=0
step compile-test $((T_COMPILE_TEST * SCALE)) gpu_compile_test.log \
  "$PY" -m pytest tests -m gpu -k compile -q -p no:cacheprovider -o addopts="" --durations=0
step bench $((T_BENCH * SCALE)) bench_gpu.log \
  "$PY" -m bench.gpu --device $DEVICE --workdir "$WORK/gpu" --repeats $REPEATS --timeout-scale "$SCALE" \
  --write "$OUT/bench_gpu.md" --rows "$OUT/bench_gpu_rows.jsonl" $([ "${GPU_CHECK_COMPILE:-0}" = 1 ] && echo --compile)
step loader $((T_LOADER * SCALE)) bench_loader.log \
  "$PY" -m bench --only loader $SIZES --repeats 1 --workdir "$WORK/loader" --write "$OUT/bench_loader.md"
cpu_seconds
rm -rf "$WORK"
echo "gpu check$([ "$REHEARSE" = 1 ] && echo " REHEARSAL"): $([ $status = 0 ] && echo passed || echo FAILED)" \
  "in $(($(date +%s) - started)) s wall, $CPU s CPU; logs in $OUT"
exit $status
