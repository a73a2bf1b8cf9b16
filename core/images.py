"""Image decoding: any image file a user may have -> an HxWx3 uint8 RGB array, or one clear error.

Every problem with a file raises :class:`UserError` naming it, so the CLI prints it as one
line. ``to_float_images`` turns the uint8 batches the loaders ship into the float [0, 1]
tensors every model of this project takes.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.errors import UserError

# Images larger than this are refused before decoding: a 64 Mpx RGB image is 192 MB of
# pixels, far beyond anything a 224 px classifier needs, and a tiny file that claims more is
# a decompression bomb. PIL's own limit (``Image.MAX_IMAGE_PIXELS``) is left untouched.
MAX_PIXELS = 64_000_000

# And no decode may need more memory than this (see decode_budget: the decoder's own image, 1, 2
# or 4 bytes per pixel by mode, plus our 3-byte RGB output, since conversions run in strips of
# rows). Any 64 Mpx image fits, except EXIF-rotated 4-byte modes above 46 Mpx (they need a copy).
MAX_DECODE_BYTES = 512 * 2**20
# Decodes above this size run one at a time per process (threaded decoding multiplies the rest).
LARGE_DECODE_BYTES = 64 * 2**20
_LARGE_DECODE = threading.Lock()
_STRIP_BYTES = 4 * 2**20  # pixels converted at a time
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # else 4

# Leading bytes of the formats above: an undecodable file that starts like an image is a
# damaged image, anything else is not an image at all.
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8")

# PNG chunks that may carry an EXIF orientation, which PIL only finds after a full decode
# (so such files skip the OpenCV fast path, see _decode_plain_png).
_PNG_METADATA = {b"eXIf", b"iTXt", b"zTXt", b"tEXt"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112

# Truncated files must fail loudly: with this flag PIL would pad them with grey silently.
# It is a process-wide PIL setting, so load_image() re-asserts it in case a library flips it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _describe_open_error(path: Path, exc: Exception) -> str:
    """A short reason for a file PIL cannot open or decode."""
    text = str(exc)
    if "truncated" in text.lower():
        return "cannot decode image (truncated file)"
    if isinstance(exc, UnidentifiedImageError):
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
        except OSError:
            head = b""
        if head.startswith(_IMAGE_MAGIC):
            return "cannot decode image (truncated or corrupt file)"
        return "not an image file (unrecognised format)"
    return f"cannot decode image ({type(exc).__name__}: {text.splitlines()[0] if text else 'corrupt file'})"


def decode_budget(mode: str, width: int, height: int, rotated: bool = False) -> int:
    """Bytes a decode of a ``width`` x ``height`` image in PIL ``mode`` needs at its peak: the
    decoder's image, our RGB output and, for an EXIF rotation, the decoder's image once more.
    (OpenCV's fast path takes 6 bytes per pixel, within the RGB budget of 7.5.)"""
    stored = _STORED_BYTES.get(mode, 4)
    # + half a byte per pixel: the decoders' row buffers and the strip being converted (measured
    # by ./run.sh bench --only decode: 4.2-8.0 bytes per pixel across modes)
    return width * height * (2 * (stored + 3 + (stored if rotated else 0)) + 1) // 2


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB, converted in strips of rows straight into the output,
    so the memory is the decoded image plus the output (no full-size float, int64 or RGBA copy)."""
    width, height = img.size
    rows = max(1, _STRIP_BYTES // (4 * max(width, 1)))
    if rows >= height:
        return _strip_to_rgb(img)  # a small image is one strip: no copy to cut
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = _strip_to_rgb(img.crop((0, top, width, bottom)))
    return out


def _strip_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB (called on strips of rows: see :func:`_to_rgb`).

    * Alpha (RGBA, LA, PA, palette with transparency) is composited on **black**
      (``colour * alpha``): fully transparent pixels become 0, the same value the zero-padding
      defense layer uses, and no bright halo is invented around cut-outs.
    * 16-bit images (``I;16*``, and ``I`` which PIL uses for 16-bit PNG/TIFF) are scaled from
      0..65535 to 0..255 with rounding (``round(v / 257)``), not clipped.
    * LAB goes through a colour-managed transform (PIL's plain ``convert`` mangles it);
      CMYK, YCbCr, HSV, 1-bit and float images go through PIL's own conversion.
    """
    mode = img.mode
    if mode == "P":
        mode_to = "RGBA" if "transparency" in img.info else "RGB"
        img, mode = img.convert(mode_to), mode_to
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit range; "I" may hold 32-bit values, but PIL only produces it from 16-bit files.
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        return ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        img = ImageCms.applyTransform(img, lab_to_srgb)
    elif mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _is_plain_complete_png(data: bytes) -> bool:
    """An 8-bit truecolor PNG whose chunks tile the file exactly (IHDR first, IEND last), none
    holding metadata that could rotate it. A walk over chunk headers: no pixel work."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":
        return False
    pos, chunk = 8, b""
    while pos + 12 <= len(data):
        chunk = data[pos + 4 : pos + 8]
        if chunk in _PNG_METADATA:
            return False
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return chunk == b"IEND" and pos == len(data)


def _imdecode_rgb(data: bytes, height: int, width: int) -> np.ndarray | None:
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    if bgr is None or bgr.dtype != np.uint8 or bgr.shape != (height, width, 3):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: no second full-size array


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """Pixels of a plain complete 8-bit RGB PNG through OpenCV, else ``None``.

    Why a fast path at all: on small images PIL's per-call overhead dominates, while OpenCV
    decodes the same file with the same libpng / libjpeg-turbo underneath (identical pixels,
    ``tests/test_images.py`` checks it), markedly faster for small files (BENCHMARKS.md). Only
    the common case is taken, and only files that end where their format ends,
    so a truncated file is never decoded leniently; everything else (other modes and formats,
    rotation metadata, oversized or damaged files) returns ``None`` and goes through PIL,
    which applies the conversions and raises the precise errors of :func:`load_image`.
    """
    if not _is_plain_complete_png(data):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > MAX_PIXELS or decode_budget("RGB", width, height) > MAX_DECODE_BYTES:
        return None  # PIL refuses it with the decompression-bomb message
    with _decode_slot(decode_budget("RGB", width, height)):
        return _imdecode_rgb(data, height, width)


def _decode_plain_jpeg(data: bytes, img: Image.Image) -> np.ndarray | None:
    """Pixels of an RGB JPEG without EXIF/XMP rotation through OpenCV, else ``None``.

    ``img`` is the PIL image opened lazily on the same file: PIL parses EXIF and XMP with
    the header, so the orientation check costs no pixel decode. A file must end with the
    end-of-image marker, which entropy-coded data cannot contain (0xFF is byte-stuffed).
    """
    if img.format != "JPEG" or img.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return None
    return _imdecode_rgb(data, img.height, img.width)


@contextlib.contextmanager
def _decode_slot(budget: int):
    """One large decode at a time per process; small ones run freely in parallel."""
    if budget <= LARGE_DECODE_BYTES:
        yield
        return
    with _LARGE_DECODE:
        yield


def _size_problem(img: Image.Image, rotated: bool) -> str | None:
    """Why ``img`` (opened, not decoded; ``rotated`` by its EXIF) is too large to decode, or None."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        return (
            f"image too large ({width}x{height} = {width * height} pixels, "
            f"limit {MAX_PIXELS}); refusing a possible decompression bomb"
        )
    budget = decode_budget(img.mode, width, height, rotated)
    if budget > MAX_DECODE_BYTES:
        return (
            f"image too large to decode: {width}x{height} in mode {img.mode} needs {budget / 2**20:.1f} MB "
            f"(limit {MAX_DECODE_BYTES / 2**20:.0f} MB); refusing a possible decompression bomb"
        )
    return None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are used as stored
        return 1


