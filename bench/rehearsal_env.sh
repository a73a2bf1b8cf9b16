#!/usr/bin/env bash
# Builds, from the registries, a Python environment like the lent GPU machine's image, for
# `bench/gpu_check.sh --rehearse` (DESIGN.md section 8: Python 3.12, torch 2.11.0 CUDA 13 build,
# torchvision 0.26.0, accelerate 1.15.0, onnx 1.23.1, onnxruntime 1.30.0, numpy 2, pytest, and no
# wandb, albumentations or pydantic: those travel as the wheels of bench/gpu_wheels.sh).
#   bench/rehearsal_env.sh              # into .rehearsal/env (git-ignored); prints minutes and sizes
#   REHEARSAL_DIR=/elsewhere bench/rehearsal_env.sh
# The torch wheel is PyPI's, the same CUDA 13 build as the GPU machine's (it imports and runs on a
# CPU; there is no CPU-only torch 2.11.0 on PyPI). Its loader needs the CUDA libraries it links
# (cudart, cuBLAS, cuDNN, NCCL, ...): they come from the nvidia-* wheels torch names, so the build
# downloads about 3 GB once; the wheels stay in .rehearsal/wheels and a rebuild reuses them.
# timm is pinned older than the carried one and typing_extensions older than pydantic 2.14 needs,
# so the rehearsal shows that the carried wheels, not the image's packages, are the ones imported.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${REHEARSAL_DIR:-.rehearsal}
if [ -z "${PY312:-}" ]; then  # a pyenv shim may exist and fail: ask each candidate for its version
  for candidate in python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate
      break
    fi
  done
fi
[ -n "${PY312:-}" ] || { echo "error: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2; exit 2; }
# The image's versions where known (KINDS list of the GPU machine); the rest as the registry has them.
PACKAGES="torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 timm==1.0.19 onnx==1.23.1 onnxruntime==1.30.0
onnxscript==0.7.2 onnx-ir==1.0.0 numpy==2.5.2 safetensors==0.8.0 huggingface-hub==1.33.0 typing-extensions==4.15.0
pyyaml tqdm matplotlib scipy scikit-image numba llvmlite imageio tifffile lazy-loader pillow opencv-python-headless
psutil packaging pytest pytest-timeout"
start=$(date +%s)
mkdir -p "$DIR/wheels"
"$PY312" -m pip download --quiet --only-binary=:all: --python-version 3.12 -d "$DIR/wheels" $PACKAGES
downloaded=$(date +%s)
rm -rf "$DIR/env"
"$PY312" -m venv "$DIR/env"
"$DIR/env/bin/python" -m pip install --quiet --no-index --find-links "$DIR/wheels" --only-binary=:all: $PACKAGES
# The image has none of these: a test that needs one must skip, not fail to collect.
for absent in wandb albumentations pydantic; do
  if "$DIR/env/bin/python" -c "import $absent" 2>/dev/null; then
    echo "error: $absent came in as a dependency; the GPU image has none" >&2
    exit 2
  fi
done
end=$(date +%s)
"$DIR/env/bin/python" -c "import torch, torchvision, accelerate, timm, onnx, onnxruntime, numpy, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda build', torch.version.cuda,
      'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'timm', timm.__version__,
      'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
echo "rehearsal env: $DIR/env built in $(((end - start) / 60)) min $(((end - start) % 60)) s" \
  "(download $((downloaded - start)) s); wheels $(du -sh "$DIR/wheels" | cut -f1), env $(du -sh "$DIR/env" | cut -f1)"
