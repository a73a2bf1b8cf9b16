"""Bad inputs end to end: each test-folder file kind is predicted correctly or rejected by name,
label/config mistakes are one line with exit code 2, and nothing partial is ever written."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.checkpoint import export_model, load_model
from core.config import load_config
from core.errors import UserError
from core.images import MAX_PIXELS
from core.model import create_classifier
from infer import submit
from tests.conftest import ROOT, run_module, shrink


def _rgb(size=40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _bomb() -> bytes:
    # 1-bit PNG of 9000 x 8000 = 72 Mpx: a few KB on disk, over the decode limit
    side = int((MAX_PIXELS * 1.1) ** 0.5)
    return _png(Image.new("1", (side, side)))


GOOD = {
    "grayscale.png": lambda: _png(Image.fromarray(_rgb()[:, :, 0], "L")),
    "rgba.png": lambda: _png(Image.fromarray(np.dstack([_rgb(), _rgb()[:, :, :1]]), "RGBA")),
    "palette.png": lambda: _png(Image.fromarray(_rgb()).convert("P")),
    "16bit.png": lambda: _png(Image.fromarray(_rgb()[:, :, 0].astype(np.uint16) * 257)),
    "cmyk.jpg": lambda: _jpeg(Image.fromarray(_rgb()).convert("CMYK")),
    "exif.jpg": _exif_rotated,
}
BAD = {
    "truncated.jpg": (lambda: _jpeg(Image.fromarray(_rgb(64)))[:300], "truncated|cannot decode"),
    "empty.png": (lambda: b"", "empty file"),
    "text.png": (lambda: b"this is not a png\n", "not an image"),
    "bomb.png": (_bomb, "too large"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, ["model.name=test_convnext", "data.num_classes=4", "data.image_size=32"])
    stem = tmp_path_factory.mktemp("ckpt") / "model"
    export_model(create_classifier(cfg.model, 4), stem, {"arch": "test_convnext", "num_classes": 4, "image_size": 32})
    return stem


def _folder(tmp_path: Path, name: str, data: bytes) -> Path:
    test_dir = tmp_path / "data" / "test"
    test_dir.mkdir(parents=True)
    Image.fromarray(_rgb()).save(test_dir / "0.png")
    (test_dir / f"1{Path(name).suffix}").write_bytes(data)
    return tmp_path / "data"


def _submit_cfg(root: Path, checkpoint: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        shrink(
            [f"submit.checkpoints=[{checkpoint}]", f"submit.out_dir={tmp_path / 'subs'}", "data.test_labels=", *extra],
            root,
            tmp_path / "runs",
        ),
    )


@pytest.mark.parametrize("name", sorted(GOOD))
def test_odd_but_valid_images_are_predicted(name, checkpoint, tmp_path):
    root = _folder(tmp_path, name, GOOD[name]())
    result = submit.run(_submit_cfg(root, checkpoint, tmp_path))
    assert result["n_images"] == 2
    meta = json.loads((tmp_path / "subs" / "demo.meta.json").read_text())
    assert meta["bad_images"] == []


@pytest.mark.parametrize("name", sorted(BAD))
def test_broken_images_are_named_and_nothing_is_written(name, checkpoint, tmp_path):
    make, reason = BAD[name]
    root = _folder(tmp_path, name, make())
    with pytest.raises(UserError, match=rf"test/1\.\w+: .*({reason})"):
        submit.run(_submit_cfg(root, checkpoint, tmp_path))
    assert not (tmp_path / "subs").exists() or list((tmp_path / "subs").iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ("notes.txt", "notes.txt"),
        ("sub", "sub"),
        ("x1.png", "x1.png"),
    ],
)
def test_stray_entries_in_the_test_folder_are_named(extra, message, checkpoint, tmp_path):
    root = _folder(tmp_path, "ok.png", _png(Image.fromarray(_rgb())))
    target = root / "test" / extra
    target.mkdir() if extra == "sub" else target.write_text("x")
    with pytest.raises(UserError, match=message):
        submit.run(_submit_cfg(root, checkpoint, tmp_path))
    assert not (tmp_path / "subs").exists()


def test_checkpoint_of_another_class_count_or_arch(checkpoint, tmp_path):
    with pytest.raises(UserError, match="checkpoint has 4 classes but data.num_classes is 10"):
        load_model(checkpoint, num_classes=10)
    info = json.loads(Path(f"{checkpoint}.json").read_text())
    other = tmp_path / "other"
    for suffix in (".safetensors", ".json"):
        Path(f"{other}{suffix}").write_bytes(Path(f"{checkpoint}{suffix}").read_bytes())
    Path(f"{other}.json").write_text(json.dumps({**info, "arch": "convnext_atto"}))
    with pytest.raises(UserError, match="weights do not fit convnext_atto with 4 classes"):
        load_model(other)
    Path(f"{other}.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="do not match the sha256"):
        load_model(other)


def _run_train(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run_module("train.main", *args, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "lines, message",
    [
        ("0.JPEG 1\r\n\r\n1.JPEG 9\r\n", r"label.txt:3: label 9 out of range"),
        ("0.JPEG 1\n0.JPEG 2\n", r"label.txt:2: duplicate"),
        ("../0.JPEG 1\n", r"label.txt:1: .*"),
        ("0.JPEG one\n", r"label.txt:1: .*"),
    ],
)
def test_label_file_errors_are_one_line_exit_2(lines, message, tiny_data, tmp_path):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    for name in ("0.JPEG", "1.JPEG"):
        (root / "train" / name).write_bytes((tiny_data / "train" / name).read_bytes())
    (root / "label.txt").write_bytes(lines.encode())
    proc = _run_train(shrink([], root, tmp_path / "runs"))
    assert proc.returncode == 2, proc.stderr
    lines_out = proc.stderr.strip().splitlines()
    assert len(lines_out) == 1 and lines_out[0].startswith("error: "), proc.stderr
    assert __import__("re").search(message, lines_out[0]), lines_out[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "demo" / "best.safetensors").exists()
    debug = _run_train(["--debug", *shrink([], root, tmp_path / "runs")])
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_config_type_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: ten\n")
    proc = _run_train(["--config", str(bad)])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: config key 'train.epochs': expected int, got 'ten'"


def test_a_checkpoint_json_with_a_non_integer_class_count_is_one_line(checkpoint, tmp_path):
    stem = tmp_path / "odd"
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"odd{suffix}").write_bytes(Path(f"{checkpoint}{suffix}").read_bytes())
    info = json.loads((tmp_path / "odd.json").read_text())
    info["num_classes"] = "ten"
    (tmp_path / "odd.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"odd.json: checkpoint JSON 'num_classes' is 'ten', not a positive integer"):
        load_model(stem)


def test_exported_models_get_the_permissions_of_every_other_output(checkpoint):
    umask = os.umask(0)
    os.umask(umask)
    for suffix in (".safetensors", ".json"):
        assert os.stat(f"{checkpoint}{suffix}").st_mode & 0o777 == 0o666 & ~umask, suffix
