"""``check-submission`` and ``evaluate eval.file=`` against hostile and hand-made Phase II files
(issue 29, items 1, 6, 9, 10, 11, 13, 14, 15, 18): a zip's code never runs in our process nor
fakes a pass, nothing it starts outlives the check, and every malformed file is a FAIL line or
one error line, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from core.config import load_config
from core.errors import UserError
from phase2 import check, codegen, export, isolated, model_zip, score
from tests.conftest import ROOT, run_module
from tests.test_phase2 import _checkpoint, _export_cfg

ARGS = ["--image-size", "32", "data.num_classes=4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """test_convnext at 32 px exported in BGR (zip, onnx, budget JSON), and its checkpoint."""
    root = tmp_path_factory.mktemp("files")
    ckpt = _checkpoint(root, "test_convnext", 32)
    result = export.run(_export_cfg(ckpt, root / "out", "export.channel_order=bgr", "export.formats=[onnx,zip]"))
    return {k: Path(v) for k, v in result["paths"].items()}, ckpt


def _zip(dst: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _with_model_py(files, dst: Path, model_py: str) -> Path:
    """The exported zip with another model.py (its model.json and weights.pth kept)."""
    return _zip(dst, {**_members(files[0]["zip"]), "model.py": model_py})


def _check_here(capsys, path: Path, *args: str) -> tuple[int, list[str]]:
    """check-submission in this process (its zip step still runs in a child): status, output lines."""
    status = check.run([str(path), *ARGS, *args])
    return status, capsys.readouterr().out.splitlines()


def _evaluate(path: Path, tmp_path: Path):
    return score.run(load_config(None, [*ARGS[2:], f"eval.file={path}", f"eval.out_dir={tmp_path / 'e'}"]), False)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:4] in ("PASS", "FAIL")]


def _checker(*args: str, script: str | None = None) -> tuple[int, str, str, int]:
    """check-submission as its own process (``script``: a ``python -c`` program that runs it): the exit
    status, stdout, stderr and the checker's PID."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    argv = [sys.executable, *(["-c", script] if script else ["-m", "phase2.check"]), *args]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err, proc.pid


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- item 1: no fake pass, no code of the zip in our process ---------------------------------

FAKE = """import os, sys
line = 'RESULT {"load": "ok", "macs": 1, "params": 1, "numel": 4}'
print(line, flush=True)
sys.stderr.write(line + "\\n")
os._exit(0)
"""


def test_a_model_py_that_prints_a_result_and_exits_0_fails(tmp_path, files):
    proc = run_module("phase2.check", str(_zip(tmp_path / "fake.zip", {"model.py": FAKE})), *ARGS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the static read of its code for Python 3.6 / torch 1.5 passes (it is valid code); no step of the run does
    lines = [line for line in _lines(proc.stdout) if not line.startswith("PASS  Python 3.6 / torch 1.5.0")]
    assert lines[0].startswith("FAIL  unpack + Model().float(): the check process ended with code 0 without")
    assert not [line for line in lines if line.startswith("PASS")]
    assert "Traceback" not in proc.stderr


def _fifo(path: Path) -> int:
    """A FIFO at ``path``, open for reading (non-blocking): what a boxed model.py can still report on
    (opening a FIFO to write is no write to its read-only file system)."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def _drain(fd: int) -> str:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    os.close(fd)
    return data.decode()


def test_model_py_runs_once_and_never_in_the_checkers_process(tmp_path, files):
    marks = tmp_path / "marks"
    reader = _fifo(marks)
    model_py = (
        f"import os, sys\nwith open({str(marks)!r}, 'w') as fh:\n"
        "    fh.write(f'{os.getpid()} {\"phase2.check\" in sys.modules}\\n')\n" + model_zip.TEMPLATE.read_text()
    )
    marked = _with_model_py(files, tmp_path / "marked.zip", model_py)
    code, out, err, checker = _checker(str(marked), *ARGS, f"submit.checkpoints=[{files[1]}]")
    assert code == 0, out + err
    assert "PASS  parity with the in-process model (zip)" in out
    runs = _drain(reader).split("\n")[:-1]
    assert len(runs) == 1 and runs[0].split()[1] == "False" and runs[0].split()[0] != str(checker), runs
    # evaluate builds the model with the project's own template: the zip's other model.py is refused unrun
    reader = os.open(marks, os.O_RDONLY | os.O_NONBLOCK)
    with pytest.raises(UserError, match=r"its model.py is not the one ./run.sh export writes") as refused:
        _evaluate(marked, tmp_path)
    assert "\n" not in str(refused.value) and _drain(reader) == ""


# --- items 9, 10, 11: hangs, leaks, sizes ------------------------------------------------------


def test_a_model_py_that_loops_forever_is_stopped_at_the_timeout(tmp_path, capsys):
    start = time.monotonic()
    status, lines = _check_here(
        capsys, _zip(tmp_path / "loop.zip", {"model.py": "while True:\n    pass\n"}), "--timeout", "5"
    )
    assert status == 1 and time.monotonic() - start < 120
    assert any(
        line.startswith("FAIL  unpack + Model().float(): did not finish within 5 s (--timeout)") for line in lines
    )


NAMED = "import ctypes\nctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)  # PR_SET_NAME: seen in /proc/PID/comm\n"

BACKGROUND = """import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {sleeper!r}])  # holds the inherited stdout open
first = os.fork()
if first == 0:  # a daemon: double fork, a session of its own
    os.setsid()
    if os.fork() == 0:
        {named}
        time.sleep(300)
    os._exit(0)
