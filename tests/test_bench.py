"""``./run.sh bench`` runs and reports.

Benchmarks are not tests: nothing here asserts a speed. The bench is checked for running end to
end (``--quick``) and printing/writing its table. (The optimizations it led to are tested where
their code lives: the decoding fast path in test_images.py, submit's loader in test_submit.py.)
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from bench.commands import check_same_predictions
from bench.main import DEFAULT_SECTIONS, resolve_sections
from bench.main import main as bench_main
from bench.measure import Row, measure_interleaved, median_ratio
from bench.report import MARK_BEGIN, MARK_END, write_markdown
from core.errors import UserError
from tests.conftest import ROOT, run_module

# --------------------------------------------------------------------------- the bench command

GOAL_ROWS = [
    "submit end to end / model-only forward",
    "submit end to end / timm inference.py loop",
    "train (real loader + augmentations) / model-only fwd+bwd+step",
    "GCM / one forward",
    "4 TTA views batched / 4 single-view forwards",
    "ensemble of 2 / sum of its members",
    "train, 2 CPU processes / 1 process",
    "train.adv.mode=fgsm_rs step / standard step",
    "train.adv.mode=pgd step / standard step",
    "./run.sh submit / minimal prediction script (wall time)",
]
INFO_ROWS = [
    "predict loop (no set-up, no files) / model-only forward",
    "peak RSS of a training process",
    "submit img/s, submit.batch_size=",
    "train samples/s, data.num_workers=",
    "channels_last forward / default layout forward",
    "bf16 autocast forward / float32 forward",
    "training loader with AugMix (one view) / standard loader",
    "training loader with AugMix + JSD (clean + 2 views) / standard loader",
    "./run.sh train to its first step / the script's imports + model build",
]


@pytest.mark.slow
def test_quick_bench_prints_and_writes_the_ratio_table(tmp_path):
    report = tmp_path / "BENCH.md"
    report.write_text("# Benchmarks\n\nhand-written notes stay\n")
    proc = run_module("bench", "--quick", "--write", str(report), "--workdir", str(tmp_path / "work"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"machine: .+, \d+ cores, .*torch \S+ with \d+ threads", out), out[:500]
    table = out[re.search(r"^section\s+figure", out, flags=re.M).start() :]  # padded to the longest section
    lines = table.splitlines()
    for name in GOAL_ROWS:
        row = next((ln for ln in lines if name in ln), None)
        assert row is not None, f"missing row {name!r} in\n{table}"
        assert re.search(r"\s(PASS|FAIL)\s", row), row  # every goal row is judged
    for name in INFO_ROWS:
        assert any(name in ln for ln in lines), f"missing row {name!r} in\n{table}"
    # every figure is a real measurement: a positive finite number (ratio, percent or MB)
    values = re.findall(r"^\w+\s{2,}.+?\s{2,}([0-9.]+)(%| MB)?\s", table, flags=re.M)
    assert len(values) >= len(GOAL_ROWS) + len(INFO_ROWS)
    assert all(math.isfinite(float(v)) and float(v) > 0 for v, _ in values), values
    assert re.search(r"\d+ goal\(s\) met, \d+ missed", out)

    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written notes stay\n")
    body = text[text.index(MARK_BEGIN) : text.index(MARK_END)]
    assert "| section | figure | value | goal | result | measured |" in body
    assert "Command: `./run.sh bench --quick --write" in body and "Machine: " in body
    assert body.count("\n| ") >= len(GOAL_ROWS) + len(INFO_ROWS) + 1


@pytest.mark.slow
def test_quick_recipes_section_times_every_option_against_plain_pgd_at(tmp_path):
    from bench.recipes import RECIPE_OPTIONS

    proc = run_module("bench", "--quick", "--only", "recipes", "--train-steps", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("recipes ") and "/ PGD-AT step (time)" in ln]
    assert len(rows) == len(RECIPE_OPTIONS), proc.stdout
    for label, row in zip(RECIPE_OPTIONS, rows):
        assert label in row and "2 optimizer steps" in row
        value = float(re.search(r"\(time\)\s+([0-9.]+)\s", row).group(1))
        assert math.isfinite(value) and value > 0


def test_write_markdown_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "B.md"
    write_markdown(path, "first\n")
    assert path.read_text() == f"# Benchmarks\n\n{MARK_BEGIN}\nfirst\n{MARK_END}\n"
    path.write_text(path.read_text().replace("# Benchmarks\n", "# Benchmarks\n\nbefore: 0.52\n") + "\nnotes\n")
    write_markdown(path, "second\n")
    text = path.read_text()
    assert "before: 0.52" in text and text.endswith("\nnotes\n")
    assert "second" in text and "first" not in text


def test_row_verdicts_and_sections():
    assert Row("s", "n", 0.95, "", (">=", 0.9)).verdict() == "PASS"
    assert Row("s", "n", 0.85, "", (">=", 0.9)).verdict() == "FAIL"
    assert Row("s", "n", 0.012, "", ("<", 0.01), unit="%").formatted_value() == "1.20%"
    assert Row("s", "n", float("nan"), "", ("<=", 1.05)).verdict() == ""
    assert resolve_sections("") == list(DEFAULT_SECTIONS)
    assert resolve_sections("parts,submit") == ["parts", "submit"]
    with pytest.raises(UserError, match="unknown section 'nope'"):
        resolve_sections("submit,nope")
    rounds = measure_interleaved({"a": iter([1, 2, 3]).__next__, "b": iter([10, 20, 30]).__next__}, 3)
    assert rounds == {"a": [1, 2, 3], "b": [10, 20, 30]}
    assert median_ratio([(1, 2), (3, 3), (1, 4)]) == 0.5


def test_commands_rows_refuse_different_predictions_and_a_baseline_without_run_sh(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("image_id,category_id\n0,3\n1,2\n")
    b.write_text("image_id,category_id\n1,2\n0,3\n")  # the same predictions in another order
    assert check_same_predictions(a, b) == 2
    b.write_text("image_id,category_id\n0,3\n1,1\n")
    with pytest.raises(RuntimeError, match="differs from .* in 1 of 2 predictions"):
        check_same_predictions(a, b)
    with pytest.raises(UserError, match="--baseline .*: no run.sh in it"):
        bench_main(["--only", "commands", "--baseline", str(tmp_path)])


@pytest.mark.slow
def test_the_gpu_check_script_stops_cleanly_without_a_gpu(tmp_path):
    # bench/gpu_check.sh runs on a lent GPU machine; here it must say why it stops, in its output folder
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    assert "torch" in (tmp_path / "out" / "machine.txt").read_text()


def test_the_gpu_section_says_it_was_not_measured_without_a_gpu():
    from bench.gpu import NOT_MEASURED, bench_gpu
    from bench.measure import BenchContext, BenchSettings

    ctx = BenchContext(BenchSettings(), None, [], None, None)
    bench_gpu(ctx)
    assert [(r.section, r.formatted_value(), r.detail) for r in ctx.rows] == [("gpu", "n/a", NOT_MEASURED)]


# Packages the lent GPU machine's image lacks that bench/gpu_wheels.sh does not carry (DESIGN.md,
# "GPU facts"): a test module that imports one at its top stops `pytest -m gpu` at collection there.
ABSENT_ON_THE_GPU_MACHINE = ("wandb",)


def test_every_test_module_collects_without_the_packages_the_gpu_machine_lacks():
    blocked = ", ".join(repr(name) for name in ABSENT_ON_THE_GPU_MACHINE)
    script = (
        "import sys, pytest\n"
        f"for name in ({blocked},):\n"
        "    sys.modules[name] = None  # import fails as if absent; find_spec returns None\n"
        "sys.exit(pytest.main(['tests', '-m', 'gpu', '--collect-only', '-q', '-p', 'no:cacheprovider']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "tests/test_gpu.py" in proc.stdout


def test_each_gpu_row_reaches_the_rows_file_and_the_markdown_as_it_is_measured(tmp_path):
    from bench.gpu import GpuPlan, read_rows, record_row

    plan = GpuPlan("cpu", str(tmp_path), "configs/cvpr22_phase2.yaml", rows=str(tmp_path / "r.jsonl"))
    plan.write = str(tmp_path / "GPU.md")
    first = Row("gpu", "train pgd-2 step: real loader / limit", 0.93, "931 vs 1001 img/s", (">=", 0.9))
    record_row(plan, first, 0.0)
    assert read_rows(plan.rows) == [first]  # back from JSON as it was, goal and all
    assert (
        "| gpu | train pgd-2 step: real loader / limit | 0.930 | >= 0.9 | PASS |" in (tmp_path / "GPU.md").read_text()
    )
    record_row(plan, Row("gpu", "peak GPU memory", 2048.0, "", unit="MB"), 0.0)
    assert (tmp_path / "GPU.md").read_text().count("\n| gpu |") == 2


@pytest.mark.slow
def test_gpu_parts_run_one_precision_per_process_and_a_timeout_loses_only_its_part(tmp_path):
    # precision trains in float32 and layout in bf16 (forced on the CPU, as `auto` does on a GPU):
    # one process refuses the second Accelerator; submit's 1-s time box stops it before any figure
    md, rows = tmp_path / "GPU.md", tmp_path / "rows.jsonl"
    proc = run_module(
        "bench.gpu", "--device", "cpu", "--parts", "precision,layout,submit", "--timeout", "submit=1",
        "--repeats", "1", "--workdir", str(tmp_path / "w"), "--write", str(md), "--rows", str(rows), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    for figure in ("bf16 autocast / float32", "channels_last / default layout"):
        line = next(ln for ln in text.splitlines() if figure in ln)
        assert "CPU rehearsal: not a GPU figure" in line and float(line.split(" | ")[2]) > 0, line
    assert "| part submit: no figure | n/a |" in text and "timed out after 1 s" in text
    assert len(rows.read_text().splitlines()) == 3
