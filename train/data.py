"""Image decoding, label files, splits and the datasets the loaders read from.

Formats (see DESIGN.md §2):

* Training: a folder of images plus a label file with one ``NAME LABEL`` per line
  (``0.JPEG 5``), whitespace separated, no header; or an ImageFolder layout (one sub-folder
  per class, classes sorted by name).
* Test: a flat folder of ``N.png`` images, ``image_id = N``, ordered naturally by id.
* Hidden test labels (optional): ``N.png LABEL`` lines.

Names in a label file must be plain file names inside the image folder: no absolute paths,
no ``..`` and no path separators, so a label file can never point outside the data folder.
File names containing whitespace cannot be expressed in this format.

Every problem with user data raises :class:`UserError` naming the file (and ``file:line`` for
label files), so the CLI can print it as one line.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from train.config import DataConfig, resolve_path
from train.errors import UserError

# Images larger than this are refused before decoding: a 64 Mpx RGB image is 192 MB of
# pixels, far beyond anything a 224 px classifier needs, and a tiny file that claims more is
# a decompression bomb. PIL's own limit (``Image.MAX_IMAGE_PIXELS``) is left untouched.
MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TEST_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Leading bytes of the formats above: an undecodable file that starts like an image is a
# damaged image, anything else is not an image at all.
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8")

# PNG chunks that may carry an EXIF orientation, which PIL only finds after a full decode
# (see _decode_with_opencv).
_PNG_METADATA = {b"eXIf", b"iTXt", b"zTXt", b"tEXt"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112

_LABEL_RE = re.compile(r"-?[0-9]+")
_ID_RE = re.compile(r"[0-9]+")

# Truncated files must fail loudly: with this flag PIL would pad them with grey silently.
# It is a process-wide PIL setting, so load_image() re-asserts it in case a library flips it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# --------------------------------------------------------------------------- decoding


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


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB.

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
        wide = np.asarray(img).astype(np.int64)
        gray = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        return ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
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
        chunk = data[pos + 4:pos + 8]
        if chunk in _PNG_METADATA:
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return chunk == b"IEND" and pos == len(data)


def _imdecode_rgb(data: bytes, height: int, width: int) -> np.ndarray | None:
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    if bgr is None or bgr.dtype != np.uint8 or bgr.shape != (height, width, 3):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """Pixels of a plain complete 8-bit RGB PNG through OpenCV, else ``None``.

    Why a fast path at all: on small images PIL's per-call overhead dominates, while OpenCV
    decodes the same file with the same libpng / libjpeg-turbo underneath (identical pixels,
    ``tests/test_bench.py`` checks it): 64 px test PNGs load ~1.35x faster, training JPEGs
    ~1.6x. Only the common case is taken, and only files that end where their format ends,
    so a truncated file is never decoded leniently; everything else (other modes and formats,
    rotation metadata, oversized or damaged files) returns ``None`` and goes through PIL,
    which applies the conversions and raises the precise errors of :func:`load_image`.
    """
    if not _is_plain_complete_png(data):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > MAX_PIXELS:
        return None  # PIL refuses it with the decompression-bomb message
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
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise UserError(f"{path}: image too large ({width}x{height} = {width * height} pixels, "
                                    f"limit {MAX_PIXELS}); refusing a possible decompression bomb")
                fast = _decode_plain_jpeg(data, img)
                if fast is not None:
                    return fast
                img.load()  # full decode here, so truncation is detected now
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - damaged EXIF: keep the pixels as stored
                    oriented = img
                return _to_rgb(oriented)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{path}: image too large; refusing a possible decompression bomb ({exc})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image file") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UserError(f"{path}: {_describe_open_error(path, exc)}") from None


def check_image_header(path: Path) -> str | None:
    """Cheap validity check (no pixel decode): ``None`` if fine, else the reason.

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
            width, height = img.size
        if width * height > MAX_PIXELS:
            return f"image too large ({width}x{height} pixels, limit {MAX_PIXELS})"
    except FileNotFoundError:
        return "image file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large; refusing a possible decompression bomb"
    except Exception as exc:  # noqa: BLE001
        return _describe_open_error(path, exc)
    return None


