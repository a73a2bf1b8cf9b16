"""``./run.sh bench`` runs and reports; the optimizations it led to keep behaviour.

Benchmarks are not tests: nothing here asserts a speed. The bench is checked for running end to
end (``--quick``) and printing/writing its table; the decoding fast path is checked for giving
exactly the pixels PIL gives, and for being taken only where that is safe.
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from infer import bench
from tests.conftest import ROOT
from train import data
from train.errors import UserError

# --------------------------------------------------------------------------- the bench command

GOAL_ROWS = [
    "submit end to end / model-only forward",
    "submit end to end / timm inference.py loop",
    "train (real loader + augmentations) / model-only fwd+bwd+step",
    "GCM / one forward",
    "4 TTA views batched / 4 single-view forwards",
    "ensemble of 2 / sum of its members",
    "train, 2 CPU processes / 1 process",
]
INFO_ROWS = [
    "predict loop (no set-up, no files) / model-only forward",
    "peak RSS of a training process",
    "submit img/s, submit.batch_size=",
    "train samples/s, data.num_workers=",
    "channels_last forward / default layout forward",
    "bf16 autocast forward / float32 forward",
]


@pytest.mark.slow
def test_quick_bench_prints_and_writes_the_ratio_table(tmp_path):
    report = tmp_path / "BENCH.md"
    report.write_text("# Benchmarks\n\nhand-written notes stay\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "infer.bench", "--quick", "--write", str(report),
                           "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"machine: .+, \d+ cores, .*torch \S+ with \d+ threads", out), out[:500]
    table = out[out.index("section  figure"):]
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
    body = text[text.index(bench.MARK_BEGIN):text.index(bench.MARK_END)]
    assert "| section | figure | value | goal | result | measured |" in body
    assert "Command: `./run.sh bench --quick --write" in body and "Machine: " in body
    assert body.count("\n| ") >= len(GOAL_ROWS) + len(INFO_ROWS) + 1


def test_write_markdown_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "B.md"
    bench.write_markdown(path, "first\n")
    assert path.read_text() == f"# Benchmarks\n\n{bench.MARK_BEGIN}\nfirst\n{bench.MARK_END}\n"
    path.write_text(path.read_text().replace("# Benchmarks\n", "# Benchmarks\n\nbefore: 0.52\n") + "\nnotes\n")
    bench.write_markdown(path, "second\n")
    text = path.read_text()
    assert "before: 0.52" in text and text.endswith("\nnotes\n")
    assert "second" in text and "first" not in text


def test_row_verdicts_and_sections():
    assert bench.Row("s", "n", 0.95, "", (">=", 0.9)).verdict() == "PASS"
    assert bench.Row("s", "n", 0.85, "", (">=", 0.9)).verdict() == "FAIL"
    assert bench.Row("s", "n", 0.012, "", ("<", 0.01), unit="%").formatted_value() == "1.20%"
    assert bench.Row("s", "n", float("nan"), "", ("<=", 1.05)).verdict() == ""
    assert bench.resolve_sections("") == list(bench.DEFAULT_SECTIONS)
    assert bench.resolve_sections("parts,submit") == ["parts", "submit"]
    with pytest.raises(UserError, match="unknown section 'gpu'"):
        bench.resolve_sections("submit,gpu")
    rounds = bench.measure_interleaved({"a": iter([1, 2, 3]).__next__, "b": iter([10, 20, 30]).__next__}, 3)
    assert rounds == {"a": [1, 2, 3], "b": [10, 20, 30]}
    assert bench.median_ratio([(1, 2), (3, 3), (1, 4)]) == 0.5


# --------------------------------------------------------------------------- decoding fast path


def _pil_decode(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _opencv_taken(path) -> bool:
    content = path.read_bytes()
    if data._decode_plain_png(content) is not None:
        return True
    with Image.open(io.BytesIO(content)) as img:
        return data._decode_plain_jpeg(content, img) is not None


@pytest.mark.parametrize("fmt,kwargs", [
    ("JPEG", {"quality": 95}), ("JPEG", {"quality": 60, "subsampling": 0}), ("JPEG", {"progressive": True}),
    ("PNG", {}), ("PNG", {"optimize": True}),
])
def test_fast_decode_gives_the_pixels_pil_gives(tmp_path, fmt, kwargs):
    arr = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(arr, fmt, **kwargs))
    assert _opencv_taken(path)
    out = data.load_image(path)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    assert np.array_equal(out, _pil_decode(path))


def test_fast_decode_leaves_unusual_files_to_pil(tmp_path):
    arr = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    jpeg = _encode(arr, "JPEG", quality=90)
    cases = {
        "trailing.jpg": jpeg + b"extra bytes after the end-of-image marker",  # PIL reads it, OpenCV might not
        "cut.jpg": jpeg[: len(jpeg) - 40],
        "text.png": None,
        "gray.png": _encode(arr[..., 0], "PNG"),
        "rgba.png": _encode(np.dstack([arr, np.full(arr.shape[:2], 128, np.uint8)]), "PNG"),
        "short.png": _encode(arr, "PNG")[:-20],  # no IEND: PIL decides (it accepts this one, as before)
        "cut.png": _encode(arr, "PNG")[:300],
    }
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "x")  # where PIL may find an orientation after decoding
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    cases["text.png"] = buf.getvalue()
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert not _opencv_taken(tmp_path / name), name
    assert np.array_equal(data.load_image(tmp_path / "trailing.jpg"), _pil_decode(tmp_path / "trailing.jpg"))
    assert np.array_equal(data.load_image(tmp_path / "text.png"), arr)
    for name in ("cut.jpg", "cut.png"):
        with pytest.raises(UserError, match="truncated"):
            data.load_image(tmp_path / name)

    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 3  # rotated 180 degrees
    im.save(tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif.tobytes())
    assert not _opencv_taken(tmp_path / "rot.jpg")
    assert np.array_equal(data.load_image(tmp_path / "rot.jpg"), _pil_decode(tmp_path / "rot.jpg")[::-1, ::-1])


# --------------------------------------------------------------------------- submit switches


def test_cpu_submit_loader_workers_take_only_the_free_cores(tiny_config, tiny_data):
    from accelerate import Accelerator

    from infer.submit import create_test_loader
    from train.data import list_test_images

    accelerator = Accelerator(cpu=True)
    items = list_test_images(tiny_data / "test")
    cfg = tiny_config("submit.num_workers=3", "submit.cpu_num_workers=1")
    assert create_test_loader(cfg, items, 32, accelerator).num_workers == 1  # explicit value wins
    cfg = tiny_config("submit.num_workers=3")  # cpu_num_workers=-1: auto
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # the model's threads occupy every core: decode in between
        loader = create_test_loader(cfg, items, 32, accelerator)
        assert loader.num_workers == 0 and loader.dataset.decode_threads == cores  # decode on every core
        torch.set_num_threads(1)  # as under accelerate launch (OMP_NUM_THREADS=1)
        assert create_test_loader(cfg, items, 32, accelerator).num_workers == cores - 1
    finally:
        torch.set_num_threads(threads)
    images, ids, ok = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and ok.all()


def test_threaded_batch_decoding_gives_the_same_batch(tiny_data, tmp_path):
    import pickle

    from infer.submit import TestImages
    from train.data import list_test_images

    items = list_test_images(tiny_data / "test")[:10]
    bad = tmp_path / "999.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.append((bad, 999))
    one, threaded = TestImages(items, 32), TestImages(items, 32, decode_threads=2)
    order = list(range(len(items)))[::-1]
    expected, got = one.__getitems__(order), threaded.__getitems__(order)
    assert threaded._pool is not None  # the batch went through the pool
    assert [(i, ok) for _, i, ok in got] == [(i, ok) for _, i, ok in expected]
    assert got[0][1:] == (999, False) and all(ok for _, _, ok in got[1:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, expected))
    assert pickle.loads(pickle.dumps(threaded))._pool is None  # what a loader worker receives


def test_compile_wraps_only_the_member_networks(tiny_config):
    from gcm import GradientConcealment
    from infer.defended import build_defended_model
    from infer.submit import compile_members
    from train.model import create_classifier

    cfg = tiny_config("model.compile=true")
    members = [create_classifier(cfg.model, 4).eval() for _ in range(2)]
    model = build_defended_model(members, [{"image_size": 32}] * 2, cfg)
    compile_members(model)
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.ensemble.members)
    assert [m._orig_mod for m in model.ensemble.members] == members
    assert type(model.gcm) is GradientConcealment  # the defense stays eager float32
