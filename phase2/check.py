"""``./run.sh check-submission FILE [--image-size N] [--timeout S] [--config FILE] [key=value ...]``:
the organizers' checks.

Prints one ``PASS``/``FAIL`` line per check and exits 0 only if every check passed (1 if one
failed, 2 for bad usage, refused before any check). Lines marked ``note`` inform and do not count.

* A ``.zip``: its ``model.py`` never runs in this process. A fresh ``python -I`` process where
  neither timm nor this project can be imported (:mod:`phase2.check_child`), isolated by
  :func:`phase2.isolated.run_isolated` (in a box of Linux namespaces where the kernel allows one,
  :mod:`phase2.box`: read-only file system but its own tmpfs, no network, no other process seen,
  killed with the checker; a ``note  box:`` line says which, or names the risk; a session of its
  own; everything it started stopped when it ends or at ``--timeout``; its output to a file; its
  results on a channel its stdout is not)
  takes the organizers' steps: unpack with ``shutil.unpack_archive`` (declared sizes checked
  first), ``from model import Model; Model().float()``, ptflops at 3 x S x S under
  ``budget.max_params`` / ``budget.max_gmacs``, ``data.num_classes`` outputs for a zero input;
  and records the model's outputs on the parity images. This process compares those with the
  in-process model of the config (``submit``'s model), reads the channel order from
  ``model.json`` (read from the zip, not unpacked here), and checks that the random pad draws
  anew per call. A zip without ``model.json`` (the organizers accept ``model.py`` alone) gets the
  organizers' checks and a note.
* An ``.onnx``: ``onnx.checker``, opset and op types within onnxruntime 1.10's range, IR version
  <= 8 (onnx 1.11), one float32 N x 3 x H x W input with a dynamic batch axis (H and W equal to
  S, or dynamic); then, in the boxed process of a zip's check and under the same ``--timeout``
  (:mod:`phase2.onnx_child`: a graph may compute without end, and the generated code is code),
  onnxruntime, the organizers' conversion (the onnx-pytorch code generator,
  :mod:`phase2.codegen`) and the torch 1.5 names of the code it writes, the converted module
  against onnxruntime on the check images (every image the same class), onnxruntime and the
  converted module against the in-process model, ptflops on the converted model, the output size
  for a zero input.
* A zip's files are also read for the organizers' environment (:mod:`phase2.legacy_env`): every
  ``.py`` parses under Python 3.6 and names only torch 1.5.0 API, every ``.pth``/``.pt`` is in
  the pre-1.6 format.
* Either: where a ``<stem>.budget.json`` lies beside the file, it must record the file's sha256
  (else the file is not the one that export checked and reported).

S is ``--image-size`` (default 224, what the organizers feed); our own counter
(``FlopCounterMode``) is printed beside ptflops.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import onnx
import torch

from core.cli import CheckerParser, quiet_libraries, run_checker, user_path
from core.config import Config, load_config
from core.errors import UserError, echo
from infer.defended import build_defended_model, load_members, resolve_member_paths
from phase2 import legacy_env, model_zip, onnx_child, onnx_file
from phase2.complexity import PTFLOPS_KWARGS
from phase2.export import recorded_file_problem
from phase2.isolated import Finished, run_isolated
from phase2.parity import (
    ROUND_TRIP_ATOL,
    ROUND_TRIP_SEEDS,
    Replay,
    box_outputs,
    check_images,
    file_parity,
)

CHILD = Path(__file__).resolve().parent / "check_child.py"
# What the organizers' environment did not have: timm, and of course none of this project.
BLOCKED = ("timm", "attacks", "bench", "core", "gcm", "infer", "robust", "train", "tests")
ORGANIZERS_SIZE = 224
MIN_SIZE, MAX_SIZE = 16, 2048  # data.image_size's least; far above any size the challenge used
DEFAULT_TIMEOUT = 600.0
PAD_CALLS = 4  # calls in a row of which the random pad must draw more than one box
MATCH_CALLS = 3  # outputs of a randomized .onnx compared with every box (phase2.parity.matches_some_box)


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


def check_recorded(path: Path, checks: Checks) -> None:
    """The file against the sha256 its stem's budget JSON records (export's report of this very file)."""
    budget, problem = recorded_file_problem(path)
    if budget is None:
        checks.note("budget report", f"no {path.with_suffix('').name}.budget.json beside it: not compared")
    else:
        checks.add(problem is None, "budget report", problem or f"its sha256 is the one {budget.name} records")


def in_process_model(cfg: Config) -> tuple[object, str | None]:
    """``submit``'s model of the config (one member, no TTA), or None and why there is none."""
    try:
        members, infos = load_members(resolve_member_paths(cfg), cfg.data.num_classes)
    except UserError as exc:
        return None, f"no model to compare with ({exc})"
    return build_defended_model(members, infos, cfg), None


