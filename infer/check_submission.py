"""``./run.sh check-submission FILE [--image-size N] [--config FILE] [key=value ...]``: the organizers' checks.

Prints one ``PASS``/``FAIL`` line per check and exits 0 only if every check passed (1 if one
failed, 2 for bad usage). Lines marked ``note`` inform and do not count.

* A ``.zip``, in a fresh ``python -I`` process where neither timm nor this project can be
  imported (:mod:`infer.zip_check_child`): unpack with ``shutil.unpack_archive``, ``from model
  import Model; Model().float()``, ptflops at 3 x S x S under ``budget.max_params`` /
  ``budget.max_gmacs``, ``data.num_classes`` outputs for a zero input. Then, in this process,
  the file against the in-process model of the config (``submit``'s model), its channel order,
  and its random pad drawing anew per call.
* An ``.onnx``: ``onnx.checker``, opset and op types within onnxruntime 1.10's range, a dynamic
  batch axis, onnxruntime parity with the in-process model, the ``onnx2pytorch`` round trip with
  its parity, ptflops on the converted model, the output size for a zero input.

S is ``--image-size`` (default 224, what the organizers feed); our own counter
(``FlopCounterMode``) is printed beside ptflops.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
import torch

from core.cli import CheckerParser, quiet_libraries, run_checker, user_path
from core.config import Config, load_config
from core.errors import UserError
from infer import onnx_file
from infer.complexity import PTFLOPS_KWARGS, count_ptflops
from infer.defended import build_defended_model, load_members, resolve_member_paths
from infer.export import count_gmacs
from infer.model_zip import load_zip_model
from infer.parity import ROUND_TRIP_ATOL, as_rgb_probabilities, box_outputs, file_parity

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "zip_check_child.py"
# What the organizers' environment did not have: timm, and of course none of this project.
BLOCKED = ("timm", "attacks", "bench", "core", "gcm", "infer", "robust", "train", "tests")
ORGANIZERS_SIZE = 224
CHILD_TIMEOUT = 600


class Checks:
    """Collects one line per check; ``failed`` counts the FAIL lines."""

    def __init__(self) -> None:
        self.failed = 0

    def add(self, ok: bool, name: str, detail: str) -> bool:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    @staticmethod
    def note(name: str, detail: str) -> None:
        print(f"note  {name}: {detail}", flush=True)


def check_budget(checks: Checks, macs: int | None, params: int | None, cfg: Config, size: int) -> None:
    """The organizers' strict limits on what ptflops counted."""
    if macs is None or params is None:
        checks.add(False, "ptflops", "could not count the model")
        return
    checks.add(
        params < cfg.budget.max_params,
        "params (ptflops)",
        f"{params / 1e6:.3f}M < budget.max_params {cfg.budget.max_params / 1e6:g}M",
    )
    checks.add(
        macs < cfg.budget.max_gmacs * 1e9,
        f"MACs (ptflops at 3x{size}x{size})",
        f"{macs / 1e9:.4g} G < budget.max_gmacs {cfg.budget.max_gmacs:g} G",
    )


def check_channel_order(checks: Checks, order: str) -> None:
    checks.add(order == "bgr", "channel order", f"the file takes {order.upper()}; the organizers feed BGR")


def in_process_model(cfg: Config, checks: Checks):
    """``submit``'s model of the config (one member, no TTA), or None with a FAIL line."""
    try:
        members, infos = load_members(resolve_member_paths(cfg), cfg.data.num_classes)
    except UserError as exc:
        checks.add(False, "parity with the in-process model", f"no model to compare with ({exc})")
        return None
    return build_defended_model(members, infos, cfg)