os.waitpid(first, 0)
time.sleep(0.5)
"""


def _named(name: bytes) -> list[int]:
    """The PIDs of the live processes named ``name`` (``/proc/PID/comm``)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_bytes().strip() == name and _alive(int(entry)):
                found.append(int(entry))
    return found


def _kill_named(name: bytes) -> None:
    """Clean-up after a test that failed: the processes it started, by PID."""
    for pid in _named(name):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def test_nothing_a_model_py_starts_outlives_the_check(tmp_path, files):
    name = b"p2bg%d" % os.getpid()
    named = NAMED.format(name=name)
    sleeper = named + "import time\ntime.sleep(300)\n"
    background = BACKGROUND.format(sleeper=sleeper, named=named.replace("\n", "\n        "))
    model_py = background + model_zip.TEMPLATE.read_text()
    start = time.monotonic()
    try:
        proc = run_module(
            "phase2.check", str(_with_model_py(files, tmp_path / "bg.zip", model_py)), *ARGS, "--timeout", "120"
        )
        assert time.monotonic() - start < 100, "the check waited for a process that holds its stdout"
        assert proc.returncode == 1, proc.stdout  # no checkpoint to compare with; the organizers' lines pass
        assert "PASS  output: 4 values" in proc.stdout
        assert not _named(name)
    finally:
        _kill_named(name)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """5 MB that unpack to 1.125 GiB of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("weights.pth", "w", force_zip64=True) as fh:
            for _ in range(72):
                fh.write(chunk)
        zf.writestr("model.py", "class Model: pass\n")
    return path


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(bomb, tmp_path, capsys):
    start = time.monotonic()
    status, lines = _check_here(capsys, bomb)
    assert status == 1 and time.monotonic() - start < 30
    expected = f"FAIL  unpack + Model().float(): {bomb}: its 2 members unpack to 1152 MiB, more than"
    assert any(line.startswith(expected) for line in lines), lines
    with pytest.raises(UserError, match="unpack to 1152 MiB") as refused:
        _evaluate(bomb, tmp_path)
    assert "\n" not in str(refused.value)


MAX_RSS = """import resource, sys
from phase2.check import main
code = main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def test_a_model_py_printing_100_mb_costs_the_checker_no_memory(tmp_path, files):
    def checker_peak_kb(model_py: str) -> int:
        path = _with_model_py(files, tmp_path / f"p{len(model_py)}.zip", model_py)
        code, out, err, _ = _checker(str(path), *ARGS, script=MAX_RSS)
        assert code == 1, out + err  # no checkpoint to compare with
        return int(out.split("MAXRSS")[1].split()[0])

    quiet = checker_peak_kb(model_zip.TEMPLATE.read_text())
    loud = checker_peak_kb("import sys\nsys.stdout.write('x' * (100 << 20))\n" + model_zip.TEMPLATE.read_text())
    assert loud - quiet < 50 * 1024, (quiet, loud)  # KB; the probe saw 1.1 GB for this one


