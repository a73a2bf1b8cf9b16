"""Label files, image folders and the train/validation split.

Formats (the challenge's, as its public solutions read them):

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

import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config.schema import DataConfig
from core.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TEST_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

MAX_IMAGE_ID = 2**63 - 1  # ids travel as int64 tensors (and JSON readers lose larger integers)
_LABEL_RE = re.compile(r"-?[0-9]+")
_ID_RE = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------- label files


def resolve_path(root: str, path: str) -> Path:
    """``path`` relative to ``root`` unless absolute; '' stays ''."""
    if not path:
        return Path("")
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(root) / p


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
    # without a separator no name is absolute: no Path() per line (127k lines in Phase II)
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UserError(
            f"{where}: '{name}' must be a plain file name inside the image folder "
            "(no absolute path, '..' or path separator)"
        )


def parse_label_lines(
    path: Path, num_classes: int | None = None, what: str = "label file"
) -> list[tuple[int, str, int]]:
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
            raise UserError(
                f"{where}: label {label} out of range {bound}"
                + (" (data.num_classes)" if num_classes is not None else "")
            )
        _check_plain_name(name, where)
        if name in first_line:
            raise UserError(f"{where}: duplicate image name '{name}' (first listed on line {first_line[name]})")
        first_line[name] = line_no
        entries.append((line_no, name, label))
    if not entries:
        raise UserError(f"{path}: no 'NAME LABEL' lines")
    return entries


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a looping link (ELOOP); DirEntry raises it instead of answering False
        return False


def _list_files(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {entry.name for entry in it if _is_file(entry)}


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
    missing = [
        (line_no, name) for line_no, name, _ in entries if name not in present and not (image_dir / name).is_file()
    ]
    if missing:
        line_no, name = missing[0]
        what = "is a broken or looping symbolic link" if (image_dir / name).is_symlink() else "not found"
        raise UserError(
            f"{path}:{line_no}: image '{name}' {what} in {image_dir} "
            f"({len(missing)} of {len(entries)} listed images are missing)"
        )
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


def resolve_test_dir(cfg: DataConfig) -> Path:
    """The test folder ``data.test_dir`` names (relative to ``data.root``); unset is one line."""
    if not cfg.test_dir:
        raise UserError(
            "config key 'data.test_dir' is not set: no test images to predict (Phase II shipped none; "
            "./run.sh make-testset makes a Phase-I-like set from held-out images)"
        )
    return resolve_path(cfg.root, cfg.test_dir)


def hidden_labels_path(cfg: DataConfig) -> Path | None:
    """Where ``data.test_labels`` points (``None`` when unset); the file may not exist."""
    return resolve_path(cfg.root, cfg.test_labels) if cfg.test_labels else None


def read_hidden_labels(cfg: DataConfig) -> dict[int, int] | None:
    """The hidden test labels as ``{image_id: label}``, or ``None`` when unset or absent.

    A local score is optional (the real test set has no labels), so a missing file is not an
    error; a file that exists must be valid.
    """
    path = hidden_labels_path(cfg)
    return read_test_labels(path, cfg.num_classes) if path is not None and path.is_file() else None


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
        raise UserError(
            f"{root}: no class sub-folders (ImageFolder layout expects {root}/<class>/<image>; "
            "set data.train_labels for a label file)"
        )
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = []
        seen_dirs: set[str] = set()  # real folders walked for this class: a loop is never walked twice
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real)
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
        if entry.is_symlink() and not os.path.exists(path):
            raise UserError(f"{path}: a broken or looping symbolic link in the test folder")
        if entry.is_dir():
            raise UserError(f"{path}: sub-folder in the test folder (expected only N.png images)")
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in TEST_EXTENSIONS:
            raise UserError(f"{path}: not a test image (expected N{' / N'.join(TEST_EXTENSIONS)})")
        if not _ID_RE.fullmatch(stem):
            raise UserError(f"{path}: test image name must be an integer id (N.png)")
        image_id = int(stem)
        if image_id > MAX_IMAGE_ID:
            raise UserError(f"{path}: image id {stem} is larger than the largest supported id {MAX_IMAGE_ID}")
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


def file_ids(paths: Sequence[Path]) -> list[tuple[int, int] | str]:
    """The identity of each path's file, ``(st_dev, st_ino)``: symbolic links, loops and hard links
    reach one file by several paths, and only the inode says so (``realpath`` leaves two hard links
    two names). A path that cannot be read keeps its real path (the readers name it later)."""
    ids: list[tuple[int, int] | str] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            ids.append(os.path.realpath(path))
        else:
            ids.append((st.st_dev, st.st_ino))
    return ids


def _drop_duplicate_files(samples: list[tuple[Path, int]], where: Path) -> list[tuple[Path, int]]:
    """Keep one sample per real file (links and loops reach a file by several paths), so a file
    can never land in both the training and the validation split; two labels for it are an error."""
    first: dict[tuple[int, int] | str, tuple[Path, int]] = {}
    kept = []
    for (path, label), real in zip(samples, file_ids([p for p, _ in samples])):
        if real not in first:
            first[real] = (path, label)
            kept.append((path, label))
        elif first[real][1] != label:
            raise UserError(
                f"{where}: {path} and {first[real][0]} are the same file with labels {label} and {first[real][1]}"
            )
    if len(kept) < len(samples):
        warnings.warn(
            f"{where}: {len(samples) - len(kept)} image path(s) lead to files already listed "
            "(links); each file is used once",
            stacklevel=2,
        )
    return kept


def train_source(cfg: DataConfig) -> str:
    """The training data's file (label file, or the ImageFolder root), for messages."""
    return str(resolve_path(cfg.root, cfg.train_labels or cfg.train_dir))