def run_zip_child(path: Path, cfg: Config, size: int) -> dict:
    """The organizers' steps in a clean process; returns its JSON result."""
    settings = {"blocked": BLOCKED, "image_size": size, "ptflops": PTFLOPS_KWARGS}
    with tempfile.TemporaryDirectory(prefix="phase2_check_") as workdir:
        proc = subprocess.run(
            [sys.executable, "-I", str(CHILD), str(path.resolve()), workdir, json.dumps(settings)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"load": f"the check process ended with code {proc.returncode} ({tail})"}
    return json.loads(lines[-1][len("RESULT ") :])


def check_zip(path: Path, cfg: Config, size: int, checks: Checks) -> None:
    result = run_zip_child(path, cfg, size)
    if not checks.add(
        result["load"] == "ok",
        "unpack + Model().float()",
        "loaded in a fresh `python -I` without timm or this project" if result["load"] == "ok" else result["load"],
    ):
        return
    check_budget(checks, result.get("macs"), result.get("params"), cfg, size)
    n = result.get("numel")
    checks.add(
        n == cfg.data.num_classes,
        "output",
        f"{n} values for a 1x3x{size}x{size} zero input (data.num_classes {cfg.data.num_classes})"
        if n is not None
        else result.get("output_error", "no output"),
    )
    model, spec = load_zip_model(path)
    check_channel_order(checks, spec["channel_order"])
    checks.note("our counter", f"{count_gmacs(model, size):.4g} GMACs (FlopCounterMode) at 3x{size}x{size}")
    reference = in_process_model(cfg, checks)
    if reference is not None:
        check_parity(checks, "zip", as_rgb_probabilities(model, spec["channel_order"]), reference, spec, None)


def check_parity(checks: Checks, what: str, output, reference, spec: dict, boxes) -> None:
    """The file against the in-process model at the file's size; with random pad, new draws per call."""
    size = int(spec["image_size"])
    parity = file_parity(output, reference, size, boxes)
    checks.add(
        parity["max_abs_diff"] <= ROUND_TRIP_ATOL,
        f"parity with the in-process model ({what})",
        f"max |dp| {parity['max_abs_diff']:.2g} at {size}px ({parity['compared']})",
    )
    if reference.randomized:
        with torch.no_grad():
            x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            calls = [output(x) for _ in range(4)]
        differ = sum(not torch.equal(calls[0], c) for c in calls[1:])
        checks.add(differ > 0, f"random pad ({what})", f"{differ} of 3 later calls drew another box")


def check_onnx_structure(proto: onnx.ModelProto, checks: Checks) -> bool:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        return checks.add(False, "onnx.checker", str(exc).strip().splitlines()[0])
    checks.add(True, "onnx.checker", f"valid (onnx {onnx.__version__})")
    ops = onnx_file.op_report(proto)
    checks.add(
        ops["fits_onnxruntime_1_10"],
        "onnxruntime 1.10 range",
        f"opset {ops['opset']} <= {onnx_file.ORT_110_MAX_OPSET}, {len(ops['ops'])} op types all defined there "
        f"and in the default domain: {' '.join(ops['ops'])}"
        if ops["fits_onnxruntime_1_10"]
        else f"opset {ops['opset']}, other domains {ops['other_domains']}, undefined {ops['ops_undefined_at_opset']}",
    )
    for name, known in (
        ("onnx2pytorch 0.4.1", ONNX2PYTORCH_041_OPS),
        ("the helper's onnx-pytorch", HELPER_CODEGEN_OPS),
    ):
        missing = sorted(set(ops["ops"]) - known)
        if missing:
            checks.note("2022 converters", f"{name} has no {' '.join(missing)} (the zip is the safer form)")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_param if dims else ""
    return checks.add(
        bool(batch), "dynamic batch axis", f"input dim 0 is '{batch}'" if batch else "input dim 0 is fixed"
    )


# Op types the 2022 ONNX->torch converters implement (read from their sources): onnx2pytorch
# 0.4.1 (Nov 2021, the last release before the challenge, of the repository the organizers name) and
# the onnx-pytorch 0.1.4 code generator their helper repository ships (onnx/onnx_pytorch/op_code_generators).
# Neither has Sin (onnx2pytorch added it in 2026); their README says their converter was modified.
ONNX2PYTORCH_041_OPS = frozenset(
    "Add And AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv "
    "ConvTranspose Div Elu Equal Erf Exp Expand Flatten Floor Gather GatherND Gemm GlobalAveragePool "
    "Greater Identity InstanceNormalization LSTM LeakyRelu Less Log Loop MatMul Max MaxPool Min Mul "
    "NonMaxSuppression Not OneHot Or PRelu Pad Pow Range Reciprocal ReduceMax ReduceMean ReduceMin "
    "ReduceProd ReduceSum Relu Reshape Resize Scatter ScatterElements ScatterND Shape Sigmoid Slice "
    "Softmax Softplus Softsign Split Sqrt Squeeze Sub Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze "
    "Upsample Where".split()
)
HELPER_CODEGEN_OPS = frozenset(
    "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BitShift "
    "Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh Div Dropout Elu Equal Erf "
    "Exp Expand Flatten Floor Gather GatherND Gemm GlobalAveragePool Greater Identity "
    "InstanceNormalization LRN LeakyRelu Less Log MatMul Max MaxPool Mul NonMaxSuppression NonZero Not "
    "PRelu Pad Pow Reciprocal ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize RoiAlign "
    "Round Scatter ScatterElements Shape Sigmoid Slice Softmax Split Sqrt Squeeze Sub Tanh TopK Transpose "
    "Unsqueeze Upsample Where".split()
)


def check_onnx(path: Path, cfg: Config, size: int, checks: Checks) -> None:
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others on a file that is not ONNX
        raise UserError(f"{path}: not an ONNX file ({type(exc).__name__})") from None
    if not check_onnx_structure(proto, checks):
        return
    meta = onnx_file.read_metadata(proto)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    checks.add(
        dims == [3, size, size], "input size", f"the file takes 3x{dims[1]}x{dims[2]}; checked at 3x{size}x{size}"
    )
    if dims != [3, size, size]:
        return
    check_channel_order(checks, meta.get("channel_order", "rgb"))
    data = proto.SerializeToString()
    session = onnx_file.create_session(data)
    zeros = onnx_file.run_session(session, torch.zeros(1, 3, size, size))
    ok = checks.add(
        zeros.numel() == cfg.data.num_classes, "output (onnxruntime)", f"{zeros.numel()} values for a zero input"
    )
    try:
        converted = onnx_file.convert_to_torch(proto)
        with torch.no_grad():
            n = converted(torch.zeros(1, 3, size, size)).numel()
    except Exception as exc:  # the conversion or the converted graph's first run, whatever it raises
        checks.add(False, "onnx2pytorch", f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    checks.add(n == cfg.data.num_classes, "onnx2pytorch", f"converted; {n} values for a zero input")
    macs, params = count_ptflops(converted, (3, size, size))
    check_budget(checks, macs, params, cfg, size)
    checks.note("our counter", f"{count_gmacs(converted, size):.4g} GMACs (FlopCounterMode) on the converted model")
    reference = in_process_model(cfg, checks)
    if reference is None or not ok:
        return
    spec = {"image_size": size}
    boxes = box_outputs(reference, size) if reference.randomized else None
    order = meta.get("channel_order", "rgb")
    ort_output = as_rgb_probabilities(lambda v: onnx_file.run_session(session, v), order)
    check_parity(checks, "onnxruntime", ort_output, reference, spec, boxes)
    check_parity(checks, "onnx2pytorch", as_rgb_probabilities(converted, order), reference, spec, boxes)


def create_check_parser() -> argparse.ArgumentParser:
    parser = CheckerParser(prog="run.sh check-submission", description="The organizers' checks of a Phase II file.")
    parser.add_argument("file", help="a .zip (model.py at its top level) or an .onnx file")
    parser.add_argument("--image-size", type=int, default=ORGANIZERS_SIZE, help="input side (organizers: 224)")
    parser.add_argument("--config", default=None, help="config with the budget limits and the model to compare with")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def run(argv: Sequence[str]) -> int:
    """Run every check of FILE; returns 0 when all passed, else 1."""
    args = create_check_parser().parse_intermixed_args(argv)
    cfg = load_config(user_path(args.config), args.overrides)
    path = user_path(args.file)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix not in (".zip", ".onnx"):
        raise UserError(f"{path}: a Phase II submission is a .zip or an .onnx file")
    if args.image_size != ORGANIZERS_SIZE:
        Checks.note("input size", f"checking at {args.image_size}px; the organizers feed {ORGANIZERS_SIZE}px")
    checks = Checks()
    (check_zip if path.suffix == ".zip" else check_onnx)(path, cfg, args.image_size, checks)
    print(f"{path}: {'OK' if not checks.failed else f'FAILED ({checks.failed} check(s))'}")
    return 1 if checks.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    return run_checker(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
