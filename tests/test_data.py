"""Data layer: label files, folders, splits, decoding, datasets and the demo data set."""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from core import datasets, images
from core import labels as label_files
from core.config import DataConfig
from core.errors import UserError
from core.transforms import create_eval_transform
from train import demo_data


def write_image(path: Path, size=(8, 6), color=(10, 20, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def noisy_jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for name in ("0.JPEG", "1.JPEG", "2.JPEG", "10.JPEG"):
        write_image(folder / name, fmt="JPEG")
    return folder


# --------------------------------------------------------------------------- label files


def test_label_file_accepts_crlf_blank_lines_and_tabs(tmp_path, image_dir):
    label_file = tmp_path / "label.txt"
    label_file.write_bytes(b"0.JPEG 5\r\n\r\n1.JPEG\t0\r\n   \r\n10.JPEG   9\r\n2.JPEG 3")
    samples = label_files.read_label_file(label_file, image_dir, num_classes=10)
    assert samples == [
        (image_dir / "0.JPEG", 5),
        (image_dir / "1.JPEG", 0),
        (image_dir / "10.JPEG", 9),
        (image_dir / "2.JPEG", 3),
    ]


@pytest.mark.parametrize(
    "content, line, expected",
    [
        ("0.JPEG 1\n1.JPEG\n", 2, "expected 'NAME LABEL'"),
        ("0.JPEG 1 2\n", 1, "expected 'NAME LABEL'"),
        ("0.JPEG 1\n\n1.JPEG x\n", 3, "not an integer"),
        ("0.JPEG 1.5\n", 1, "not an integer"),
        ("0.JPEG 1_0\n", 1, "not an integer"),
        ("0.JPEG 1\n1.JPEG 10\n", 2, "out of range [0, 10)"),
        ("0.JPEG -1\n", 1, "out of range"),
        ("0.JPEG 1\n1.JPEG 2\n0.JPEG 3\n", 3, "duplicate image name '0.JPEG' (first listed on line 1)"),
    ],
)
def test_label_file_line_errors_name_file_and_line(tmp_path, image_dir, content, line, expected):
    label_file = tmp_path / "label.txt"
    label_file.write_text(content)
    with pytest.raises(UserError) as info:
        label_files.read_label_file(label_file, image_dir, num_classes=10)
    assert f"{label_file}:{line}: " in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["../outside.JPEG", "/etc/hostname", "sub/0.JPEG", "..\\outside.JPEG", ".."])
def test_label_file_rejects_names_escaping_the_image_folder(tmp_path, image_dir, name):
    # The escaping target exists, so only the name check can reject it.
    write_image(tmp_path / "outside.JPEG", fmt="JPEG")
    write_image(image_dir / "sub" / "0.JPEG", fmt="JPEG")
    label_file = tmp_path / "label.txt"
    label_file.write_text(f"0.JPEG 1\n{name} 2\n")
    with pytest.raises(UserError, match="must be a plain file name") as info:
        label_files.read_label_file(label_file, image_dir, num_classes=10)
    assert f"{label_file}:2:" in str(info.value)


def test_label_file_names_first_missing_image_and_count(tmp_path, image_dir):
    label_file = tmp_path / "label.txt"
    label_file.write_text("0.JPEG 1\n5.JPEG 1\n1.JPEG 2\n6.JPEG 3\n2.JPEG 0\n")
    with pytest.raises(UserError) as info:
        label_files.read_label_file(label_file, image_dir, num_classes=10)
    message = str(info.value)
    assert f"{label_file}:2: image '5.JPEG' not found in {image_dir}" in message
    assert "2 of 5 listed images are missing" in message


def test_missing_label_file_or_image_folder_is_named(tmp_path, image_dir):
    with pytest.raises(UserError, match="label file not found: .*nope.txt"):
        label_files.read_label_file(tmp_path / "nope.txt", image_dir, num_classes=10)
    label_file = tmp_path / "label.txt"
    label_file.write_text("0.JPEG 1\n")
    with pytest.raises(UserError, match="image folder not found: .*no_images"):
        label_files.read_label_file(label_file, tmp_path / "no_images", num_classes=10)
    label_file.write_text("\n\n")
    with pytest.raises(UserError, match="no 'NAME LABEL' lines"):
        label_files.read_label_file(label_file, image_dir, num_classes=10)


def test_read_test_labels(tmp_path):
    path = tmp_path / "test_labels.txt"
    path.write_text("12.png 3\r\n0.png 1\n\n2.png 0\n")
    assert label_files.read_test_labels(path) == {12: 3, 0: 1, 2: 0}
    path.write_text("12.png 3\nabc.png 1\n")
    with pytest.raises(UserError, match=f"{path}:2: 'abc.png' is not named N"):
        label_files.read_test_labels(path)
    path.write_text("12.png 3\n12.jpg 1\n")
    with pytest.raises(UserError, match=f"{path}:2: duplicate image id 12"):
        label_files.read_test_labels(path)
    path.write_text("1.png 3\n2.png 7\n")
    with pytest.raises(UserError, match=f"{path}:2: label 7 out of range"):
        label_files.read_test_labels(path, num_classes=5)


# --------------------------------------------------------------------------- folders


def test_scan_image_folder(tmp_path):
    root = tmp_path / "train"
    write_image(root / "zebra" / "a.PNG", fmt="PNG")
    write_image(root / "apple" / "x.jpeg", fmt="JPEG")
    write_image(root / "apple" / "nested" / "y.JPG", fmt="JPEG")
    write_image(root / "apple" / ".hidden.jpg", fmt="JPEG")
    (root / "apple" / "notes.txt").write_text("not an image")
    write_image(root / "mango" / "b.webp", fmt="WEBP")
    write_image(root / ".cache" / "c.png", fmt="PNG")
    samples, classes = label_files.scan_image_folder(root)
    assert classes == ["apple", "mango", "zebra"]
    assert samples == [
        (root / "apple" / "x.jpeg", 0),
        (root / "apple" / "nested" / "y.JPG", 0),
        (root / "mango" / "b.webp", 1),
        (root / "zebra" / "a.PNG", 2),
    ]

    (root / "empty").mkdir()
    with pytest.raises(UserError, match="empty: class folder holds no image"):
        label_files.scan_image_folder(root)
    with pytest.raises(UserError, match="no class sub-folders"):
        label_files.scan_image_folder(write_image(tmp_path / "flat" / "0.png").parent)
    with pytest.raises(UserError, match="image folder not found"):
        label_files.scan_image_folder(tmp_path / "missing")


def test_linked_folders_and_loops_give_each_file_once(tmp_path):
    root = tmp_path / "train"
    for c in ("0", "1"):
        for i in range(20):
            write_image(root / c / f"{i}.png", color=(i, int(c), 0), fmt="PNG")
    os.symlink(".", root / "0" / "loop")  # a loop: 0/loop/loop/... reaches the same 20 files forever
    os.symlink(root / "1", root / "0" / "also_one")  # class 1's files linked into class 0
    with pytest.raises(UserError, match="are the same file with labels"):
        label_files.resolve_samples(
            DataConfig(root=str(tmp_path), train_dir="train", train_labels="", num_classes=2, val_fraction=0.2)
        )
    (root / "0" / "also_one").unlink()
    samples, _ = label_files.scan_image_folder(root)
    assert len(samples) == 40  # not 200: the loop is walked once
    train, val = label_files.resolve_samples(
        DataConfig(root=str(tmp_path), train_dir="train", train_labels="", num_classes=2, val_fraction=0.2)
    )
    real = lambda items: {os.path.realpath(p) for p, _ in items}  # noqa: E731
    assert len(train) + len(val) == 40 and not real(train) & real(val)  # no file in both splits


def test_links_in_a_label_file_never_put_one_file_in_both_splits(tmp_path, image_dir):
    for i in range(3, 10):
        write_image(image_dir / f"{i}.JPEG", color=(i, 0, 0), fmt="JPEG")
    for i in range(10):
        os.symlink(image_dir / f"{i}.JPEG", image_dir / f"link{i}.JPEG")
    labels = tmp_path / "label.txt"
    labels.write_text("".join(f"{i}.JPEG {i % 2}\nlink{i}.JPEG {i % 2}\n" for i in range(10)))
    with pytest.warns(UserWarning, match="10 image path\\(s\\) lead to files already listed"):
        train, val = label_files.resolve_samples(
            DataConfig(
                root=str(tmp_path), train_dir="images", train_labels="label.txt", num_classes=2, val_fraction=0.3
            )
        )
    real = lambda items: {os.path.realpath(p) for p, _ in items}  # noqa: E731
    assert len(train) + len(val) == 10 and not real(train) & real(val)


def test_test_folder_links_that_go_nowhere_and_ids_that_do_not_fit(tmp_path):
    folder = tmp_path / "test"
    write_image(folder / "0.png", fmt="PNG")
    os.symlink(folder / "2.png", folder / "1.png")  # 1 -> 2 -> 1: a loop
    os.symlink(folder / "1.png", folder / "2.png")
    with pytest.raises(UserError, match=r"1.png: a broken or looping symbolic link in the test folder"):
        label_files.list_test_images(folder)
    (folder / "1.png").unlink()
    (folder / "2.png").unlink()
    write_image(folder / "99999999999999999999999.png", fmt="PNG")
    with pytest.raises(UserError, match=r"99999999999999999999999.png: image id .* is larger than the largest"):
        label_files.list_test_images(folder)


def test_a_label_file_entry_that_is_a_looping_link_is_named(tmp_path, image_dir):
    os.symlink(image_dir / "loop.JPEG", image_dir / "loop.JPEG")
    labels = tmp_path / "label.txt"
    labels.write_text("0.JPEG 0\nloop.JPEG 1\n")
    with pytest.raises(UserError, match=r"label.txt:2: image 'loop.JPEG' is a broken or looping symbolic link"):
        label_files.read_label_file(labels, image_dir, 2)


def test_list_test_images_sorts_ids_naturally(tmp_path):
    test_dir = tmp_path / "test"
    for name in ("10.png", "2.png", "1.PNG", "0.jpg", "3.JPEG", "11.webp"):
        write_image(test_dir / name, fmt="PNG")
    (test_dir / ".DS_Store").write_bytes(b"junk")
    items = label_files.list_test_images(test_dir)
    assert [i for _, i in items] == [0, 1, 2, 3, 10, 11]
    assert items[4] == (test_dir / "10.png", 10)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("sub/", "sub: sub-folder in the test folder"),
        ("abc.png", "abc.png: test image name must be an integer id"),
        ("-3.png", "-3.png: test image name must be an integer id"),
        ("4.txt", "4.txt: not a test image"),
        ("2.jpg", "2.png: duplicate image id 2 (also 2.jpg)"),
        ("002.png", "2.png: duplicate image id 2 (also 002.png)"),
    ],
)
def test_list_test_images_errors_name_the_entry(tmp_path, extra, expected):
    test_dir = tmp_path / "test"
    write_image(test_dir / "2.png", fmt="PNG")
    if extra.endswith("/"):
        (test_dir / extra).mkdir()
    else:
        (test_dir / extra).write_bytes(b"x")
    with pytest.raises(UserError, match=re.escape(expected)):
        label_files.list_test_images(test_dir)


