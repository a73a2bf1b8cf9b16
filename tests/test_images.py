"""The decoding fast path gives exactly the pixels PIL gives, and is taken only where that is safe."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core import images
from core.errors import UserError


def _pil_decode(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _opencv_taken(path) -> bool:
    content = path.read_bytes()
    if images._decode_plain_png(content) is not None:
        return True
    with Image.open(io.BytesIO(content)) as img:
        return images._decode_plain_jpeg(content, img) is not None


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("JPEG", {"quality": 95}),
        ("JPEG", {"quality": 60, "subsampling": 0}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("PNG", {"optimize": True}),
    ],
)
def test_fast_decode_gives_the_pixels_pil_gives(tmp_path, fmt, kwargs):
    arr = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(arr, fmt, **kwargs))
    assert _opencv_taken(path)
    out = images.load_image(path)
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
    assert np.array_equal(images.load_image(tmp_path / "trailing.jpg"), _pil_decode(tmp_path / "trailing.jpg"))
    assert np.array_equal(images.load_image(tmp_path / "text.png"), arr)
    for name in ("cut.jpg", "cut.png"):
        with pytest.raises(UserError, match="truncated"):
            images.load_image(tmp_path / name)

    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 3  # rotated 180 degrees
    im.save(tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif.tobytes())
    assert not _opencv_taken(tmp_path / "rot.jpg")
    assert np.array_equal(images.load_image(tmp_path / "rot.jpg"), _pil_decode(tmp_path / "rot.jpg")[::-1, ::-1])


# --- memory: decoded in strips, refused by the bytes a decode needs -------------------------


def _odd_modes() -> dict:
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (23, 17), dtype=np.uint8)
    rgb = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (23, 17), dtype=np.uint16)
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 3
    return {
        "1": (Image.fromarray(gray > 127), lambda img: np.asarray(img.convert("RGB"))),
        "L": (Image.fromarray(gray), lambda img: np.asarray(img.convert("RGB"))),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), lambda img: np.asarray(img.convert("RGB"))),
        "I;16": (
            Image.fromarray(deep),
            lambda img: np.repeat(((deep.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, 2),
        ),
        "P+transparency": (
            palette,
            lambda img: (
                (
                    np.asarray(img.convert("RGBA"))[..., :3].astype(np.uint16)
                    * np.asarray(img.convert("RGBA"))[..., 3:]
                    + 127
                )
                // 255
            ),
        ),
    }


@pytest.mark.parametrize("mode", sorted(_odd_modes()))
def test_conversion_in_strips_gives_the_whole_images_pixels(mode, monkeypatch):
    img, expected = _odd_modes()[mode]
    monkeypatch.setattr(images, "_STRIP_BYTES", 1)  # one row per strip: 23 strips
    out = images._to_rgb(img)
    assert out.dtype == np.uint8 and out.shape == (23, 17, 3)
    assert np.array_equal(out, expected(img))


def test_images_are_refused_by_the_bytes_their_decode_needs(tmp_path, monkeypatch):
    # The same pixel count in two modes: 1-bit needs 4.5 bytes per pixel to decode, 16-bit 5.5.
    Image.new("1", (100, 100)).save(tmp_path / "bits.png")
    Image.new("I;16", (100, 100)).save(tmp_path / "deep.png")
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 50_000)
    assert images.load_image(tmp_path / "bits.png").shape == (100, 100, 3)
    with pytest.raises(UserError, match=r"deep.png: image too large to decode: 100x100 in mode I;16 needs"):
        images.load_image(tmp_path / "deep.png")
    assert images.check_image_header(tmp_path / "deep.png").startswith("image too large to decode")
    assert images.check_image_header(tmp_path / "bits.png") is None
