#!/usr/bin/env bash
# The organizers' toolchain, rebuilt outside the repository, to check our Phase II files against
# what they ran (CdtQin/CVPR2022-AISafety-Helper: env.txt, onnx/onnx2torch.sh, torch/check_model.py).
#
#   bench/organizers_env.sh DIR [HELPER_CHECKOUT]
#
# DIR/py36: Python 3.6 + torch 1.5.0 + torchvision 0.6.0 + numpy 1.19.5 (env.txt): loads a zip the
#   organizers' way and runs modules their converter wrote. onnx 1.11 and onnxruntime 1.10 have no
#   Python 3.6 wheels on PyPI, so their converter runs in
# DIR/py39: Python 3.9 + onnx 1.11.0 + onnxruntime 1.10.0 (env.txt's versions) + the converter's
#   imports; it only reads torch.__version__, so DIR/torchstub stands in for torch there.
# HELPER_CHECKOUT (optional): a checkout of their helper repository; its onnx/onnx_pytorch is the
#   converter tests/test_organizers_env.py runs (else that test runs the PyPI onnx-pytorch 0.1.5).
# Needs pyenv's 3.6 and 3.9 interpreters (PY36, PY39 override) and PyPI; about 1 GB of downloads.
# The torch 1.5.0 name list (phase2/torch150_names.txt) was made with DIR/py36 (see its header).
set -euo pipefail
DIR=${1:?usage: bench/organizers_env.sh DIR [HELPER_CHECKOUT]}
PY36=${PY36:-$HOME/.pyenv/versions/3.6.15/bin/python3.6}
PY39=${PY39:-$HOME/.pyenv/versions/3.9.18/bin/python3.9}
mkdir -p "$DIR"
export PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT=  # this machine caps torch for the project's own venv
"$PY36" -m venv "$DIR/py36"
"$DIR/py36/bin/python" -m pip install -q 'pip<22'
"$DIR/py36/bin/python" -m pip install -q torch==1.5.0 torchvision==0.6.0 numpy==1.19.5
"$PY39" -m venv "$DIR/py39"
"$DIR/py39/bin/python" -m pip install -q onnx==1.11.0 onnxruntime==1.10.0 protobuf==3.19.3 numpy==1.21.6 \
    sympy==1.9 packaging==21.3 PyYAML==5.4.1
"$DIR/py39/bin/python" -m pip install -q --no-deps onnx-pytorch==0.1.5  # its metadata asks for torch >= 1.10
mkdir -p "$DIR/torchstub/torch"
echo '__version__ = "1.5.0"  # the converter reads only the version' > "$DIR/torchstub/torch/__init__.py"
if [ -n "${2:-}" ]; then ln -sfn "$(cd "$2" && pwd)/onnx/onnx_pytorch" "$DIR/helper_onnx_pytorch"; fi
echo "organizers' environment in $DIR: ORGANIZERS_ENV=$DIR pytest tests/test_organizers_env.py"