def test_list_test_images_empty_or_missing(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(UserError, match="no test images"):
        label_files.list_test_images(tmp_path / "test")
    with pytest.raises(UserError, match="test image folder not found"):
        label_files.list_test_images(tmp_path / "missing")


# --------------------------------------------------------------------------- splits


def test_stratified_split_proportions_and_determinism():
    sizes = {0: 100, 1: 20, 2: 3, 3: 1, 4: 2, 5: 15}
    labels = [c for c, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng(0)
    labels = [labels[i] for i in rng.permutation(len(labels))]
    train, val = label_files.stratified_split(labels, 0.1, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    per_class = Counter(labels[i] for i in val)
    # round(0.1 * n), half up; >= 1 for classes with >= 2 samples; a singleton stays in train.
    assert per_class == {0: 10, 1: 2, 2: 1, 4: 1, 5: 2}
    assert (train, val) == label_files.stratified_split(labels, 0.1, seed=0)
    assert val != label_files.stratified_split(labels, 0.1, seed=1)[1]
    assert label_files.stratified_split(labels, 0.0, seed=0) == (list(range(len(labels))), [])
    # Never the whole class, even when the fraction rounds to it.
    few = [0, 0, 1, 1, 1]
    _, val = label_files.stratified_split(few, 0.9, seed=0)
    assert Counter(few[i] for i in val) == {0: 1, 1: 2}


def test_stratified_split_independent_of_class_order():
    # Same samples per class (same within-class order), classes interleaved differently.
    blocks = {c: [f"{c}-{k}" for k in range(12 + c)] for c in range(5)}
    order_a = [(c, s) for c in range(5) for s in blocks[c]]
    order_b = [(c, s) for c in (3, 0, 4, 2, 1) for s in blocks[c]]
    order_c = sorted(order_a, key=lambda cs: (int(cs[1].split("-")[1]), cs[0]))  # round-robin

    def val_names(order):
        _, val = label_files.stratified_split([c for c, _ in order], 0.25, seed=7)
        return {order[i][1] for i in val}

    assert val_names(order_a) == val_names(order_b) == val_names(order_c)


# --------------------------------------------------------------------------- decoding


def test_load_image_grayscale_and_palette(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = images.load_image(tmp_path / "gray.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert (out == gray[:, :, None]).all()

    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    pal.save(tmp_path / "pal.png")
    out = images.load_image(tmp_path / "pal.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 255, 0]

    pal.save(tmp_path / "pal_t.png", transparency=1)  # index 1 (green) fully transparent
    out = images.load_image(tmp_path / "pal_t.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 0]


def test_load_image_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 128, 0], [255, 255, 255]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = images.load_image(tmp_path / "a.png")
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [100, 50, 25]
    assert out[0, 2].tolist() == [0, 0, 0]
    la = Image.fromarray(rgba[..., [0, 3]].copy(), "LA")
    la.save(tmp_path / "la.png")
    assert images.load_image(tmp_path / "la.png")[0, :, 0].tolist() == [200, 100, 0]


def test_load_image_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = images.load_image(tmp_path / "deep.png")
    assert out[0, :, 0].tolist() == [0, 1, 117, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_load_image_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = images.load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (6, 10, 3)
    r, g, b = out[3, 5].astype(int)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


def test_load_image_lab_tiff_is_colour_managed(tmp_path):
    Image.new("LAB", (4, 3), (128, 128, 128)).save(tmp_path / "lab.tif")  # L=50%, neutral a/b
    out = images.load_image(tmp_path / "lab.tif")
    assert out.shape == (3, 4, 3)
    assert abs(int(out[0, 0, 0]) - 119) <= 2 and out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]


def test_load_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    arr[:10, :20] = (255, 0, 0)  # top-left quadrant red
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif.tobytes())
    out = images.load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    # After a clockwise quarter turn the stored top-left is displayed top-right.
    assert out[5, 15, 0] > 200 and out[5, 5, 0] < 50


def test_load_image_errors_name_the_file(tmp_path):
    good = noisy_jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a PNG\n")
    (tmp_path / "stub.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cases = {
        "cut.jpg": "cannot decode image (truncated file)",
        "empty.png": "empty file",
        "text.png": "not an image file",
        "stub.png": "truncated or corrupt",
        "missing.png": "not found",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError) as info:
            images.load_image(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: "), str(info.value)
        assert expected in str(info.value)


def test_load_image_truncation_detected_even_if_pil_flag_was_set(tmp_path, monkeypatch):
    good = noisy_jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserError, match="truncated"):
        images.load_image(tmp_path / "cut.jpg")


def test_load_image_refuses_oversized_images(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", size=(100, 100), fmt="PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 99 * 100)
    with pytest.raises(UserError, match="big.png: image too large .*decompression bomb"):
        images.load_image(tmp_path / "big.png")
    assert images.check_image_header(tmp_path / "big.png").startswith("image too large")


# --------------------------------------------------------------------------- datasets


def test_image_dataset_returns_uint8_chw(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = datasets.ImageDataset([(tmp_path / "a.png", 4)], transform=None)
    x, y = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 20, 30) and y == 4
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1))
    x, _ = datasets.ImageDataset([(tmp_path / "a.png", 4)], create_eval_transform(16))[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8


def make_mixed_samples(tmp_path: Path) -> list[tuple[Path, int]]:
    good = noisy_jpeg_bytes(32)
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(noisy_jpeg_bytes(32, seed=i))
    (tmp_path / "1.jpg").write_bytes(b"")  # fails the header check
    (tmp_path / "3.jpg").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
    return [(tmp_path / f"{i}.jpg", i) for i in range(6)]


def test_image_dataset_error_mode_names_bad_file(tmp_path):
    ds = datasets.ImageDataset(make_mixed_samples(tmp_path), transform=None)
    assert len(ds) == 6
    with pytest.raises(UserError, match="3.jpg: cannot decode image"):
        ds[3]


def test_image_dataset_skip_mode_replaces_and_reports(tmp_path):
    samples = make_mixed_samples(tmp_path)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image\(s\): .*1\.jpg: cannot decode image"):
        ds = datasets.ImageDataset(samples, transform=None, bad_images="skip", max_bad=5)
    assert [label for _, label in ds.samples] == [0, 2, 3, 4, 5]  # header check dropped 1.jpg
    with pytest.warns(UserWarning, match=r"3\.jpg: cannot decode image \(truncated"):
        x, label = ds[2]  # 3.jpg fails the full decode -> the next sample (4.jpg)
    assert label == 4
    assert torch.equal(x, datasets.ImageDataset([samples[4]], None)[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the known-bad file is skipped silently now
        assert ds[2][1] == 4
    assert [p.name for p, _ in ds.bad] == ["1.jpg", "3.jpg"]


def test_check_images_reports_header_failures(tmp_path):
    samples = make_mixed_samples(tmp_path) + [(tmp_path / "gone.jpg", 6)]
    good, bad = images.check_images(samples, max_bad=2)
    assert [label for _, label in good] == [0, 2, 3, 4, 5]
    assert [(p.name, reason.split(" (")[0]) for p, reason in bad] == [
        ("1.jpg", "cannot decode image"),
        ("gone.jpg", "image file not found"),
    ]
    with pytest.raises(
        UserError,
        match=r"2 of 7 images cannot be read \(more than data.max_bad_images=1\); "
        r"first: .*1\.jpg: cannot decode image \(empty file",
    ):
        images.check_images(samples, max_bad=1)


def test_image_dataset_skip_mode_limit_counts_late_failures(tmp_path):
    samples = make_mixed_samples(tmp_path)
    with pytest.warns(UserWarning):
        ds = datasets.ImageDataset(samples, transform=None, bad_images="skip", max_bad=1)
    with pytest.raises(UserError, match="more than data.max_bad_images=1 unreadable images; last: .*3.jpg"):
        ds[2]


def test_test_image_dataset(tmp_path):
    write_image(tmp_path / "7.png", size=(40, 24), fmt="PNG")
    (tmp_path / "8.png").write_bytes(b"not an image")
    ds = datasets.TestImageDataset([(tmp_path / "7.png", 7), (tmp_path / "8.png", 8)], 32)
    x, image_id, ok = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and image_id == 7 and ok
    assert x[:, 16, 16].tolist() == [10, 20, 30]
    x, image_id, ok = ds[1]  # an unreadable file is flagged, not raised, so every bad file can be named
    assert x.shape == (3, 32, 32) and not x.any() and image_id == 8 and not ok


# --------------------------------------------------------------------------- resolve_samples


def test_resolve_samples_label_file_and_split(tmp_path):
    root = tmp_path / "root"
    lines = []
    for i in range(40):
        write_image(root / "imgs" / f"{i}.png", fmt="PNG")
        lines.append(f"{i}.png {i % 4}")
    (root / "label.txt").write_text("\n".join(lines))
    cfg = DataConfig(
        root=str(root), train_dir="imgs", train_labels="label.txt", num_classes=4, val_fraction=0.2, split_seed=3
    )
    train, val = label_files.resolve_samples(cfg)
    assert len(train) == 32 and len(val) == 8
    assert Counter(label for _, label in val) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert all(p.parent == root / "imgs" for p, _ in train + val)

    cfg.val_fraction = 0.0
    assert label_files.resolve_samples(cfg) == ([(root / "imgs" / f"{i}.png", i % 4) for i in range(40)], [])

    # Absolute label path, and a second label file whose images live in val_dir.
    write_image(root / "val_imgs" / "v0.png", fmt="PNG")
    (tmp_path / "val.txt").write_text("v0.png 1\n")
    cfg.val_labels, cfg.val_dir = str(tmp_path / "val.txt"), "val_imgs"
    train, val = label_files.resolve_samples(cfg)
    assert len(train) == 40 and val == [(root / "val_imgs" / "v0.png", 1)]

    # A validation list overlapping the training list is refused.
    (tmp_path / "val.txt").write_text("v0.png 1\n")
    cfg.val_dir = ""
    with pytest.raises(UserError, match="val.txt:1: image 'v0.png' not found"):
        label_files.resolve_samples(cfg)
    (tmp_path / "val.txt").write_text("3.png 3\n")
    with pytest.raises(UserError, match="1 validation images are also in the training set"):
        label_files.resolve_samples(cfg)


def test_resolve_samples_image_folder(tmp_path):
    for cls in ("cat", "dog", "eel"):
        for i in range(5):
            write_image(tmp_path / "train" / cls / f"{i}.png", fmt="PNG")
    cfg = DataConfig(root=str(tmp_path), train_dir="train", train_labels="", num_classes=3, val_fraction=0.2)
    train, val = label_files.resolve_samples(cfg)
    assert len(train) == 12 and Counter(label for _, label in val) == {0: 1, 1: 1, 2: 1}
    cfg.num_classes = 4
    with pytest.raises(UserError, match="3 class folders but data.num_classes=4"):
        label_files.resolve_samples(cfg)


# --------------------------------------------------------------------------- demo data

DEMO_ARGS = dict(num_classes=3, train_per_class=4, test_per_class=2, image_size=32, seed=5)


def test_demo_data_is_deterministic_with_the_challenge_layout(tmp_path):
    info_a = demo_data.generate_demo_data(tmp_path / "a", **DEMO_ARGS)
    info_b = demo_data.generate_demo_data(tmp_path / "b", **DEMO_ARGS)
    assert info_a["created"] and info_b["created"]
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 12 + 6 + 3
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert sorted(tmp_path.iterdir()) == [a, b]  # no temporary folder left behind

    # The layout the configs expect (root=a, train_dir=train, train_labels=label.txt).
    cfg = DataConfig(root=str(a), train_dir="train", train_labels="label.txt", num_classes=3, val_fraction=0.0)
    train, _ = label_files.resolve_samples(cfg)
    assert [p.name for p, _ in train] == [f"{i}.JPEG" for i in range(12)]
    assert Counter(label for _, label in train) == {0: 4, 1: 4, 2: 4}
    assert Image.open(train[0][0]).format == "JPEG" and images.load_image(train[0][0]).shape == (32, 32, 3)
    test_items = label_files.list_test_images(a / "test")
    test_labels = label_files.read_test_labels(a / "test_labels.txt", num_classes=3)
    assert [i for _, i in test_items] == sorted(test_labels) == list(range(6))
    assert Counter(test_labels.values()) == {0: 2, 1: 2, 2: 2}
    assert Image.open(test_items[0][0]).format == "PNG"

    demo_data.generate_demo_data(tmp_path / "c", **{**DEMO_ARGS, "seed": 6})
    assert (tmp_path / "c" / "train" / "0.JPEG").read_bytes() != (a / "train" / "0.JPEG").read_bytes()


def test_demo_data_reuse_regenerate_and_refuse(tmp_path):
    out = tmp_path / "demo"
    demo_data.generate_demo_data(out, **DEMO_ARGS)
    stamp = (out / "label.txt").stat().st_mtime_ns
    again = demo_data.generate_demo_data(out, **DEMO_ARGS)
    assert again["created"] is False and (out / "label.txt").stat().st_mtime_ns == stamp

    bigger = demo_data.generate_demo_data(out, **{**DEMO_ARGS, "num_classes": 4})
    assert bigger["created"] and len(list((out / "train").iterdir())) == 16
    assert json.loads((out / demo_data.MARKER).read_text())["num_classes"] == 4

    user_data = tmp_path / "mine"
    write_image(user_data / "photo.png", fmt="PNG")
    with pytest.raises(UserError, match="not a generated demo data set"):
        demo_data.generate_demo_data(user_data, **DEMO_ARGS)
    assert [p.name for p in user_data.iterdir()] == ["photo.png"]


def test_demo_data_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write_split(folder, split, *args):
        calls.append(split)
        if split == "test":
            raise KeyboardInterrupt
        return original(folder, split, *args)

    original = demo_data._write_split
    monkeypatch.setattr(demo_data, "_write_split", failing_write_split)
    with pytest.raises(KeyboardInterrupt):
        demo_data.generate_demo_data(tmp_path / "demo", **DEMO_ARGS)
    assert calls == ["train", "test"]
    assert list(tmp_path.iterdir()) == []


def test_demo_data_classes_and_cli(tmp_path, capsys):
    factors = demo_data.resolve_class_factors(10)
    assert len(set(factors)) == 10
    assert {s for s, _, _ in factors} == set(range(5)) and {h for _, h, _ in factors} == {0, 1}
    assert len(set(demo_data.resolve_class_factors(100))) == 100
    with pytest.raises(UserError, match="demo data supports"):
        demo_data.resolve_class_factors(demo_data.MAX_CLASSES + 1)

    argv = [
        "--out",
        str(tmp_path / "d"),
        "--num-classes",
        "2",
        "--train-per-class",
        "2",
        "--test-per-class",
        "1",
        "--image-size",
        "16",
    ]
    assert demo_data.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 training images" in printed and "2 test images" in printed and str(tmp_path / "d") in printed
    assert demo_data.main(argv) == 0 and "reused" in capsys.readouterr().out


def test_a_failed_swap_keeps_the_old_demo_set(tmp_path, monkeypatch):
    """The demo set is replaced as one step (core.io.publishing): if the new folder cannot take the
    old one's place, the old set is put back whole, never removed with nothing in its place."""
    out = tmp_path / "demo"
    demo_data.generate_demo_data(out, **DEMO_ARGS)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp" in Path(src).name and Path(dst) == out:  # the new set taking the old one's place
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(UserError, match=r"demo: cannot write the demo data \(No space left on device\); nothing was"):
        demo_data.generate_demo_data(out, **{**DEMO_ARGS, "seed": 7})
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p != out]  # nothing left beside it (its lock neither)


def test_demo_data_on_a_path_it_cannot_write_is_one_line(tmp_path, capsys):
    # issue 35, 16: a read-only or full file system gave a traceback (also inside train). We run as
    # root, whom permissions do not stop: a file where a folder should be, and /proc, do.
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file/demo: cannot create the lock .*/file/\.demo\.lock"):
        demo_data.generate_demo_data(tmp_path / "file" / "demo", **DEMO_ARGS)
    argv = ["--out", "/proc/demo-data-test", "--num-classes", "2", "--train-per-class", "1", "--test-per-class", "1"]
    assert demo_data.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: /proc/demo-data-test: cannot ") and "Traceback" not in line


READER = """
import sys
from pathlib import Path
from train.demo_data import hold_demo_data
hold_demo_data(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_demo_data_never_replaces_a_set_a_running_command_reads(tmp_path):
    # issue 35, 14: demo-data took no lock and replaced data/demo under a running train, which died
    # later on "image file not found". train holds the set it reads (train.setup.ensure_demo_data).
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "demo"
    demo_data.generate_demo_data(out, **DEMO_ARGS)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"^{out}: a running command \(train\) reads this demo data set"):
            demo_data.generate_demo_data(out, **{**DEMO_ARGS, "seed": 7})
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert demo_data.generate_demo_data(out, **DEMO_ARGS)["created"] is False  # the same set: reused
    finally:
        reader.communicate("", timeout=60)
    assert demo_data.generate_demo_data(out, **{**DEMO_ARGS, "seed": 7})["created"] is True  # free again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_hard_link_listed_under_two_labels_is_named(tmp_path, image_dir):
    # issue 35, 7: realpath leaves two hard links two names; the inode is one file.
    os.link(image_dir / "0.JPEG", image_dir / "hard.JPEG")
    labels = tmp_path / "label.txt"
    labels.write_text("0.JPEG 0\n1.JPEG 1\n2.JPEG 0\n10.JPEG 1\nhard.JPEG 1\n")
    cfg = DataConfig(root=str(tmp_path), train_dir="images", train_labels="label.txt", num_classes=2)
    with pytest.raises(UserError, match=r"hard.JPEG and .*0.JPEG are the same file with labels 1 and 0"):
        label_files.resolve_samples(cfg)