def check_layout(cfg: DataConfig) -> None:
    """The folder and files the ``data`` section names exist; one line naming the first missing one."""
    root = Path(cfg.root)
    wanted = [("data.train_dir", cfg.train_dir, True)]
    if cfg.train_labels:
        wanted.append(("data.train_labels", cfg.train_labels, False))
    if cfg.val_labels:
        wanted.append(("data.val_labels", cfg.val_labels, False))
    for key, value, folder in wanted:
        path = resolve_path(cfg.root, value)
        if path.is_dir() if folder else path.is_file():
            continue
        if not root.is_dir() and not Path(os.path.expanduser(value)).is_absolute():
            raise UserError(
                f"data.root {root}: no such folder (the data go there as README 'The real challenge' shows, "
                "or set data.root)"
            )
        raise UserError(f"{key}: {path} is not {'a folder' if folder else 'a file'} (data.root is {root})")


def check_class_coverage(labels: Sequence[int], num_classes: int, source: str) -> None:
    """Every class of ``[0, num_classes)`` has at least one training image (a 20-class label file read
    by a 100-class config trains 80 classes on nothing, and no error would ever say so)."""
    missing = sorted(set(range(num_classes)) - set(labels))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise UserError(
            f"{source}: {len(missing)} of data.num_classes={num_classes} classes have no training image "
            f"(missing: {shown}); is this the label file of another phase? (data.allow_missing_classes=true "
            "trains anyway)"
        )


def resolve_samples(cfg: DataConfig) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Training and validation samples as the config describes them.

    Paths are relative to ``data.root`` unless absolute. ``train_labels == ""`` reads an
    ImageFolder under ``train_dir``. A ``val_labels`` file gives the validation set (its
    images in ``val_dir``, else ``train_dir``); otherwise a stratified ``val_fraction`` of the
    training set is held out with ``split_seed``; ``val_fraction=0`` gives no validation.
    """
    check_layout(cfg)
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
        samples = _drop_duplicate_files(samples, train_dir)
        if not cfg.allow_missing_classes:
            check_class_coverage([label for _, label in samples], cfg.num_classes, train_source(cfg))
        train_files = set(file_ids([p for p, _ in samples]))
        shared = [p for (p, _), real in zip(val, file_ids([p for p, _ in val])) if real in train_files]
        if shared:
            # Validating on training images would inflate the numbers best-checkpoint
            # selection relies on.
            raise UserError(
                f"{resolve_path(cfg.root, cfg.val_labels)}: {len(shared)} validation images are also "
                f"in the training set (first: {shared[0]}); remove them from one of the lists"
            )
        return samples, val
    samples = _drop_duplicate_files(samples, train_dir)
    if not cfg.allow_missing_classes:
        check_class_coverage([label for _, label in samples], cfg.num_classes, train_source(cfg))
    if cfg.val_fraction <= 0:
        return samples, []
    train_idx, val_idx = stratified_split([label for _, label in samples], cfg.val_fraction, cfg.split_seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def select_subset(n: int, subset: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of ``subset`` of ``n`` indices in their original order (all if 0)."""
    if not subset or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=subset, replace=False))