# --- item 13: hand-made zips -------------------------------------------------------------------

PLAIN_MODEL = """import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
"""


def _bad_spec(files, name: str) -> bytes:
    spec = json.loads(_members(files[0]["zip"])["model.json"])
    return {
        "missing keys": json.dumps({k: v for k, v in spec.items() if k != "channel_order"}).encode(),
        "not JSON": b"{not json",
        "a list": json.dumps(list(spec)).encode(),
    }[name]


@pytest.mark.parametrize("case", ["missing keys", "not JSON", "a list"])
def test_a_hand_made_model_json_is_a_fail_line_or_one_error(files, tmp_path, capsys, case):
    bad = _zip(tmp_path / "bad.zip", {**_members(files[0]["zip"]), "model.json": _bad_spec(files, case)})
    status, lines = _check_here(capsys, bad, f"submit.checkpoints=[{files[1]}]")
    assert status == 1
    assert any(line.startswith(f"FAIL  model.json: {bad}: model.json") for line in lines), lines
    assert any(line.startswith("FAIL  unpack + Model().float(): ") for line in lines), lines  # the template's own error
    with pytest.raises(UserError, match=rf"^eval.file: {bad}: model.json") as refused:
        _evaluate(bad, tmp_path)
    assert "\n" not in str(refused.value)


def test_a_zip_of_model_py_alone_passes_the_organizers_checks(tmp_path, capsys):
    plain = _zip(tmp_path / "plain.zip", {"model.py": PLAIN_MODEL})
    status, lines = _check_here(capsys, plain)
    assert status == 0, lines
    assert [line.split(":")[0] for line in lines if line[:4] in ("PASS", "FAIL")] == [
        "PASS  Python 3.6 / torch 1.5.0",
        "PASS  unpack + Model().float()",
        "PASS  params (ptflops)",
        "PASS  MACs (ptflops at 3x32x32)",
        "PASS  output",
    ]
    assert any(line.startswith("note  model.json: none") for line in lines)
    with pytest.raises(UserError, match=r"no model.json, weights.pth at the top level of the zip"):
        _evaluate(plain, tmp_path)


# --- item 6: a file that is not the one its budget report describes ---------------------------


def test_a_file_of_another_export_under_a_stem_is_named(files, tmp_path, capsys):
    other = _checkpoint(tmp_path, "test_convnext", 32, seed=7)
    theirs = export.run(_export_cfg(other, tmp_path / "other", "export.channel_order=bgr", "export.formats=[zip]"))
    stem = tmp_path / "mixed"
    shutil.copytree(files[0]["zip"].parent, stem)
    shutil.copy(theirs["paths"]["zip"], stem / "model.zip")  # copied in by hand over the exported one
    status, lines = _check_here(capsys, stem / "model.zip", f"submit.checkpoints=[{files[1]}]")
    assert status == 1
    assert f"FAIL  budget report: {stem / 'model.zip'} is not the file {stem / 'model.budget.json'} describes" in (
        "\n".join(lines)
    )
    with pytest.raises(UserError, match=r"^eval.file: .*model.zip is not the file .*model.budget.json describes"):
        _evaluate(stem / "model.zip", tmp_path)


# --- items 14, 15: ONNX files ------------------------------------------------------------------


def _graph(x: onnx.ValueInfoProto | None, cast: bool = False) -> onnx.ModelProto:
    """x -> (Cast) -> GlobalAveragePool -> Flatten -> Gemm -> 4 outputs; without x, a constant graph."""
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    if x is None:
        nodes = [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 4), np.float32)))]
        graph = helper.make_graph(nodes, "g", [], [y])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    rank = len(x.type.tensor_type.shape.dim)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)] if cast else []
    source = "xf" if cast else "x"
    if rank == 4:
        nodes += [helper.make_node("GlobalAveragePool", [source], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
        source = "f"
    nodes.append(helper.make_node("Gemm", [source, "w"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


ONNX_INPUTS = {
    "rank 2": (
        _graph(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])),
        "FAIL  input: the input 'x' has rank 2 (batchx3); the organizers feed N x 3 x H x W",
    ),
    "no input": (_graph(None), "FAIL  input: the graph has 0 inputs; the organizers feed one, N x 3 x H x W"),
    "float16": (
        _graph(helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3, 32, 32]), cast=True),
        "FAIL  input type: the file takes float16; the organizers feed float32",
    ),
    "uint8": (
        _graph(helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 3, 32, 32]), cast=True),
        "FAIL  input type: the file takes uint8; the organizers feed float32",
    ),
    "dynamic height and width": (
        _graph(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])),
        "PASS  input size: 3 x 'height' x 'width' (dynamic); checked at 3x32x32",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ONNX_INPUTS))