def check_parity(checks: Checks, what: str, output, reference, spec: dict, boxes, pad_calls=None) -> None:
    """The file against the in-process model at the file's size; with random pad, new draws per
    call (``pad_calls``: outputs of calls in a row recorded elsewhere, else made here)."""
    size = int(spec["image_size"])
    try:
        parity = file_parity(output, reference, size, boxes)
    except (ValueError, RuntimeError) as exc:  # a recorded output of another shape, a graph that fails
        checks.add(False, f"parity with the in-process model ({what})", f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    diff = parity["max_abs_diff"]
    if math.isnan(diff):
        checks.add(False, f"parity with the in-process model ({what})", "its outputs are not finite (NaN or inf)")
        return
    checks.add(
        diff <= ROUND_TRIP_ATOL,
        f"parity with the in-process model ({what})",
        f"max |dp| {diff:.2g} at {size}px ({parity['compared']})",
    )
    if reference.randomized:
        if pad_calls is None:
            with torch.no_grad():
                x = check_images(size)[:2]
                pad_calls = [output(x) for _ in range(PAD_CALLS)]
        differ = sum(not torch.equal(pad_calls[0], c) for c in pad_calls[1:])
        checks.add(differ > 0, f"random pad ({what})", f"{differ} of {len(pad_calls) - 1} later calls drew another box")


# --- the zip ----------------------------------------------------------------------------------


def run_zip_child(path: Path, size: int, timeout: float, request: dict) -> Finished:
    """The organizers' steps in an isolated, boxed ``python -I`` process (:func:`phase2.isolated.run_isolated`)."""
    settings = {
        "blocked": list(BLOCKED),
        "image_size": size,
        "ptflops": PTFLOPS_KWARGS,
        "max_unpacked": model_zip.MAX_UNPACKED_BYTES,
    }
    # Both reach it as open files: the request file is unnamed (nothing left behind, even after
    # SIGKILL), and the zip is read wherever it lies (the box hides /dev/shm behind its own).
    with tempfile.TemporaryFile() as request_file, path.open("rb") as zip_file:
        torch.save({**request, "settings": settings}, request_file)
        request_file.flush()
        fds = (zip_file.fileno(), request_file.fileno())

        def argv_for(workdir: str) -> list[str]:
            return [sys.executable, "-I", str(CHILD), f"/proc/self/fd/{fds[0]}", workdir, f"/proc/self/fd/{fds[1]}"]

        return run_isolated(argv_for, timeout, model_zip.MAX_UNPACKED_BYTES + (128 << 20), fds)


def _missing(done: Finished, timeout: float) -> str:
    """Why the check process reported nothing for a step."""
    if done.timed_out:
        return f"did not finish within {timeout:g} s (--timeout); the check process and all it started were stopped"
    tail = (done.output_tail.strip().splitlines() or ["no output"])[-1][:200]
    return f"the check process ended with code {done.returncode} without reporting it (last output: {tail})"


def zip_spec(path: Path, checks: Checks) -> dict | None:
    """The zip's checked ``model.json`` (read, not unpacked), or None with a note or a FAIL line."""
    try:
        spec = model_zip.read_spec(path)
    except UserError as exc:
        checks.add(False, "model.json", str(exc))
        return None
    if spec is None:
        checks.note("model.json", "none: not a zip ./run.sh export wrote; channel order and parity not checked")
    return spec


def parity_request(reference, spec: dict | None) -> dict:
    """What the check process records for the parity with the in-process model (nothing without both)."""
    if reference is None or spec is None:
        return {"x": None}
    x = check_images(int(spec["image_size"]))
    return {
        "x": x.flip(1) if spec["channel_order"] == "bgr" else x,  # fed in the file's own channel order
        "seeds": list(ROUND_TRIP_SEEDS) if reference.randomized else [None],
        "calls": PAD_CALLS if reference.randomized else 0,
    }


def check_zip(path: Path, cfg: Config, size: int, checks: Checks, timeout: float = DEFAULT_TIMEOUT) -> None:
    try:
        model_zip.open_zip(path).close()
    except UserError as exc:
        checks.add(False, "unpack + Model().float()", str(exc))
        return
    check_zip_environment(path, checks)
    spec = zip_spec(path, checks)
    reference, no_reference = in_process_model(cfg) if spec is not None else (None, None)
    done = run_zip_child(path, size, timeout, parity_request(reference, spec))
    load = done.results.get("load") or _missing(done, timeout)
    loaded = checks.add(
        load == "ok",
        "unpack + Model().float()",
        "loaded in a fresh `python -I` without timm or this project" if load == "ok" else load,
    )
    if loaded:
        check_zip_steps(checks, done, cfg, size, timeout)
    if done.garbled:
        checks.add(False, "check process", "its result channel held more than its reports")
    checks.note("box", done.box)
    if done.stopped:
        checks.note("processes", f"the check left {done.stopped} process(es) running; all were stopped")
    if loaded and spec is not None:
        check_channel_order(checks, spec["channel_order"])
    if "our_gmacs" in done.results:
        checks.note("our counter", f"{done.results['our_gmacs']:.4g} GMACs (FlopCounterMode) at 3x{size}x{size}")
    if loaded and no_reference:
        checks.add(False, "parity with the in-process model", no_reference)
    if loaded and reference is not None:
        check_replayed_parity(checks, done, reference, spec, timeout)
    check_recorded(path, checks)


def check_zip_environment(path: Path, checks: Checks) -> None:
    """The zip's files read for the organizers' Python 3.6 / torch 1.5 (:mod:`phase2.legacy_env`)."""
    try:
        problems = zip_environment_problems(path)
    except UserError as exc:  # a member too big or unreadable
        problems = [str(exc)]
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
        problems = [f"{path}: cannot read a member of the zip ({type(exc).__name__}: {exc})"]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    checks.add(
        not problems,
        "Python 3.6 / torch 1.5.0",
        problems[0] + more if problems else "every .py parses as 3.6 and names torch 1.5.0 API; weights legacy format",
    )


def zip_environment_problems(path: Path) -> list[str]:
    """What in the zip's ``.py``, ``.pth`` and ``.pt`` files the organizers' environment cannot load."""
    problems = []
    with model_zip.open_zip(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".py"):
                raw = model_zip.read_member(zf, info.filename, path, model_zip.MAX_TEXT_BYTES) or b""
                source = raw.decode("utf-8", errors="replace")
                problems += legacy_env.syntax_problems(source, info.filename)
                problems += legacy_env.torch_name_problems(source, info.filename)
            elif info.filename.endswith((".pth", ".pt")):
                with zf.open(info) as fh:
                    problem = legacy_env.weights_problem(fh.read(4), info.filename)
                problems += [problem] if problem else []
    return problems


def check_zip_steps(checks: Checks, done: Finished, cfg: Config, size: int, timeout: float) -> None:
    """The organizers' lines after the load: ptflops within the budget, the output size."""
    result = done.results
    if "macs" in result:
        check_budget(checks, result["macs"], result["params"], cfg, size)
    else:
        checks.add(False, "ptflops", result.get("macs_error") or _missing(done, timeout))
    n = result.get("numel")
    detail = (
        f"{n} values for a 1x3x{size}x{size} zero input (data.num_classes {cfg.data.num_classes})"
        if n is not None
        else result.get("output_error") or _missing(done, timeout)
    )
    checks.add(n == cfg.data.num_classes, "output", detail)


def check_replayed_parity(checks: Checks, done: Finished, reference, spec: dict, timeout: float) -> None:
    """The outputs the check process recorded against the in-process model (and the random pad's draws)."""
    outputs = done.results.get("outputs")
    if not isinstance(outputs, dict):
        reason = done.results.get("outputs_error") or _missing(done, timeout)
        checks.add(False, "parity with the in-process model (zip)", reason)
        return
    try:
        seeded = [torch.tensor(o, dtype=torch.float32).exp() for o in outputs["seeded"]]
        in_a_row = [torch.tensor(o, dtype=torch.float32) for o in outputs["in_a_row"]]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        checks.add(False, "parity with the in-process model (zip)", f"unreadable outputs ({type(exc).__name__})")
        return
    replay = Replay(check_images(int(spec["image_size"])), seeded)
    check_parity(checks, "zip", replay, reference, spec, None, in_a_row)


# --- the ONNX file ----------------------------------------------------------------------------


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
    problem = legacy_env.onnx_version_problem(proto.ir_version, ops["opset"])
    checks.add(
        problem is None,
        "onnx 1.11 / onnxruntime 1.10",
        problem
        or f"IR version {proto.ir_version} <= {legacy_env.MAX_IR_VERSION}, opset {ops['opset']} <= "
        f"{legacy_env.MAX_OPSET}",
    )
    return True


def check_onnx_input(proto: onnx.ModelProto, size: int, checks: Checks) -> bool:
    """One float32 N x 3 x S x S input, N dynamic (S fixed, or H and W dynamic)."""
    info, problem = onnx_file.graph_input(proto)
    if problem:
        return checks.add(False, "input", problem)
    if info["type"] != "float":
        return checks.add(False, "input type", f"the file takes {info['type']}; the organizers feed float32")
    batch, channels, height, width = info["dims"]
    dynamic = isinstance(batch, str)
    if not checks.add(
        dynamic, "dynamic batch axis", f"input dim 0 is '{batch}'" if dynamic else "input dim 0 is fixed"
    ):
        return False
    if all(isinstance(d, str) for d in (height, width)) and channels == 3:
        return checks.add(True, "input size", f"3 x '{height}' x '{width}' (dynamic); checked at 3x{size}x{size}")
    fix = f" (check it with --image-size {height})" if channels == 3 and height == width != size else ""
    return checks.add(
        [channels, height, width] == [3, size, size],
        "input size",
        f"the file takes {channels}x{height}x{width}; checked at 3x{size}x{size}{fix}",
    )


def check_onnx(path: Path, cfg: Config, size: int, checks: Checks, timeout: float = DEFAULT_TIMEOUT) -> None:
    proto = onnx_file.load_onnx(path)
    if check_onnx_structure(proto, checks) and check_onnx_input(proto, size, checks):
        check_onnx_model(proto, cfg, size, checks, timeout)
    check_recorded(path, checks)


def onnx_request(reference, order: str, size: int) -> dict:
    """What the check process records: outputs on the check images in the file's channel order,
    as many calls as the parity with ``reference`` asks for (one to compare the two with each other)."""
    x = check_images(size)
    randomized = reference is not None and reference.randomized
    return {
        "image_size": size,
        "x": x.flip(1) if order == "bgr" else x,
        "calls": MATCH_CALLS if randomized else 1,
        "pad_calls": PAD_CALLS if randomized else 0,
    }


def run_onnx_child(data: bytes, timeout: float, request: dict) -> Finished:
    """onnxruntime and the organizers' converter on the file, in the boxed process of a zip's check
    (:mod:`phase2.onnx_child`): a graph may compute without end, and the generated code is code."""
    with tempfile.TemporaryFile() as graph, tempfile.TemporaryFile() as request_file:
        graph.write(data)
        graph.flush()
        torch.save(request, request_file)
        request_file.flush()
        fds = (graph.fileno(), request_file.fileno())

        def argv_for(workdir: str) -> list[str]:
            return onnx_child.command(f"/proc/self/fd/{fds[0]}", workdir, f"/proc/self/fd/{fds[1]}")

        return run_isolated(argv_for, timeout, 2 * len(data) + (256 << 20), fds)


def check_onnx_model(proto: onnx.ModelProto, cfg: Config, size: int, checks: Checks, timeout: float) -> None:
    """What the file computes: onnxruntime, the onnx-pytorch conversion, ptflops, parity."""
    order = onnx_file.read_metadata(proto).get("channel_order", "rgb")
    if order in ("rgb", "bgr"):
        check_channel_order(checks, order)
    else:
        checks.add(False, "channel order", f"its metadata channel_order is {echo(order)}, neither rgb nor bgr")
    reference, no_reference = in_process_model(cfg)
    if reference is not None and onnx_file.read_metadata(proto).get("gcm_form") == "cos":
        reference = onnx_file.onnx_defended_model(reference)  # what export put in the file
    done = run_onnx_child(proto.SerializeToString(), timeout, onnx_request(reference, order, size))
    checks.note("box", done.box)
    result = done.results
    if "ort_numel" not in result:
        checks.add(False, "output (onnxruntime)", result.get("ort_numel_error") or _missing(done, timeout))
        return
    ok = checks.add(
        result["ort_numel"] == cfg.data.num_classes,
        "output (onnxruntime)",
        f"{result['ort_numel']} values for a zero input",
    )
    if check_conversion(checks, done, cfg, timeout):
        check_converted_model(checks, done, cfg, size)
        if no_reference:
            checks.add(False, "parity with the in-process model", no_reference)
        if reference is not None and ok and order in ("rgb", "bgr"):
            check_onnx_parity(checks, done, reference, size)


def check_conversion(checks: Checks, done: Finished, cfg: Config, timeout: float) -> bool:
    """The organizers' conversion (:mod:`phase2.codegen`): the generated module's output size and its
    code's torch names; False after a FAIL line."""
    result, name = done.results, "organizers' converter (onnx-pytorch code_gen)"
    n = result.get("gen_numel")
    if n is None:
        why = result.get("converted_error") or result.get("gen_numel_error") or _missing(done, timeout)
        return checks.add(False, name, why)
    checks.add(n == cfg.data.num_classes, name, f"converted; {n} values for a zero input")
    problems = legacy_env.torch_name_problems(result.get("source", ""), "generated model.py")
    checks.add(
        not problems, "generated code on torch 1.5", problems[0] if problems else "every torch name exists in 1.5.0"
    )
    return True


def _recorded(outputs: object) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The log-probabilities the check process recorded (on the check images; calls in a row), or None."""
    try:
        return (
            [torch.tensor(o, dtype=torch.float32) for o in outputs["on_x"]],
            [torch.tensor(o, dtype=torch.float32) for o in outputs["in_a_row"]],
        )
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None


def check_converted_model(checks: Checks, done: Finished, cfg: Config, size: int) -> None:
    """ptflops on the converted module, and its predictions against onnxruntime's."""
    result = done.results
    macs, params = result.get("ptflops") or (None, None)
    check_budget(checks, macs, params, cfg, size)
    if "our_gmacs" in result:
        checks.note("our counter", f"{result['our_gmacs']:.4g} GMACs (FlopCounterMode) on the converted model")
    by_ort, by_gen = _recorded(result.get("ort_outputs")), _recorded(result.get("gen_outputs"))
    if by_ort is None or by_gen is None or by_ort[0][0].shape != by_gen[0][0].shape:
        why = result.get("ort_outputs_error") or result.get("gen_outputs_error") or "no outputs of the same shape"
        checks.add(False, "converted vs onnxruntime", why)
        return
    same = int((by_ort[0][0].argmax(1) == by_gen[0][0].argmax(1)).sum())
    n = len(by_ort[0][0])
    checks.add(same == n, "converted vs onnxruntime", f"{same} of {n} check images predicted the same class")


def check_onnx_parity(checks: Checks, done: Finished, reference, size: int) -> None:
    """onnxruntime's and the converted module's recorded outputs against the in-process model."""
    boxes = box_outputs(reference, size) if reference.randomized else None
    for what, key in (("onnxruntime", "ort_outputs"), ("code_gen", "gen_outputs")):
        recorded = _recorded(done.results.get(key))
        if recorded is None:
            checks.add(False, f"parity with the in-process model ({what})", "no outputs recorded")
            continue
        replay = Replay(check_images(size), [o.exp() for o in recorded[0]])
        check_parity(checks, what, replay, reference, {"image_size": size}, boxes, recorded[1] or None)


# --- the command ------------------------------------------------------------------------------


def create_check_parser() -> argparse.ArgumentParser:
    parser = CheckerParser(prog="run.sh check-submission", description="The organizers' checks of a Phase II file.")
    parser.add_argument("file", help="a .zip (model.py at its top level) or an .onnx file")
    parser.add_argument(
        "--image-size", type=int, default=ORGANIZERS_SIZE, help=f"input side, {MIN_SIZE}..{MAX_SIZE} (organizers: 224)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds the boxed check process (a zip's model.py; an .onnx's runs) may take (default 600)",
    )
    parser.add_argument("--config", default=None, help="config with the budget limits and the model to compare with")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def run(argv: Sequence[str]) -> int:
    """Run every check of FILE; returns 0 when all passed, else 1."""
    args = create_check_parser().parse_intermixed_args(argv)
    if not MIN_SIZE <= args.image_size <= MAX_SIZE:
        raise UserError(f"--image-size: {args.image_size} must be in {MIN_SIZE}..{MAX_SIZE} (the organizers feed 224)")
    if not 0 < args.timeout <= 86400:
        raise UserError(f"--timeout: {args.timeout:g} must be a number of seconds in (0, 86400]")
    cfg = load_config(user_path(args.config), args.overrides)
    path = user_path(args.file)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix not in (".zip", ".onnx"):
        raise UserError(f"{path}: a Phase II submission is a .zip or an .onnx file")
    if args.image_size != ORGANIZERS_SIZE:
        Checks.note("input size", f"checking at {args.image_size}px; the organizers feed {ORGANIZERS_SIZE}px")
    checks = Checks()
    if path.suffix == ".zip":
        check_zip(path, cfg, args.image_size, checks, args.timeout)
    else:
        check_onnx(path, cfg, args.image_size, checks, args.timeout)
    print(f"{path}: {'OK' if not checks.failed else f'FAILED ({checks.failed} check(s))'}")
    return 1 if checks.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    return run_checker(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
