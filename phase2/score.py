"""``./run.sh evaluate eval.file=FILE``: the attack table of an exported Phase II file.

The model under attack is the file itself, fed as the organizers feed it (its channel order,
[0, 1], its input size): the zip's own ``Model``, or the ONNX file converted back by
``onnx2pytorch`` (:func:`phase2.files.load_phase2_file`). Two rows: the naive white-box
attacker who differentiates through the file's GCM, and the adaptive one (BPDA through the
file's own GCM switch, EOT over its random pad). Columns: clean, PGD-Linf and AutoAttack (the
ones of ``eval.attacks``), with the budgets of the ``eval`` section. A file without a GCM switch
gets its second row labelled as not adaptive, never dropped. With ``phase2.draws`` > 0 the
Phase-II-like score follows (:mod:`phase2.draws`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.devices import create_accelerator, default_device
from core.errors import UserError
from core.io import atomic_write_files, remove_leftovers
from core.outputs import check_outputs, hold_output
from gcm.gcm import gcm_modules
from phase2.draws import format_phase2, run_phase2
from phase2.files import FileModel, load_phase2_file
from robust.eval_images import load_eval_images
from robust.report import eval_out_dir
from robust.runner import accuracy, craft, score
from robust.specs import SPECS

FILE_ATTACKS = ("pgd_linf", "autoattack")


def create_rows(model: FileModel, x: torch.Tensor, y: torch.Tensor, cfg: Config, progress: bool) -> list[dict]:
    """Accuracy (%) per column for the naive and the adaptive attacker."""
    switches = len(gcm_modules(model))
    eot = " + EOT over the random pad" if model.randomized else ""
    labels = {
        False: "naive (white-box through the file's GCM)",
        True: f"adaptive (BPDA through the file's GCM{eot})"
        if switches
        else "not adaptive: the file has no GCM switch (same attack as above)",
    }
    clean = score(model, x, y, cfg)
    rows = []
    for adaptive in (False, True):
        row = {"row": labels[adaptive], "adaptive": adaptive and switches > 0, "clean": accuracy(clean)}
        for name in FILE_ATTACKS:
            if name not in cfg.eval.attacks:
                continue
            start = time.perf_counter()
            adv = craft(name, model, x, y, cfg, adaptive=adaptive, progress=progress, desc=f"{name} {adaptive}")
            row[name] = accuracy(score(model, adv, y, cfg))
            if progress:
                print(
                    f"  {labels[adaptive]}: {SPECS[name].title} {row[name]:.1f}% ({time.perf_counter() - start:.0f} s)"
                )
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    columns = ["clean"] + [n for n in FILE_ATTACKS if n in result["rows"][0]]
    titles = ["Top-1"] + [SPECS[n].title for n in columns[1:]]
    lines = [
        f"Attacks on {result['file']} ({result['format']}, {result['channel_order'].upper()} in, "
        f"{result['n']} images from the {result['source']}; Linf eps {result['eps_linf'] * 255:.3g}/255). Accuracy %:",
        "",
        "| attacker | " + " | ".join(titles) + " |",
        "|---" * (len(titles) + 1) + "|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['row']} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def file_report_paths(out_dir: Path) -> list[Path]:
    """The two files :func:`run_file` writes into ``out_dir``."""
    return [Path(out_dir) / "eval_file.md", Path(out_dir) / "eval_file.json"]


def run(cfg: Config, progress: bool = True) -> dict:
    """``./run.sh evaluate eval.file=FILE``: attack the file, write ``eval_file.md`` / ``eval_file.json``
    into the eval folder (under the lock ``evaluate`` takes) and return the table."""
    if not cfg.eval.file:
        raise UserError("eval.file: name the exported file to attack (./run.sh evaluate evaluates checkpoints)")
    out_dir = eval_out_dir(cfg)
    check_outputs(file_report_paths(out_dir), "evaluate", "eval.out_dir")
    accelerator = create_accelerator("no")  # attacks in float32: a coarser gradient is a weaker attack
    progress = progress and accelerator.is_main_process
    with hold_output(out_dir, "evaluate", "eval.out_dir", accelerator):
        if accelerator.is_main_process:  # the lock's holder: leftovers of a killed run
            remove_leftovers(file_report_paths(out_dir))
        return score_file(cfg, out_dir, progress, accelerator)


def score_file(cfg: Config, out_dir: Path, progress: bool = True, accelerator=None) -> dict:
    """The body of :func:`run`: the file on the run's device (or :func:`core.devices.default_device`),
    its two rows, the Phase-II-like draws; the main process writes the report."""
    start = time.perf_counter()
    torch.manual_seed(cfg.eval.seed)
    device = accelerator.device if accelerator is not None else default_device()
    model = load_phase2_file(cfg.eval.file).to(device)
    if model.meta["num_classes"] != cfg.data.num_classes:
        raise UserError(
            f"eval.file: the file predicts {model.meta['num_classes']} classes, "
            f"data.num_classes is {cfg.data.num_classes}"
        )
    x, y, source, _ = load_eval_images(cfg, model.meta["image_size"])
    if progress:
        print(f"evaluate: {len(x)} images from the {source}, model under attack: {cfg.eval.file}", flush=True)
    result = {
        "file": str(cfg.eval.file),
        **model.meta,
        "n": len(x),
        "source": source,
        "eps_linf": cfg.eval.eps_linf,
        "rows": create_rows(model, x, y, cfg, progress),
    }
    if cfg.phase2.draws:
        result["phase2"] = run_phase2(model, x, y, cfg, progress)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if accelerator is not None and not accelerator.is_main_process:
        return result
    table = write_file_report(result, out_dir)
    if progress:
        print(table)
    return result


def write_file_report(result: dict, out_dir: Path) -> str:
    """``eval_file.md`` and ``eval_file.json`` as one unit (both new, or neither changed); sets
    ``result["files"]`` and returns the markdown."""
    table = format_table(result) + (f"\n{format_phase2(result['phase2'])}" if "phase2" in result else "")
    files = file_report_paths(out_dir)
    result["files"] = [str(p) for p in files]
    atomic_write_files({files[0]: table, files[1]: json.dumps(result, indent=2) + "\n"})
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh evaluate eval.file=FILE", "Attack an exported Phase II file.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