def test_onnx_inputs_the_organizers_do_not_feed_are_fail_lines(tmp_path, capsys, case):
    proto, expected = ONNX_INPUTS[case]
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp_path / "m.onnx")
    status, lines = _check_here(capsys, tmp_path / "m.onnx")
    assert status == 1 and expected in lines, lines  # (the dynamic one then fails its channel order and parity)
    if case == "dynamic height and width":
        assert "PASS  output (onnxruntime): 4 values for a zero input" in lines


def _onnx_variants(files, folder: Path) -> dict[str, tuple[Path, str]]:
    data = files[0]["onnx"].read_bytes()
    folder.mkdir()
    (folder / "random.onnx").write_bytes(os.urandom(5000))
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    proto = onnx.load(files[0]["onnx"])
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../outside.bin")
    onnx.save(proto, folder / "outside.onnx")
    out = {
        "random bytes": (folder / "random.onnx", "not a readable ONNX file"),
        "truncated": (folder / "truncated.onnx", "not a readable ONNX file"),
        "external data outside its folder": (folder / "outside.onnx", "(ValidationError: Data of TensorProto"),
    }
    for name, edit, message in (
        ("image_size abc", {"image_size": "abc"}, "metadata 'image_size' is 'abc'"),
        ("no num_classes", {"num_classes": None}, "metadata has no 'num_classes'"),
    ):
        proto = onnx.load(files[0]["onnx"])
        meta = {p.key: p.value for p in proto.metadata_props}
        meta.update(edit)
        del proto.metadata_props[:]
        for key, value in meta.items():
            if value is not None:
                proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, folder / f"{name.replace(' ', '_')}.onnx")
        out[name] = (folder / f"{name.replace(' ', '_')}.onnx", message)
    return out


def test_evaluate_on_a_broken_onnx_file_is_one_line(files, tmp_path):
    for name, (path, message) in _onnx_variants(files, tmp_path / "bad").items():
        with pytest.raises(UserError) as refused:
            _evaluate(path, tmp_path)
        text = str(refused.value)
        assert text.startswith(f"eval.file: {path}: ") and message in text and "\n" not in text, (name, text)
    assert not (tmp_path / "e" / "eval_file.json").exists()


# --- item 18 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "-3", "100000"])
def test_a_bad_image_size_is_refused_before_any_check(files, size):
    proc = run_module("phase2.check", str(files[0]["onnx"]), f"--image-size={size}", "data.num_classes=4")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: --image-size: {size} must be in 16..2048 (the organizers feed 224)"
    ]


# --- what held in the probe (issue 29), kept holding -------------------------------------------


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind.replace('/', '_')}.onnx"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "link loop":
        path.symlink_to(path)
    return path


@pytest.mark.parametrize("kind", ["folder", "fifo", "link to /dev/zero", "link loop"])
def test_what_is_not_a_file_is_one_line(tmp_path, kind):
    path = _special(tmp_path, kind)
    with pytest.raises(UserError, match=rf"^{path}: no such file$"):
        check.run([str(path)])
    with pytest.raises(UserError, match=rf"^eval.file: no such file: {path}$"):
        _evaluate(path, tmp_path)


def _external(files, folder: Path, location: str) -> Path:
    folder.mkdir()
    proto = onnx.load(files[0]["onnx"])
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "link.bin", "missing.bin"])
def test_external_data_outside_its_folder_or_missing_is_one_line(files, tmp_path, location):
    folder = tmp_path / "f"
    path = _external(files, folder, location)
    if location == "link.bin":
        (folder / "link.bin").symlink_to("/etc/passwd")
    with pytest.raises(UserError, match=rf"^{path}: not a readable ONNX file \(ValidationError: "):
        check.run([str(path), *ARGS])


