"""Our Phase II files in the organizers' own toolchain (issue 34), where it is built: opt-in with
``ORGANIZERS_ENV=DIR`` from ``bench/organizers_env.sh DIR [HELPER_CHECKOUT]`` (Python 3.6 + torch
1.5.0 in DIR/py36; onnx 1.11 + onnxruntime 1.10 and their converter in DIR/py39). Skipped without
it: the static checks (tests/test_legacy_env.py, tests/test_check_submission.py) stand in for it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest
import torch

from phase2 import export, model_zip, onnx_file
from tests.test_phase2 import _checkpoint, _export_cfg

ENV = Path(os.environ.get("ORGANIZERS_ENV", "/nonexistent"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ENV / "py36/bin/python").is_file(), reason="needs ORGANIZERS_ENV=DIR (bench/organizers_env.sh)"
    ),
]

# The organizers' load (torch/check_model.py, README), then a forward of N x 3 x 224 x 224 in [0, 1].
LOAD_ZIP = """import json, shutil, sys, torch
shutil.unpack_archive(sys.argv[1], sys.argv[2], "zip")
sys.path.append(sys.argv[2])
from model import Model
model = Model().float()
x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    y = model(x)
print(json.dumps({"torch": torch.__version__, "y": y.tolist()}))
"""
RUN_GENERATED = """import json, sys, torch
sys.path.insert(0, sys.argv[1])
from model import Model
x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    y = Model().eval()(x)
print(json.dumps({"torch": torch.__version__, "y": y.tolist()}))
"""


def _json(argv, **kwargs) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("organizers")
    ckpt = _checkpoint(root, "test_convnext", 32)
    return export.run(_export_cfg(ckpt, root / "out", "export.channel_order=bgr", "export.formats=[onnx,zip]"))


def test_the_zip_loads_and_predicts_in_python_36_and_torch_15(exported, tmp_path):
    out = _json([str(ENV / "py36/bin/python"), "-I", "-c", LOAD_ZIP, exported["paths"]["zip"], str(tmp_path / "z")])
    assert out["torch"].startswith("1.5.")
    model, _ = model_zip.load_zip_model(exported["paths"]["zip"])
    with torch.no_grad():
        expected = model(torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(torch.tensor(out["y"]).exp(), expected.exp(), atol=1e-5, rtol=0)


def test_their_converter_converts_the_onnx_and_torch_15_predicts_what_onnxruntime_does(exported, tmp_path):
    helper = ENV / "helper_onnx_pytorch"
    out_dir = tmp_path / "output_dir"
    out_dir.mkdir()
    # onnx/onnx2torch.sh: python -u onnx_pytorch/code_gen.py --onnx_model_path F --output_dir output_dir
    script = [str(helper / "code_gen.py")] if helper.is_dir() else ["-m", "onnx_pytorch.code_gen"]
    argv = [str(ENV / "py39/bin/python"), "-u", *script, "--onnx_model_path", exported["paths"]["onnx"]]
    env = dict(os.environ, PYTHONPATH=str(ENV / "torchstub"))
    proc = subprocess.run([*argv, "--output_dir", str(out_dir)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _json([str(ENV / "py36/bin/python"), "-I", "-c", RUN_GENERATED, str(out_dir)])
    assert out["torch"].startswith("1.5.")
    session = onnx_file.create_session(onnx.load(exported["paths"]["onnx"]).SerializeToString())
    by_ort = onnx_file.run_session(session, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.tensor(out["y"]).argmax(1), by_ort.argmax(1))
    torch.testing.assert_close(torch.tensor(out["y"]).exp(), by_ort.exp(), atol=1e-5, rtol=0)
