#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh: the packages this project needs that the lent GPU machine lacks
# (it has torch, torchvision, timm, accelerate, onnx, onnxruntime, numpy, scipy, OpenCV, numba,
# scikit-image, matplotlib, pytest; nothing can be installed there from the network). Run here,
# where PyPI is reachable: the versions are the ones pinned in this checkout's .venv, the files are
# CPython 3.12 manylinux builds (the GPU machine's Python), saved into .whl/ (ignored by git), which
# is emptied first: two versions of one package there stop the whole install on the device.
# onnx-pytorch travels too (the organizers' code generator; export checks an .onnx with it and
# refuses without it). typing_extensions travels too: the image's is older than pydantic 2.14 needs (>= 4.16, `Sentinel`).
# wandb does not (its 0.31.0 wheel is 19 MiB, more than all of these together, and the check runs
# with W&B disabled): the tests that run it skip where it is absent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=.whl
PACKAGES="timm albumentations albucore pydantic pydantic_core annotated-types typing-inspection typing_extensions
stringzilla simsimd pyautoattack ptflops onnx2pytorch imagecorruptions-imaug onnx-pytorch"
rm -rf "$OUT"
mkdir -p "$OUT"
for name in $PACKAGES; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "error: $name is not installed in .venv (run ./run.sh test once)" >&2; exit 2; }
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "$name==$version"
done
# pyautoattack's wheel carries a 44 MB example model no code here loads: the device machine's
# transfer limit is 64 MiB for the whole tree
for wheel in "$OUT"/pyautoattack-*.whl; do
  zip -q -d "$wheel" 'pyautoattack/examples/model_test.pt' 2>/dev/null || true
done
du -ch "$OUT"/*.whl | tail -1