def test_random_truncated_or_empty_onnx_bytes_are_one_line_or_a_fail(files, tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert _check_here(capsys, tmp_path / "empty.onnx")[0] == 1  # an empty message parses: onnx.checker fails it
    for path, _ in list(_onnx_variants(files, tmp_path / "bad").values())[:2]:
        with pytest.raises(UserError, match="not a readable ONNX file"):
            check.run([str(path), *ARGS])


def test_zip_members_with_dotdot_or_absolute_names_land_nowhere(tmp_path, capsys):
    escaped, absolute = tmp_path / "escaped.txt", tmp_path / "absolute.txt"
    climb = "../" * 12 + str(escaped).lstrip("/")  # from any unpack folder up to / and down to tmp_path
    slip = _zip(tmp_path / "slip.zip", {climb: "x", str(absolute): "x", "model.py": PLAIN_MODEL})
    status, lines = _check_here(capsys, slip)
    assert status == 0, lines
    assert not escaped.exists() and not absolute.exists()


# --- issue 34: the organizers' Python 3.6, torch 1.5 and ONNX converter ---------------------

LEGACY = "FAIL  Python 3.6 / torch 1.5.0: "


def _new_format_weights(files, dst: Path) -> Path:
    members = _members(files[0]["zip"])
    state = torch.load(io.BytesIO(members["weights.pth"]), map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the zip format of torch >= 1.6
    return _zip(dst, {**members, "weights.pth": buffer.getvalue()})


@pytest.mark.parametrize(
    "case, expected",
    [
        ("walrus", "model.py:19: Assignment expressions are only supported in Python 3.8 and greater"),
        ("torch.special", "is not in torch 1.5.0"),
        ("new-format weights", "weights.pth is in the zip format torch.save writes since torch 1.6"),
    ],
)
def test_what_the_organizers_python_36_and_torch_15_cannot_load_is_a_fail_line(files, tmp_path, capsys, case, expected):
    model_py = _members(files[0]["zip"])["model.py"].decode()
    if case == "walrus":
        bad = _with_model_py(files, tmp_path / "b.zip", model_py.replace("import os\n", "import os\n(_w := 1)\n", 1))
    elif case == "torch.special":
        bad = _with_model_py(files, tmp_path / "b.zip", model_py + "\n\ndef erf(x):\n    return torch.special.erf(x)\n")
    else:
        bad = _new_format_weights(files, tmp_path / "b.zip")
    status, lines = _check_here(capsys, bad, f"submit.checkpoints=[{files[1]}]")
    fails = [line for line in lines if line.startswith("FAIL")]
    assert status == 1 and len(fails) == 1 and fails[0].startswith(LEGACY) and expected in fails[0], lines
    if case == "torch.special":
        assert "torch.special" in fails[0]


def test_the_exported_zip_passes_the_python_36_and_torch_15_checks(files, capsys):
    status, lines = _check_here(capsys, files[0]["zip"], f"submit.checkpoints=[{files[1]}]")
    assert status == 0 and "PASS  Python 3.6 / torch 1.5.0: every .py parses as 3.6" in "\n".join(lines)


def test_an_onnx_with_sin_fails_the_organizers_converter_in_one_line(files, tmp_path, capsys):
    proto = onnx.load(str(files[0]["onnx"]))
    for node in proto.graph.node:
        if node.op_type == "Cos":
            node.op_type = "Sin"  # the GCM of exports before issue 34
    path = tmp_path / "sin.onnx"
    onnx.save(proto, str(path))
    status, lines = _check_here(capsys, path, f"submit.checkpoints=[{files[1]}]")
    fails = [line for line in lines if line.startswith("FAIL")]
    assert status == 1 and fails == [
        "FAIL  organizers' converter (onnx-pytorch code_gen): "
        "NotImplementedError: OpCodeGenerator is unimplemented for Sin."
    ]


def test_the_exported_onnx_converts_and_predicts_what_onnxruntime_does(files, capsys):
    status, lines = _check_here(capsys, files[0]["onnx"], f"submit.checkpoints=[{files[1]}]")
    text = "\n".join(lines)
    assert status == 0, text
    assert "PASS  organizers' converter (onnx-pytorch code_gen): converted; 4 values" in text
    assert "PASS  converted vs onnxruntime: 3 of 3 check images predicted the same class" in text
    assert "PASS  generated code on torch 1.5: every torch name exists in 1.5.0" in text
    assert "PASS  onnx 1.11 / onnxruntime 1.10: IR version" in text


def test_an_onnx_of_a_newer_ir_or_opset_is_a_fail_line(files, tmp_path, capsys):
    proto = onnx.load(str(files[0]["onnx"]))
    proto.ir_version = 9
    path = tmp_path / "ir9.onnx"
    onnx.save(proto, str(path))
    status, lines = _check_here(capsys, path, f"submit.checkpoints=[{files[1]}]")
    assert status == 1
    assert "FAIL  onnx 1.11 / onnxruntime 1.10: IR version 9 > 8: onnx 1.11 (the organizers') cannot load it" in lines


@pytest.mark.parametrize("where", ["tensor name", "string attribute"])
def test_code_cannot_be_pasted_into_the_generated_module_through_a_name(tmp_path, where):
    # The code generator pastes names and string attributes into Python source that the checker runs.
    evil = 'x"]); import os; os.system("touch pwned"); (["'
    node = helper.make_node("Relu", ["input"], ["out" if where == "string attribute" else evil], name="r")
    if where == "string attribute":
        node.attribute.append(helper.make_attribute("mode", evil))
    out = node.output[0]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    with pytest.raises(codegen.ConversionError, match="not a plain identifier; not generated"):
        codegen.generate(helper.make_model(graph), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not Path("pwned").exists()


# --- issue 35: NaN outputs, the box, time limits -------------------------------------------------

NAN_FORWARD = """

_forward = Model.forward


def _nan_forward(self, x):
    return _forward(self, x) * float("nan")


Model.forward = _nan_forward
"""


def _nan_onnx(files, dst: Path) -> Path:
    """The exported .onnx with every output multiplied by NaN."""
    proto = onnx.load(str(files[0]["onnx"]))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
    proto.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan_factor"))
    proto.graph.node.append(helper.make_node("Mul", [f"{out}_pre", "nan_factor"], [out]))
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("kind", ["zip", "onnx"])
def test_a_file_whose_outputs_are_nan_fails_parity(files, tmp_path, capsys, kind):
    if kind == "zip":
        bad = _with_model_py(files, tmp_path / "nan.zip", model_zip.TEMPLATE.read_text() + NAN_FORWARD)
    else:
        bad = _nan_onnx(files, tmp_path / "nan.onnx")
    status, lines = _check_here(capsys, bad, f"submit.checkpoints=[{files[1]}]")
    parity = [line for line in lines if "parity with the in-process model" in line]
    assert status == 1 and parity, lines
    assert all(line.startswith("FAIL") and "not finite (NaN or inf)" in line for line in parity), parity


def _needs_box() -> None:
    box = isolated.find_box()
    if not box.prefix:
        pytest.skip(f"no box on this machine: {box.line}")


HOSTILE = {
    # item 8: a file in the project, and an append to a file outside its temp folder
    "write": """for target, mode in (({new!r}, "w"), ({old!r}, "a")):
    try:
        with open(target, mode) as fh:
            fh.write("written by model.py\\n")
    except OSError:
        pass
""",
    # item 9: the checker's environment, through /proc/<ppid>/environ or any other process's
    "environ": """import glob, os
leaked = []
for name in [f"/proc/{{os.getppid()}}/environ", *glob.glob("/proc/*/environ")]:
    try:
        if b"s3cr3t-35" in open(name, "rb").read():
            leaked.append(name)
    except OSError:
        pass
if leaked:
    raise RuntimeError("leaked the checker's P2_FAKE_SECRET from " + " ".join(leaked))
""",
    # the network: a connection to a port this test listens on
    "network": """import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
except OSError:
    pass
""",
}


@pytest.mark.parametrize("case", ["write", "environ", "network"])
def test_a_boxed_model_py_cannot_write_read_the_checker_or_connect(tmp_path, case):
    _needs_box()
    new, old = ROOT / f".p2_written_by_model_py_{os.getpid()}", tmp_path / "outside.txt"
    old.write_text("kept\n")
    listener = socket.create_server(("127.0.0.1", 0))
    hostile = HOSTILE[case].format(new=str(new), old=str(old), port=listener.getsockname()[1])
    try:
        hostile_zip = _zip(tmp_path / "hostile.zip", {"model.py": hostile + PLAIN_MODEL})
        proc = run_module("phase2.check", str(hostile_zip), *ARGS, P2_FAKE_SECRET="s3cr3t-35")
        status, lines = proc.returncode, proc.stdout.splitlines()
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()
    finally:
        listener.close()
        written = new.exists()
        new.unlink(missing_ok=True)
    assert not written and old.read_text() == "kept\n"
    assert status == 0, lines
    assert "PASS  unpack + Model().float(): loaded in a fresh `python -I` without timm or this project" in lines
    assert any(line.startswith("note  box: Linux namespaces (unshare: user, mount, pid, net)") for line in lines)


CHAIN = """import os, time
if os.fork() == 0:  # a setsid fork chain: each generation starts the next and ends, every 3 ms, for 60 s
    os.setsid()
    end = time.time() + 60
    while time.time() < end:
        if os.fork():
            os._exit(0)
        time.sleep(0.003)
    os._exit(0)
"""


def test_a_setsid_fork_chain_does_not_outlive_the_check(tmp_path):
    _needs_box()
    name = b"p2chain%d" % os.getpid()
    model_py = NAMED.format(name=name) + CHAIN + PLAIN_MODEL
    try:
        proc = run_module("phase2.check", str(_zip(tmp_path / "chain.zip", {"model.py": model_py})), *ARGS)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(0.3)
        assert not _named(name), "the fork chain outlived the check"
    finally:
        for _ in range(20):  # a chain that escaped moves on while it is killed
            _kill_named(name)


HANG = "import time\ntime.sleep(300)\n"


def test_sigkill_of_the_checker_takes_the_check_and_its_folder_with_it(tmp_path):
    _needs_box()
    name = b"p2hang%d" % os.getpid()
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT), TMPDIR=str(temp))
    hang = _zip(tmp_path / "hang.zip", {"model.py": NAMED.format(name=name) + HANG})
    argv = [sys.executable, "-m", "phase2.check", str(hang), *ARGS]
    checker = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _named(name) and time.monotonic() < deadline and checker.poll() is None:
            time.sleep(0.1)
        assert _named(name), "model.py never ran"
        checker.kill()
        checker.wait()
        deadline = time.monotonic() + 10
        while _named(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _named(name), "the check process outlived a SIGKILLed checker"
        assert not [p.name for p in temp.iterdir() if p.name.startswith("phase2_")]
    finally:
        checker.kill()
        _kill_named(name)


def test_without_a_box_the_check_names_the_risk_and_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare on it
    isolated.find_box.cache_clear()
    try:
        status, lines = _check_here(capsys, _zip(tmp_path / "plain.zip", {"model.py": PLAIN_MODEL}))
    finally:
        isolated.find_box.cache_clear()
    assert status == 0, lines
    assert "note  box: none (no util-linux `unshare` on PATH): model.py can write wherever this user can" in "\n".join(
        lines
    )


def _endless_loop_onnx(dst: Path) -> Path:
    """A valid .onnx (opset 13, IR 7, dynamic batch) whose graph is a Loop of 1e15 iterations."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", 3, 32, 32]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", 3, 32, 32]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "input"], ["output"], body=body)],
        "endless",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [
            numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(dst))
    return dst


def test_an_onnx_that_computes_without_end_is_stopped_at_the_timeout(tmp_path, capsys):
    start = time.monotonic()
    status, lines = _check_here(capsys, _endless_loop_onnx(tmp_path / "loop.onnx"), "--timeout", "5")
    assert status == 1 and time.monotonic() - start < 60
    assert (
        "FAIL  output (onnxruntime): did not finish within 5 s (--timeout); the check process and all it started "
        "were stopped" in lines
    ), lines
    assert any(line.startswith("note  box: ") for line in lines)
