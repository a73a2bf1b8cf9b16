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
