"""``./run.sh export``: the defended model as one ``torch.export`` file, plus a budget report.

The file holds the exact model ``submit`` predicts with (GCM -> random resize-pad ->
ensemble x TTA), takes a float32 batch in [0, 1] of any batch size and returns class
probabilities: the interface of the challenge's Phase II model submission. Load it with
``torch.export.load(path).module()``; it needs torch, not this project. It stays
differentiable, so a white-box attacker meets GCM's concealed gradient as in-process.

Why ``torch.export``: ``torch.jit.script``/``trace`` are deprecated in torch 2.14 and both fail
on this model (dataclass views, ``round()`` on traced shapes). The random resize-pad layer
traces a fixed-shape version of itself under export (``gcm.random_pad.resize_pad_static``),
so its draws are random ops of the graph: every call of the file draws a new box from
torch's global RNG (``torch.manual_seed`` makes it reproducible) instead of replaying the
draw seen while tracing.

Nothing is written before the program has been loaded back from its bytes and checked
against the in-process model on a batch of another size (probabilities within
``ROUND_TRIP_ATOL``; with random pad, draw for draw by replaying the global RNG).

The budget report counts parameters and GMACs (``FlopCounterMode`` FLOPs / 2) of the *whole*
defended model (every member, every TTA view) for one image, and checks them against
``budget.max_params`` / ``budget.max_gmacs`` (Phase II rules: 120M and 5G, where the rules'
"FLOPs" are multiply-adds as fvcore/thop count them: convnext_tiny at 224 is 4.47G).
``budget.enforce=true`` turns a breach into an error and writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.errors import UserError
from core.io import atomic_write_bytes, atomic_write_text
from core.model import count_params
from core.outputs import check_outputs, hold_output
from gcm import DefendedModel
from gcm.random_pad import resize_pad
from infer.defended import build_defended_model, describe, input_size_of, load_members, resolve_member_paths

# Largest |probability difference| tolerated between the loaded file and the in-process model.
ROUND_TRIP_ATOL = 1e-5
EXAMPLE_BATCH = 2  # traced batch size; the check runs another one to prove the batch is dynamic
CHECK_BATCH = 3
MAX_BATCH = 65536


class ProbabilityOutput(nn.Module):
    """Log-probabilities of the defended model -> probabilities (the Phase II interface)."""

    def __init__(self, model: DefendedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).exp()


class FixedBox(nn.Module):
    """A resize-pad layer that always applies one given box (to replay a draw in-process)."""

    def __init__(self, box: Sequence[int]) -> None:
        super().__init__()
        self.box = tuple(int(v) for v in box)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_pad(x, *self.box)


@contextlib.contextmanager
def fixed_draw(model: DefendedModel, box: Sequence[int]) -> Iterator[DefendedModel]:
    """Run ``model`` with its random resize-pad layer pinned to ``box`` (top, left, h, w)."""
    layer = model.random_pad
    model.random_pad = FixedBox(box)
    try:
        yield model
    finally:
        model.random_pad = layer


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


def check_round_trip(loaded: nn.Module, model: DefendedModel, image_size: int, seeds: Sequence[int] = (0, 1)) -> float:
    """Largest |probability difference| between ``loaded`` and ``model`` on random images.

    Deterministic model: one comparison. With the random resize-pad layer, for each seed the
    loaded program draws from the global RNG seeded with it; the same seed replayed through
    ``RandomResizePad.draw_box_tensors`` gives the box, which the in-process model then uses,
    so the two are compared draw for draw. The caller's RNG state is restored afterwards.
    """
    pad = model.random_pad if model.randomized else None
    worst = 0.0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(12345)
        x = torch.rand(CHECK_BATCH, 3, image_size, image_size)
        for seed in seeds if pad is not None else (None,):
            if seed is None:
                got, expected = loaded(x), model(x).exp()
            else:
                torch.manual_seed(seed)
                got = loaded(x)
                torch.manual_seed(seed)
                box = [int(v) for v in pad.draw_box_tensors(image_size, image_size)]
                with fixed_draw(model, box):
                    expected = model(x).exp()
            if got.shape != expected.shape:
                return float("inf")
            worst = max(worst, (got - expected).abs().max().item())
    return worst


def resolve_export_path(cfg: Config) -> Path:
    """``export.path``, or ``runs/<name>/defended.pt2``; a folder there is an error."""
    path = Path(cfg.export.path) if cfg.export.path else cfg.run_dir / "defended.pt2"
    if path.is_dir():
        raise UserError(f"export.path: {path} is a folder; give a file name such as {path / 'defended.pt2'}")
    return path


def budget_path_of(path: Path) -> Path:
    return path.with_suffix(".budget.json")


def write_outputs(path: Path, data: bytes, report: dict) -> Path:
    """Write the program and its budget JSON (each atomically); returns the JSON's path."""
    budget_path = budget_path_of(path)
    try:
        atomic_write_bytes(path, data)
        atomic_write_text(budget_path, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"export.path: cannot write {exc.filename or path} ({exc.strerror or exc})") from None
    return budget_path