def load_image(path: Path) -> np.ndarray:
    """Decode ``path`` to an HxWx3 uint8 RGB array.

    EXIF orientation is applied. A missing, empty, truncated, oversized or non-image file
    raises UserError ``"<path>: <what is wrong>"``.
    """
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if size == 0:
        raise UserError(f"{path}: cannot decode image (empty file, 0 bytes)")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        fast = _decode_plain_png(data)
        if fast is not None:
            return fast
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                rotated = _orientation(img) != 1
                problem = _size_problem(img, rotated)
                if problem:
                    raise UserError(f"{path}: {problem}")
                with _decode_slot(decode_budget(img.mode, *img.size, rotated)):
                    fast = _decode_plain_jpeg(data, img)
                    if fast is not None:
                        return fast
                    img.load()  # full decode here, so truncation is detected now
                    try:
                        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
                    except Exception:  # noqa: BLE001 - damaged EXIF: keep the pixels as stored
                        pass
                    return _to_rgb(img)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{path}: image too large; refusing a possible decompression bomb ({exc})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image file") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UserError(f"{path}: {_describe_open_error(path, exc)}") from None


def read_image_header(path: Path) -> tuple[int, int, str] | str:
    """``(width, height, format)`` from the file's header (no pixel decode), else the reason it
    cannot be used.

    Catches missing, empty, non-image and oversized files and most truncations at the header;
    a file cut inside its pixel data is only found by a full decode (see ImageDataset).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "cannot decode image (empty file, 0 bytes)"
        # No warnings.catch_warnings() here: it is not thread-safe and check_images() runs
        # this in threads. PIL only warns above its own limit (89 Mpx), which MAX_PIXELS
        # undercuts, so such a file is rejected below all the same.
        with Image.open(path) as img:
            problem = _size_problem(img, _orientation(img) != 1)
            if problem:
                return problem
            return img.size[0], img.size[1], str(img.format)
    except FileNotFoundError:
        return "image file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large; refusing a possible decompression bomb"
    except Exception as exc:  # noqa: BLE001
        return _describe_open_error(path, exc)


def check_image_header(path: Path) -> str | None:
    """Cheap validity check (no pixel decode): ``None`` if fine, else the reason (:func:`read_image_header`)."""
    header = read_image_header(path)
    return header if isinstance(header, str) else None


def check_images(
    samples: Sequence[tuple[Path, int]], max_bad: int, num_threads: int = 8
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Header-check every sample (threaded, no pixel decode).

    Returns ``(good_samples, bad)`` with ``bad`` as ``(path, reason)`` in sample order. Raises
    UserError naming the first bad file once more than ``max_bad`` files fail.
    """
    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        reasons = list(pool.map(check_image_header, paths, chunksize=256))
    good = [s for s, r in zip(samples, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if len(bad) > max_bad:
        path, reason = bad[0]
        raise UserError(
            f"{len(bad)} of {len(samples)} images cannot be read (more than "
            f"data.max_bad_images={max_bad}); first: {path}: {reason}"
        )
    return good, bad


def to_float_images(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW batch -> float32 in [0, 1] (the loaders ship uint8 to keep worker traffic small).

    A batch of views (N x V x C x H x W, AugMix's consistency loss) keeps its layout."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