def check_images(samples: Sequence[tuple[Path, int]], max_bad: int,
                 num_threads: int = 8) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Header-check every sample (threaded; ~0.1 ms per file, no pixel decode).

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
        raise UserError(f"{len(bad)} of {len(samples)} images cannot be read (more than "
                        f"data.max_bad_images={max_bad}); first: {path}: {reason}")
    return good, bad


# --------------------------------------------------------------------------- label files


def _read_text_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    # split("\n") rather than splitlines(): the latter also splits on \x0b, \x1c, \u2028...
    # which would shift the line numbers quoted in errors.
    return [line.rstrip("\r") for line in text.split("\n")]


def _check_plain_name(name: str, where: str) -> None:
    if (name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
            or Path(name).is_absolute()):
        raise UserError(f"{where}: '{name}' must be a plain file name inside the image folder "
                        "(no absolute path, '..' or path separator)")


def parse_label_lines(path: Path, num_classes: int | None = None,
                      what: str = "label file") -> list[tuple[int, str, int]]:
    """``NAME LABEL`` lines -> ``[(line_no, name, label)]``; blank lines and CRLF are fine.

    Rejects (naming ``file:line``) a line without exactly two fields, a non-integer label, a
    label outside ``[0, num_classes)`` (or negative when ``num_classes`` is None), a name
    that is not a plain file name, and a duplicate name.
    """
    entries: list[tuple[int, str, int]] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(_read_text_lines(path, what), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_no}"
        if len(fields) != 2:
            raise UserError(f"{where}: expected 'NAME LABEL', got {len(fields)} field(s): {line.strip()[:80]!r}")
        name, label_text = fields
        if not _LABEL_RE.fullmatch(label_text):
            raise UserError(f"{where}: label {label_text!r} is not an integer")
        label = int(label_text)
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise UserError(f"{where}: label {label} out of range {bound}"
                            + (" (data.num_classes)" if num_classes is not None else ""))
        _check_plain_name(name, where)
        if name in first_line:
            raise UserError(f"{where}: duplicate image name '{name}' (first listed on line {first_line[name]})")
        first_line[name] = line_no
        entries.append((line_no, name, label))
    if not entries:
        raise UserError(f"{path}: no 'NAME LABEL' lines")
    return entries


def _list_files(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {entry.name for entry in it if entry.is_file()}


def read_label_file(path: Path, image_dir: Path, num_classes: int) -> list[tuple[Path, int]]:
    """Read a challenge label file; returns ``[(image_dir / name, label)]`` in file order.

    Every listed image must exist in ``image_dir``; the error names the first missing one
    (with its line) and how many are missing.
    """
    path, image_dir = Path(path), Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"image folder not found: {image_dir} (listed images of {path} live there)")
    entries = parse_label_lines(path, num_classes)
    present = _list_files(image_dir)
    # The folder listing answers for almost every name at once; a name missing from it may
    # still open on a case-insensitive file system, so those few are checked one by one.
    missing = [(line_no, name) for line_no, name, _ in entries
               if name not in present and not (image_dir / name).is_file()]
    if missing:
        line_no, name = missing[0]
        raise UserError(f"{path}:{line_no}: image '{name}' not found in {image_dir} "
                        f"({len(missing)} of {len(entries)} listed images are missing)")
    return [(image_dir / name, label) for _, name, label in entries]


