"""The bench report: console table, Markdown for BENCHMARKS.md, and a warning when the machine was busy."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from bench.measure import Row
from core.io import atomic_write_text

MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"


def describe_busy_machine(machine: dict) -> str:
    """A warning when other work competed for the CPU during the run ("" otherwise)."""
    if not hasattr(os, "getloadavg"):
        return ""
    load = os.getloadavg()[1]  # 5-minute average, mostly covering this run
    own = 1.0  # this process keeps about one core busy on average
    if load - own > 0.5 * machine["cores"]:
        return (
            f"the 5-minute load average was {load:.1f} on {machine['cores']} cores: other processes competed "
            "for the CPU, so these ratios are less reliable than usual (run again on an idle machine)"
        )
    return ""


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table for the console."""
    header = ("section", "figure", "value", "goal", "", "measured")
    lines = [header] + [
        (r.section, r.name, r.formatted_value(), r.formatted_goal(), r.verdict(), r.detail) for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line[:5], widths)) + "  " + line[5])
        if i == 0:
            out.append("-" * (sum(widths) + 2 * 5 + len(header[5])))
    return "\n".join(out)


def format_machine(machine: dict) -> str:
    load = ", ".join(f"{v:.2f}" for v in machine["load_avg"])
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB RAM, GPU: {machine['gpu']}; "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, timm {machine['timm']}, "
        f"Python {machine['python']}; load average at start {load}"
    )


def format_markdown(rows: Sequence[Row], machine: dict, command: str, seconds: float, busy: str = "") -> str:
    lines = [
        f"Machine: {format_machine(machine)}.",
        "",
        *([f"Warning: {busy}.", ""] if busy else []),
        f"Command: `{command}` ({seconds:.0f} s, {time.strftime('%Y-%m-%d')}).",
        "",
        "| section | figure | value | goal | result | measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.section} | {r.name} | {r.formatted_value()} | {r.formatted_goal()} | {r.verdict()} | {r.detail} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: str) -> None:
    """Put ``body`` between the bench markers of ``path``, keeping the hand-written rest."""
    block = f"{MARK_BEGIN}\n{body}{MARK_END}\n"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if MARK_BEGIN in text and MARK_END in text:
            head, rest = text.split(MARK_BEGIN, 1)
            tail = rest.split(MARK_END, 1)[1].lstrip("\n")
            atomic_write_text(path, head + block + ("\n" + tail if tail else ""))
            return
        atomic_write_text(path, text.rstrip("\n") + "\n\n" + block)
        return
    atomic_write_text(path, "# Benchmarks\n\n" + block)
