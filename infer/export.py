"""``./run.sh export``: the defended model as one ``torch.export`` file, plus a budget report.

The file holds the exact model ``submit`` predicts with (GCM -> ensemble x TTA), takes a
float batch in [0, 1] of any batch size and returns class probabilities, the interface of
the challenge's Phase II model submission. Load it with ``torch.export.load(path).module()``.

The budget report counts parameters and GMACs of the *whole* defended model (every member,
every TTA view) for one image and checks them against ``budget.max_params`` /
``budget.max_gmacs`` (Phase II rules: 120M, 5 GMACs); ``budget.enforce=true`` turns a breach
into an error and writes no model file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from infer.defended import DefendedClassifier, build_defended_model, input_size_of, load_members, resolve_checkpoints
from train.cli import create_parser, parse_config, quiet_libraries, run_cli
from train.config import Config
from train.errors import UserError
from train.io import atomic_write_bytes, atomic_write_text
from train.model import count_params


class ProbabilityOutput(nn.Module):
    """Log-probabilities of the defended model -> probabilities."""

    def __init__(self, model: DefendedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).exp()


def count_gmacs(model: nn.Module, image_size: int) -> float:
    """Multiply-accumulates (in G) of one forward of one image (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, image_size, image_size))
    return counter.get_total_flops() / 2 / 1e9


def budget_report(model: DefendedClassifier, image_size: int, cfg: Config) -> dict:
    """Params and GMACs of the whole defended model and of each member, checked against the limits."""
    ens = model.ensemble
    members = [{"params": count_params(m), "gmacs": count_gmacs(m, size)}
               for m, size in zip(ens.members, ens.image_sizes)]
    report = {
        "params": sum(m["params"] for m in members),
        "gmacs": count_gmacs(model, image_size),
        "members": members,
        "tta_views": len(ens.views),
        "input_size": image_size,
        "max_params": cfg.budget.max_params,
        "max_gmacs": cfg.budget.max_gmacs,
    }
    breaches = []
    if report["params"] > cfg.budget.max_params:
        breaches.append(f"{report['params'] / 1e6:.2f}M parameters > budget.max_params {cfg.budget.max_params / 1e6:g}M")
    if report["gmacs"] > cfg.budget.max_gmacs:
        breaches.append(f"{report['gmacs']:.4g} GMACs per image > budget.max_gmacs {cfg.budget.max_gmacs:g}")
    report["breaches"] = breaches
    report["within_budget"] = not breaches
    return report


def export_program(model: nn.Module, image_size: int, path: Path) -> None:
    """``torch.export`` with a dynamic batch dimension, written atomically."""
    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def run(cfg: Config) -> dict:
    if cfg.random_pad.enabled:
        # Its output size before padding is drawn per forward: torch.export would freeze one draw
        # into the graph, a silently weaker defense. Refuse rather than export that.
        raise UserError("export: random_pad.enabled=true cannot be exported faithfully with torch.export "
                        "(it would freeze one random draw); export with random_pad.enabled=false and add "
                        "the layer in your submission wrapper")
    members, infos = load_members(resolve_checkpoints(cfg), cfg.data.num_classes)
    model = build_defended_model(members, infos, cfg)
    size = input_size_of(infos)
    report = budget_report(model, size, cfg)
    print(f"budget: {report['params'] / 1e6:.2f}M params, {report['gmacs']:.4g} GMACs per image "
          f"({len(members)} member(s) x {report['tta_views']} TTA view(s) at {size}px); "
          f"limits {cfg.budget.max_params / 1e6:g}M, {cfg.budget.max_gmacs:g} GMACs")
    for i, m in enumerate(report["members"]):
        print(f"  member {i}: {m['params'] / 1e6:.2f}M params, {m['gmacs']:.4g} GMACs per view")
    if report["breaches"]:
        text = "; ".join(report["breaches"]) + " (ensembles and TTA multiply the cost)"
        if cfg.budget.enforce:
            raise UserError(f"export: over budget: {text}; no model file written (budget.enforce=true)")
        print(f"warning: over budget: {text}")
    path = Path(cfg.export.path) if cfg.export.path else cfg.run_dir / "defended.pt2"
    export_program(ProbabilityOutput(model).eval(), size, path)
    budget_path = path.with_suffix(".budget.json")
    atomic_write_text(budget_path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} (load: torch.export.load('{path}').module(); input: N x 3 x {size} x {size} in [0,1], "
          f"output: probabilities) and {budget_path}")
    return {"path": str(path), "budget_path": str(budget_path), **report}


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh export", "Defended model file + budget report.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
