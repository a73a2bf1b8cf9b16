"""``./run.sh export``: the Phase II files the organizers accept, an in-process file, a budget report.

``export.formats`` picks what is written beside ``<stem>.budget.json`` (stem: ``export.path``
without its suffix, default ``runs/<name>/<name>``):

* ``<stem>.onnx`` and ``<stem>.zip``: the Phase II model submission, in the two forms the
  organizers took (their helper repository ``CdtQin/CVPR2022-AISafety-Helper``): an ONNX file
  (:mod:`phase2.onnx_file`), or a zip with ``model.py`` at its top level that loads its own
  weights in plain torch (:mod:`phase2.model_zip`). Both hold one model without TTA (the final
  round forbade ensembles), fed N x 3 x size x size in [0, 1] in ``export.channel_order`` (the
  organizers feed BGR), with GCM (float32) and, if enabled, the random resize-pad inside (the
  .onnx: GCM's ``cos`` form and no random pad, so the organizers' converter reads it), and
  return N x num_classes log-probabilities (why: README, "Phase II").
* ``<stem>.pt2``: the whole in-process model ``submit`` uses (GCM, TTA, ensemble) as a
  ``torch.export`` program taking RGB and returning probabilities; not a Phase II interface.

Nothing is written unless every file reproduces the in-process model: the zip's ``Model()``
loaded from its bytes, the ONNX file in onnxruntime and converted back by the organizers'
converter (the onnx-pytorch code generator, :mod:`phase2.codegen`)
(probabilities within ``ROUND_TRIP_ATOL``; with the random pad draw for draw where the draws can
be replayed, else each output matches one box the layer can draw), and the pt2 program.

The budget report counts parameters and multiply-accumulates two ways: ``FlopCounterMode`` of
the whole defended model at its input size (our counter), and ptflops on each Phase II file at
3 x 224 x 224, as the organizers counted (:mod:`phase2.complexity`). Both are checked against
``budget.max_params`` / ``budget.max_gmacs`` (the organizers' rule: params < 30M, ptflops MACs <
5G); ``budget.enforce=true`` turns a breach into an error and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.devices import default_device
from core.errors import UserError
from core.io import atomic_write_files, read_json, remove_leftovers
from core.model import count_params
from core.outputs import check_outputs, hold_output, record_owner
from gcm import DefendedModel
from infer.defended import View, build_defended_model, describe, input_size_of, load_members, resolve_member_paths
from phase2 import codegen, model_zip, onnx_file
from phase2.complexity import count_ptflops
from phase2.parity import (
    ROUND_TRIP_ATOL,
    as_rgb_probabilities,
    check_round_trip,
    file_parity,
    placed,
)

EXAMPLE_BATCH = 2  # traced batch size; the check runs another one to prove the batch is dynamic
MAX_BATCH = 65536


class ProbabilityOutput(nn.Module):
    """Log-probabilities of the defended model -> probabilities (the Phase II interface)."""

    def __init__(self, model: DefendedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).exp()


def count_gmacs(model: nn.Module, image_size: int) -> float:
    """Multiply-accumulates (in G) of one forward of one image: FlopCounterMode FLOPs / 2.

    Counts matmuls and convolutions (what the rules' budgets count); elementwise ops such as
    GCM's sine and the resizes are free, as in fvcore/thop.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, image_size, image_size))
    return counter.get_total_flops() / 2 / 1e9


def budget_report(model: DefendedModel, image_size: int, cfg: Config, checkpoints: Sequence[str] = ()) -> dict:
    """Params and GMACs of the whole defended model and of each member, checked against the limits.

    Args:
        model: the defended model (GCM, random pad, every member, every TTA view).
        image_size: side of the images the model is fed (the largest member's input size).
        cfg: supplies ``budget.max_params`` / ``budget.max_gmacs``.
        checkpoints: member paths, recorded in the per-member rows when given.
    """
    ens = model.model
    views = len(ens.views)
    members = []
    for i, (member, size) in enumerate(zip(ens.members, ens.image_sizes)):
        per_view = count_gmacs(member, size)
        members.append(
            {
                **({"checkpoint": str(checkpoints[i])} if i < len(checkpoints) else {}),
                "image_size": size,
                "params": count_params(member),
                "gmacs_per_view": per_view,
                "gmacs": per_view * views,
            }
        )
    report = {
        "params": sum(m["params"] for m in members),
        "gmacs": count_gmacs(model, image_size),
        "members": members,
        "tta_views": views,
        "input_size": image_size,
        "max_params": cfg.budget.max_params,
        "max_gmacs": cfg.budget.max_gmacs,
    }
    breaches = []
    if report["params"] > cfg.budget.max_params:
        breaches.append(
            f"{report['params'] / 1e6:.2f}M parameters > budget.max_params {cfg.budget.max_params / 1e6:g}M"
        )
    if report["gmacs"] > cfg.budget.max_gmacs:
        breaches.append(f"{report['gmacs']:.4g} GMACs per image > budget.max_gmacs {cfg.budget.max_gmacs:g}")
    report["breaches"] = breaches
    report["within_budget"] = not breaches
    return report


def format_report(report: dict) -> list[str]:
    """The console lines of a budget report (the warning, if any, comes from ``run``)."""
    lines = [
        f"budget: {report['params'] / 1e6:.2f}M params, {report['gmacs']:.4g} GMACs per image "
        f"({len(report['members'])} member(s) x {report['tta_views']} TTA view(s) at {report['input_size']}px); "
        f"limits {report['max_params'] / 1e6:g}M params, {report['max_gmacs']:g} GMACs"
    ]
    for i, m in enumerate(report["members"]):
        lines.append(
            f"  member {i}: {m['params'] / 1e6:.2f}M params, {m['gmacs_per_view']:.4g} GMACs per view "
            f"at {m['image_size']}px, {m['gmacs']:.4g} GMACs for {report['tta_views']} view(s)"
        )
    return lines


def export_program(model: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` for (N, 3, size, size) float32 inputs, N dynamic."""
    example = torch.rand(EXAMPLE_BATCH, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:  # torch.export raises many types; all mean "this model does not trace"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(
            f"export: torch.export cannot capture this model ({type(exc).__name__}: {first}); "
            "rerun with --debug for the trace"
        ) from exc


def serialize_program(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(data: bytes) -> nn.Module:
    """The callable module of a serialized program, as a user would load the file."""
    return torch.export.load(io.BytesIO(data)).module()


def random_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the random ops in the program's graph (the draws of the random resize-pad)."""
    return [
        str(node.target) for node in program.graph.nodes if node.op == "call_function" and "rand" in str(node.target)
    ]


def check_phase2_model(model: DefendedModel) -> None:
    """The Phase II files hold one model without TTA (the final round forbade ensembles)."""
    ens = model.model
    if len(ens.members) != 1 or list(ens.views) != [View()]:
        raise UserError(
            f"export: the Phase II files (export.formats onnx, zip) hold one model without TTA; this config has "
            f"{len(ens.members)} member(s) and {len(ens.views)} TTA view(s); set export.formats=[pt2] to export "
            "the whole in-process model"
        )


def create_onnx_file(
    model: DefendedModel, info: dict, cfg: Config, size: int, device: torch.device | None = None
) -> tuple[bytes, dict]:
    """The ONNX file and its report (ops, onnxruntime parity, the organizers' conversion and its
    parity, ptflops of the converted module).

    The file holds GCM's ``cos`` form and no random pad (:func:`phase2.onnx_file.onnx_defended_model`);
    its parity is checked against that model. The file is written from the model on the CPU; the
    parity checks run on ``device`` (the GPU, with onnxruntime's CUDA provider where it has it)."""
    device = torch.device("cpu") if device is None else device
    order = cfg.export.channel_order
    if model.randomized:
        print(
            "note: the .onnx leaves out the random resize-pad (the organizers' converter needs "
            "constant pads); the .zip keeps it"
        )
    model = onnx_file.onnx_defended_model(model)
    metadata = {
        "channel_order": order,
        "image_size": size,
        "num_classes": cfg.data.num_classes,
        "output": "log_probabilities",
        "gcm": cfg.gcm.enabled,
        "gcm_form": "cos",
        "random_pad": False,
        "checkpoint_sha256": info.get("sha256", ""),
    }
    proto = onnx_file.export_onnx(onnx_file.create_file_model(model, order), size, metadata)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    session = onnx_file.create_session(data, gpu=device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="phase2_codegen_") as out_dir:
        try:
            converted, _ = codegen.convert(proto, Path(out_dir))
            with torch.no_grad():
                converted(torch.zeros(1, 3, size, size))
        except Exception as exc:  # the generator or the generated module's first run, whatever it raises
            raise UserError(
                f"export: the organizers' converter (onnx-pytorch code_gen) fails on the .onnx ({exc})"
            ) from exc
        macs, params = count_ptflops(converted, (3, size, size))
        with placed(device, model, converted):
            report = {
                **onnx_file.op_report(proto),
                "ir_version": proto.ir_version,
                "onnxruntime": file_parity(
                    as_rgb_probabilities(lambda v: onnx_file.run_session(session, v), order), model, size
                ),
                "code_gen": file_parity(as_rgb_probabilities(converted, order), model, size),
                "ptflops": {"input": [3, size, size], "macs": macs, "params": params},
            }
    report["onnxruntime"]["provider"] = session.get_providers()[0]
    return data, report


def create_zip_file(
    model: DefendedModel, info: dict, cfg: Config, size: int, device: torch.device | None = None
) -> tuple[bytes, dict]:
    """The zip and its report (parity of its ``Model()`` with the in-process model on ``device``, ptflops)."""
    data, spec = model_zip.create_zip_bytes(model.model.members[0], info, cfg)
    loaded, _ = model_zip.load_zip_bytes(data)
    macs, params = count_ptflops(loaded, (3, size, size))
    with placed(device or "cpu", model, loaded):
        parity = file_parity(as_rgb_probabilities(loaded, cfg.export.channel_order), model, size)
    return data, {"parity": parity, "ptflops": {"input": [3, size, size], "macs": macs, "params": params}}


def create_pt2_file(model: DefendedModel, size: int) -> tuple[bytes, dict]:
    """The in-process model as a ``torch.export`` program (RGB in, probabilities out)."""
    program = export_program(ProbabilityOutput(model).eval(), size)
    if model.randomized and not random_ops(program):
        raise UserError(
            "export: the random resize-pad layer was traced as one fixed draw (no random op in the "
            "graph); refusing to write a silently weaker defense (random_pad.enabled=true)"
        )
    data = serialize_program(program)
    return data, {"parity": {"max_abs_diff": check_round_trip(load_program(data), model, size)}}


ORGANIZERS_SIZE = 224  # the side of the images the organizers feed a Phase II model

PARITY_CHECKS = (
    ("parity", ""),
    ("onnxruntime", " in onnxruntime"),
    ("code_gen", " converted by the organizers' onnx-pytorch code_gen"),
)


def parity_problems(files: dict[str, tuple[bytes, dict]]) -> list[str]:
    """Files (built, not written) that do not reproduce the in-process model."""
    problems = []
    for fmt, (_, rep) in files.items():
        for key, where in PARITY_CHECKS:
            diff = rep.get(key, {}).get("max_abs_diff", 0.0)
            if diff != diff:  # NaN: parity's mark of a non-finite output
                problems.append(f"the .{fmt} file{where} gives non-finite outputs (NaN or inf)")
            elif not diff <= ROUND_TRIP_ATOL:
                problems.append(
                    f"the .{fmt} file{where} does not reproduce the in-process model "
                    f"(max |dp| = {diff:.3g} > {ROUND_TRIP_ATOL:g})"
                )
    return problems


def ptflops_breaches(files: dict[str, tuple[bytes, dict]], cfg: Config) -> list[str]:
    """The organizers' strict limits (params < max, MACs < max) as ptflops counts each file."""
    breaches = []
    for fmt, (_, rep) in files.items():
        counted = rep.get("ptflops")
        if counted and counted["params"] >= cfg.budget.max_params:
            breaches.append(
                f".{fmt}: ptflops {counted['params'] / 1e6:.2f}M params >= budget.max_params "
                f"{cfg.budget.max_params / 1e6:g}M"
            )
        if counted and counted["macs"] / 1e9 >= cfg.budget.max_gmacs:
            breaches.append(
                f".{fmt}: ptflops {counted['macs'] / 1e9:.4g} GMACs >= budget.max_gmacs {cfg.budget.max_gmacs:g}"
            )
    return breaches


def resolve_export_stem(cfg: Config) -> Path:
    """``export.path`` without its suffix, or ``runs/<name>/<name>``; a folder there is an error."""
    if not cfg.export.path:
        return cfg.run_dir / cfg.name
    path = Path(cfg.export.path)
    if path.is_dir():
        raise UserError(f"export.path: {path} is a folder; give a file name such as {path / 'defended.pt2'}")
    return path.with_suffix("") if path.suffix in (".pt2", ".onnx", ".zip") else path


def budget_path_of(stem: Path) -> Path:
    return stem.with_name(stem.name + ".budget.json")


FORMATS = ("onnx", "zip", "pt2")


def recorded_file_problem(path: Path) -> tuple[Path | None, str | None]:
    """Is ``path`` the file its stem's budget JSON records? The JSON (None where there is none)
    and what is wrong (None when its sha256 is the recorded one).

    A stem's files are one export's; a file copied in by hand, or left by another export, is
    named here rather than scored or checked as if it were the one the report describes.
    """
    path = Path(path)
    budget = budget_path_of(path.with_suffix(""))
    if not budget.is_file():
        return None, None
    try:
        recorded = read_json(budget)["files"][path.suffix[1:]]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return budget, f"{budget} records no sha256 of a {path.suffix} file: {path} is not a file of that export"
    if hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        return budget, (
            f"{path} is not the file {budget} describes (its sha256 differs): a file of another export or copied in "
            "by hand; export again, or move it away from that report"
        )
    return budget, None


def output_paths(stem: Path, formats: Sequence[str]) -> dict[str, Path]:
    """The file of each format and the budget JSON, by format (``budget`` for the JSON)."""
    return {**{fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in formats}, "budget": budget_path_of(stem)}


def write_outputs(stem: Path, files: dict[str, bytes], report: dict) -> dict[str, Path]:
    """Write the files and the budget JSON as one unit (all appear, or none changes), removing the
    stem's files of other formats an earlier export left (a narrower export never leaves a mixed
    set); the JSON records each file's sha256, so a file from another export is seen. Returns the
    paths by format."""
    paths = output_paths(stem, list(files))
    stale = [p for fmt, p in output_paths(stem, FORMATS).items() if fmt not in files and fmt != "budget"]
    for fmt, data in files.items():
        report["files"][fmt]["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        atomic_write_files(
            {
                **{paths[fmt]: data for fmt, data in files.items()},
                paths["budget"]: json.dumps({**report, **record_owner("export", "exported model")}, indent=2) + "\n",
            },
            remove=stale,
        )
    except OSError as exc:
        raise UserError(f"export.path: cannot write {exc.filename or stem} ({exc.strerror or exc})") from None
    return paths


def enforce_budget(report: dict, cfg: Config) -> None:
    """Print the budget lines; a breach warns, or with ``budget.enforce=true`` stops before any file."""
    for line in format_report(report):
        print(line)
    if report["breaches"]:
        text = "; ".join(report["breaches"]) + " (an ensemble and TTA views multiply the cost)"
        if cfg.budget.enforce:
            raise UserError(f"export: over budget: {text}; no model file written (budget.enforce=true)")
        print(f"warning: over budget: {text}")


def enforce_file_budget(report: dict, files: dict[str, tuple[bytes, dict]], cfg: Config) -> None:
    """The ptflops counts of the built files against the limits, as :func:`enforce_budget` does."""
    breaches = ptflops_breaches(files, cfg)
    if not breaches:
        return
    report["breaches"] += breaches
    report["within_budget"] = False
    if cfg.budget.enforce:
        raise UserError(f"export: over budget: {'; '.join(breaches)}; no model file written (budget.enforce=true)")
    print(f"warning: over budget: {'; '.join(breaches)}")


def build_files(
    model: DefendedModel, info: dict, cfg: Config, size: int, device: torch.device | None = None
) -> dict[str, tuple[bytes, dict]]:
    """Every file of ``export.formats``, built on the CPU and checked in memory (the Phase II
    files' parity on ``device``; the ``.pt2`` program, traced on the CPU, is checked there)."""
    builders = {
        "onnx": lambda: create_onnx_file(model, info, cfg, size, device),
        "zip": lambda: create_zip_file(model, info, cfg, size, device),
        "pt2": lambda: create_pt2_file(model, size),
    }
    return {fmt: builders[fmt]() for fmt in FORMATS if fmt in cfg.export.formats}


def print_written(paths: dict[str, Path], files: dict[str, tuple[bytes, dict]], cfg: Config, size: int) -> None:
    order = cfg.export.channel_order.upper()
    for fmt, (data, rep) in files.items():
        counted = rep.get("ptflops")
        extra = f"; ptflops {counted['macs'] / 1e9:.4g} GMACs, {counted['params'] / 1e6:.2f}M params" if counted else ""
        print(f"wrote {paths[fmt]} ({len(data) / 1e6:.1f} MB{extra})")
    if "onnx" in files or "zip" in files:
        print(
            f"Phase II files: N x 3 x {size} x {size} in [0, 1], {order} -> N x {cfg.data.num_classes} "
            f"log-probabilities; check them with ./run.sh check-submission FILE"
            + (f" --image-size {size}" if size != ORGANIZERS_SIZE else "")
        )
    if "pt2" in files:
        print(f"in-process file: torch.export.load('{paths['pt2']}').module(), RGB -> probabilities")
    print(f"budget report: {paths['budget']}")


def run(cfg: Config) -> dict:
    """Export the defended model of ``cfg`` in ``export.formats`` and report its budget.

    Returns:
        ``paths`` (by format, plus ``budget``), ``path`` / ``budget_path`` (the first file and
        the report), and the budget report (``params``, ``gmacs``, ``members``, ``files``,
        ``within_budget``, ``breaches``, ...).

    Raises:
        UserError: missing checkpoint, an ensemble or TTA in a Phase II format, a budget breach
            with ``budget.enforce=true``, a model that does not export, or a file that does not
            reproduce the in-process model (nothing written in these cases).
    """
    stem = resolve_export_stem(cfg)
    # Every file of the export shares the stem: its lock and the ownership check cover them all
    # (those of the other formats too, which this export removes).
    check_outputs([*output_paths(stem, [*cfg.export.formats, *FORMATS]).values()], "export", "export.path")
    with hold_output(stem, "export", "export.path"):
        remove_leftovers(output_paths(stem, FORMATS).values())  # of an export killed while writing
        return export_to(cfg, stem)


def export_to(cfg: Config, stem: Path) -> dict:
    """The body of :func:`run`, under the lock of ``stem``."""
    checkpoints = resolve_member_paths(cfg)
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    model = build_defended_model(members, infos, cfg)
    size = input_size_of(infos)
    if {"onnx", "zip"} & set(cfg.export.formats):
        check_phase2_model(model)
        if size != ORGANIZERS_SIZE:
            print(
                f"warning: the Phase II files take 3x{size}x{size} (data.image_size); the organizers feed "
                f"3x{ORGANIZERS_SIZE}x{ORGANIZERS_SIZE}; check them with "
                f"./run.sh check-submission FILE --image-size {size}"
            )

    report = budget_report(model, size, cfg, checkpoints)
    report["defense"] = describe(model)
    enforce_budget(report, cfg)
    files = build_files(model, infos[0], cfg, size, default_device())
    problems = parity_problems(files)
    if problems:
        raise UserError(f"export: {'; '.join(problems)}; no file written")
    enforce_file_budget(report, files, cfg)
    report["files"] = {fmt: rep for fmt, (_, rep) in files.items()}
    report["channel_order"] = cfg.export.channel_order
    if "pt2" in files:
        report["round_trip_max_abs_diff"] = files["pt2"][1]["parity"]["max_abs_diff"]
    paths = write_outputs(stem, {fmt: data for fmt, (data, _) in files.items()}, report)
    print_written(paths, files, cfg, size)
    first = next(iter(files))
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "path": str(paths[first]),
        "budget_path": str(paths["budget"]),
        **report,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser(
        "run.sh export",
        "Phase II files (ONNX, model.py zip), the in-process torch.export file and the params/GMACs budget report.",
    ).parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