def read_test_labels(path: Path, num_classes: int | None = None) -> dict[int, int]:
    """Hidden test labels (``12.png 3`` lines) -> ``{image_id: label}``."""
    path = Path(path)
    labels: dict[int, int] = {}
    seen: dict[int, int] = {}
    for line_no, name, label in parse_label_lines(path, num_classes, what="test label file"):
        stem = Path(name).stem
        if not _ID_RE.fullmatch(stem):
            raise UserError(f"{path}:{line_no}: '{name}' is not named N.<ext> with an integer N")
        image_id = int(stem)
        if image_id in seen:
            raise UserError(f"{path}:{line_no}: duplicate image id {image_id} (first on line {seen[image_id]})")
        seen[image_id] = line_no
        labels[image_id] = label
    return labels


# --------------------------------------------------------------------------- folders


def _is_image_name(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def scan_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageFolder layout: ``root/<class>/**/<image>``; classes sorted by folder name.

    Hidden folders/files (leading '.') and non-image files are ignored, as in torchvision.
    Errors if there is no class folder or a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class sub-folders (ImageFolder layout expects {root}/<class>/<image>; "
                        "set data.train_labels for a label file)")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and _is_image_name(f)]
        if not found:
            raise UserError(f"{root / name}: class folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(p, label) for p in found]
    return samples, classes


def list_test_images(test_dir: Path) -> list[tuple[Path, int]]:
    """The test folder's ``N.<ext>`` images as ``[(path, N)]``, sorted by N (2 before 10).

    Hidden files are ignored; a sub-folder, another extension, a non-integer stem or two
    files with the same id are errors.
    """
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise UserError(f"test image folder not found: {test_dir}")
    items: dict[int, Path] = {}
    with os.scandir(test_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = test_dir / entry.name
        if entry.is_dir():
            raise UserError(f"{path}: sub-folder in the test folder (expected only N.png images)")
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in TEST_EXTENSIONS:
            raise UserError(f"{path}: not a test image (expected N{' / N'.join(TEST_EXTENSIONS)})")
        if not _ID_RE.fullmatch(stem):
            raise UserError(f"{path}: test image name must be an integer id (N.png)")
        image_id = int(stem)
        if image_id in items:
            raise UserError(f"{path}: duplicate image id {image_id} (also {items[image_id].name})")
        items[image_id] = path
    if not items:
        raise UserError(f"{test_dir}: no test images (expected N.png files)")
    return [(items[i], i) for i in sorted(items)]


# --------------------------------------------------------------------------- splits


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class hold-out: ``(train_indices, val_indices)``, each sorted.

    Each class keeps ``round(fraction * n)`` samples for validation (half rounds up), at
    least 1 when ``fraction > 0`` and the class has >= 2 samples, and never all of them (a
    singleton class stays in training). Each class is shuffled with its own generator seeded
    by ``(seed, label)``, so a class's split depends neither on the other classes nor on
    the order in which classes appear.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    train: list[int] = []
    val: list[int] = []
    for label, indices in by_class.items():
        n = len(indices)
        n_val = int(math.floor(fraction * n + 0.5))
        if fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        elif n < 2:
            n_val = 0
        rng = np.random.default_rng([int(seed) % 2**63, label % 2**63])
        order = rng.permutation(n)
        val += [indices[i] for i in order[:n_val]]
        train += [indices[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def resolve_samples(cfg: DataConfig) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Training and validation samples as the config describes them.

    Paths are relative to ``data.root`` unless absolute. ``train_labels == ""`` reads an
    ImageFolder under ``train_dir``. A ``val_labels`` file gives the validation set (its
    images in ``val_dir``, else ``train_dir``); otherwise a stratified ``val_fraction`` of the
    training set is held out with ``split_seed``; ``val_fraction=0`` gives no validation.
    """
    train_dir = resolve_path(cfg.root, cfg.train_dir)
    if cfg.train_labels:
        samples = read_label_file(resolve_path(cfg.root, cfg.train_labels), train_dir, cfg.num_classes)
    else:
        samples, classes = scan_image_folder(train_dir)
        if len(classes) != cfg.num_classes:
            raise UserError(f"{train_dir}: {len(classes)} class folders but data.num_classes={cfg.num_classes}")
    if cfg.val_labels:
        val_dir = resolve_path(cfg.root, cfg.val_dir) if cfg.val_dir else train_dir
        val = read_label_file(resolve_path(cfg.root, cfg.val_labels), val_dir, cfg.num_classes)
        train_paths = {os.path.abspath(p) for p, _ in samples}
        shared = [p for p, _ in val if os.path.abspath(p) in train_paths]
        if shared:
            # Validating on training images would inflate the numbers best-checkpoint
            # selection relies on.
            raise UserError(f"{resolve_path(cfg.root, cfg.val_labels)}: {len(shared)} validation images are also "
                            f"in the training set (first: {shared[0]}); remove them from one of the lists")
        return samples, val
    if cfg.val_fraction <= 0:
        return samples, []
    train_idx, val_idx = stratified_split([label for _, label in samples], cfg.val_fraction, cfg.split_seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


# --------------------------------------------------------------------------- datasets


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"transform must return HxWx3 uint8, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ImageDataset(Dataset):
    """``(samples, transform)`` -> ``(uint8 CHW tensor, label)``.

    ``transform`` is called as ``transform(image=hwc_uint8)["image"]`` (albumentations) and
    must keep uint8 HWC; the model converts to float [0, 1] (uint8 keeps worker -> main
    traffic 4x smaller).

    Bad images (``bad_images``):

    * ``"error"``: the first unreadable file raises UserError naming it.
    * ``"skip"``: at construction every file's header is checked (:func:`check_images`, no
      pixel decode: fast even for 127k images); files failing it are dropped and reported in
      one warning. A file that passes the header check but fails the full decode later (cut
      inside its pixel data) is replaced by the next readable sample (index + 1, ...), which
      keeps the output deterministic, and reported with a warning naming it. More than
      ``max_bad`` failures in total (per process / loader worker for the late ones) raise
      UserError. ``self.bad`` lists ``(path, reason)`` seen by this process.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable | None,
                 bad_images: str = "error", max_bad: int = 100) -> None:
        if bad_images not in ("error", "skip"):
            raise UserError(f"config key 'data.bad_images': {bad_images!r} is not one of error, skip")
        self.transform = transform
        self.bad_images = bad_images
        self.max_bad = max_bad
        self.bad: list[tuple[Path, str]] = []
        samples = [(Path(p), int(label)) for p, label in samples]
        if bad_images == "skip" and samples:
            samples, self.bad = check_images(samples, max_bad)
            if self.bad:
                shown = "; ".join(f"{p}: {r}" for p, r in self.bad[:5])
                more = f" (and {len(self.bad) - 5} more)" if len(self.bad) > 5 else ""
                warnings.warn(f"skipping {len(self.bad)} unreadable image(s): {shown}{more}", stacklevel=2)
            if not samples:
                raise UserError("no readable images left after skipping bad ones")
        self.samples = samples
        self._bad_paths: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        if self.bad_images == "error":
            path, label = self.samples[index]
            return load_image(path), label
        n = len(self.samples)
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self._bad_paths:
                continue
            try:
                return load_image(path), label
            except UserError as exc:
                self._bad_paths.add(path)
                self.bad.append((path, str(exc)))
                if len(self.bad) > self.max_bad:
                    raise UserError(f"more than data.max_bad_images={self.max_bad} unreadable images; "
                                    f"last: {exc}") from None
                warnings.warn(f"skipping unreadable image {exc}", stacklevel=2)
        raise UserError("no readable image left in the data set")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._load(index)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return _to_chw_tensor(image), label


class TestImageDataset(Dataset):
    """Test images: ``(items, transform)`` with items ``[(path, image_id)]`` -> ``(uint8 CHW, image_id)``."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, items: Sequence[tuple[Path, int]], transform: Callable | None) -> None:
        self.items = [(Path(p), int(i)) for p, i in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, image_id = self.items[index]
        image = load_image(path)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return _to_chw_tensor(image), image_id