def run(cfg: Config) -> dict:
    """Export the defended model of ``cfg`` and report its budget.

    Returns:
        ``path`` and ``budget_path`` of the written files plus the budget report (``params``,
        ``gmacs``, ``members``, ``within_budget``, ``breaches``, ...).

    Raises:
        UserError: missing checkpoint, a budget breach with ``budget.enforce=true`` (nothing
            written), a model torch.export cannot capture, or a file that does not reproduce
            the in-process model.
    """
    path = resolve_export_path(cfg)
    # Every file of the export shares the stem of export.path: checking the path covers them all.
    check_outputs([path, budget_path_of(path)], "export", "export.path")
    with hold_output(path, "export", "export.path"):
        return export_to(cfg, path)


def export_to(cfg: Config, path: Path) -> dict:
    """The body of :func:`run`, under the lock of ``path``."""
    checkpoints = resolve_member_paths(cfg)
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    model = build_defended_model(members, infos, cfg)
    size = input_size_of(infos)

    report = budget_report(model, size, cfg, checkpoints)
    report["defense"] = describe(model)
    for line in format_report(report):
        print(line)
    if report["breaches"]:
        text = "; ".join(report["breaches"]) + " (an ensemble and TTA views multiply the cost)"
        if cfg.budget.enforce:
            raise UserError(f"export: over budget: {text}; no model file written (budget.enforce=true)")
        print(f"warning: over budget: {text}")

    program = export_program(ProbabilityOutput(model).eval(), size)
    randomized = model.randomized
    if randomized and not random_ops(program):
        raise UserError(
            "export: the random resize-pad layer was traced as one fixed draw (no random op in the "
            "graph); refusing to write a silently weaker defense (random_pad.enabled=true)"
        )
    data = serialize_program(program)
    diff = check_round_trip(load_program(data), model, size)
    if not diff <= ROUND_TRIP_ATOL:
        raise UserError(
            f"export: the exported program does not reproduce the in-process model (max |dp| = "
            f"{diff:.3g} > {ROUND_TRIP_ATOL:g}); no file written"
        )
    report["round_trip_max_abs_diff"] = diff
    budget_path = write_outputs(path, data, report)
    pad_note = (
        ", a new random resize-pad draw per call from torch's global RNG (seed it with torch.manual_seed)"
        if randomized
        else ""
    )
    print(f"wrote {path} ({len(data) / 1e6:.1f} MB; round trip checked, max |dp| {diff:.1g}) and {budget_path}")
    print(
        f"load: model = torch.export.load('{path}').module(); probs = model(x)  # x: N x 3 x {size} x {size} "
        f"float32 in [0,1], probs: N x {cfg.data.num_classes}{pad_note}"
    )
    return {"path": str(path), "budget_path": str(budget_path), **report}


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser(
        "run.sh export", "Defended model file (torch.export) + params/GMACs budget report."
    ).parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
