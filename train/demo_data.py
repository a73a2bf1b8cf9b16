"""The built-in offline demo data set, in the challenge's file layout.

``python -m train.demo_data --out data/demo`` (or ``./run.sh demo-data``) writes::

    data/demo/label.txt          0.JPEG 3 ...   (training labels, challenge format)
    data/demo/train/N.JPEG       training images (JPEG, quality 95)
    data/demo/test/N.png         test images, ids shuffled so the id tells nothing
    data/demo/test_labels.txt    N.png LABEL   (hidden labels, for a local score)
    data/demo/demo_data.json     marker: the generation arguments (written last)

so ``data.root=data/demo data.train_dir=train data.train_labels=label.txt
data.test_dir=test data.test_labels=test_labels.txt`` reads it.

A class is a combination of factors: shape (disk, ring, stripes, cross, dots, checker,
triangle, frame) x colour family (hues spread around the colour wheel), and for more than
48 classes also the number of copies (1-3). Each shape is drawn at a random position, size
and rotation, in a random shade of its colour family, over a random low-saturation gradient
background with Gaussian noise. No single pixel gives the class away (each colour family
holds several shapes, and shape needs spatial context), yet a tiny ConvNeXt learns it on
CPU within a few epochs.

Output is deterministic: the same arguments give the same bytes (every image has its own
generator seeded by ``(seed, split, index)``). The set is written into a temporary folder
and renamed into place, so an interrupted run never leaves half a data set; a complete set
with the same arguments is reused.
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import fcntl
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UserError
from core.io import publishing, read_json, settle_leftovers
from core.outputs import hold_output, try_flock

MARKER = "demo_data.json"
FORMAT_VERSION = 2  # bump whenever the rendering changes: stale sets are regenerated
SHAPES = ("disk", "ring", "stripes", "cross", "dots", "checker", "triangle", "frame")
MAX_HUES = 6
MAX_COPIES = 3
MAX_CLASSES = len(SHAPES) * MAX_HUES * MAX_COPIES
_SPLITS = {"train": 0, "test": 1}


def resolve_class_factors(num_classes: int) -> list[tuple[int, int, int]]:
    """``(shape, hue_family, copies)`` of each class, and the hue family count.

    The smallest grid that fits: as few hue families as let the shapes cover the classes
    (10 classes -> 5 shapes x 2 hues), then copies for more than 48 classes.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise UserError(f"demo data supports 2..{MAX_CLASSES} classes, got {num_classes}")
    n_hues = min(MAX_HUES, math.ceil(num_classes / len(SHAPES)))
    n_shapes = min(len(SHAPES), math.ceil(num_classes / n_hues))
    factors = []
    for k in range(num_classes):
        shape, rest = k % n_shapes, k // n_shapes
        factors.append((shape, rest % n_hues, 1 + rest // n_hues))
    return factors


def _hue_count(factors: Sequence[tuple[int, int, int]]) -> int:
    return max(h for _, h, _ in factors) + 1


def _rotated(cx: float, cy: float, angle: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _square(x: float, y: float, half_w: float, half_h: float) -> list[tuple[float, float]]:
    return [(x - half_w, y - half_h), (x + half_w, y - half_h), (x + half_w, y + half_h), (x - half_w, y + half_h)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw one shape of radius ``r`` as 255 on an 'L' mask.

    The shapes differ in outline *and* in local structure (solid, hollow, bars, dots,
    checks), which a small ConvNet picks up within a few epochs.
    """
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "disk":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "stripes":
        for y in (-0.62, 0.0, 0.62):
            draw.polygon(_rotated(cx, cy, angle, _square(0.0, y * r, 0.95 * r, 0.16 * r)), fill=255)
    elif kind == "cross":
        for half_w, half_h in ((r, 0.2 * r), (0.2 * r, r)):
            draw.polygon(_rotated(cx, cy, angle, _square(0.0, 0.0, half_w, half_h)), fill=255)
    elif kind == "dots":
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                ((x, y),) = _rotated(cx, cy, angle, [(0.62 * r * i, 0.62 * r * j)])
                d = 0.2 * r
                draw.ellipse((x - d, y - d, x + d, y + d), fill=255)
    elif kind == "checker":
        cell = 0.4 * r
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x, y = (i - 1.5) * cell, (j - 1.5) * cell
                    draw.polygon(_rotated(cx, cy, angle, _square(x, y, cell / 2, cell / 2)), fill=255)
    elif kind == "triangle":
        corners = [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(_rotated(cx, cy, angle, corners), fill=255)
    elif kind == "frame":
        a = 0.8 * r
        draw.polygon(_rotated(cx, cy, angle, _square(0.0, 0.0, a, a)), fill=255)
        draw.polygon(_rotated(cx, cy, angle, _square(0.0, 0.0, 0.55 * a, 0.55 * a)), fill=0)
    else:
        raise ValueError(kind)


def render_image(rng: np.random.Generator, factors: tuple[int, int, int], n_hues: int, size: int) -> Image.Image:
    """One RGB image of the class given by ``(shape, hue_family, copies)``."""
    shape, hue_family, copies = factors
    ss = 2  # draw the mask at 2x and shrink it: anti-aliased edges
    canvas = size * ss
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    r_max = 0.42 if copies == 1 else 0.26 if copies == 2 else 0.2
    centres: list[tuple[float, float, float]] = []
    for _ in range(copies):
        for _attempt in range(20):  # keep copies apart so they stay countable
            r = rng.uniform(0.8, 1.0) * r_max
            cx, cy = rng.uniform(r, 1 - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q for x, y, q in centres):
                break
        centres.append((cx, cy, r))
        _draw_shape(draw, SHAPES[shape], cx * canvas, cy * canvas, r * canvas, rng.uniform(0, 2 * math.pi))
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[:, :, None] / 255.0

    # Background: a gradient between two low-saturation colours of any hue.
    bg = [np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.9))) for _ in range(2)]
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(theta) * t[None, :] + np.sin(theta) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    background = bg[0] * (1 - ramp[:, :, None]) + bg[1] * ramp[:, :, None]

    # Foreground: a saturated shade of the class's hue family.
    hue = (hue_family / n_hues + rng.uniform(-0.3, 0.3) / n_hues) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)))
    image = background * (1 - alpha) + fg * alpha
    image = image * 255.0 + rng.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def _write_split(
    folder: Path,
    split: str,
    labels: Sequence[int],
    factors: list[tuple[int, int, int]],
    image_size: int,
    seed: int,
    ext: str,
) -> None:
    folder.mkdir(parents=True)
    n_hues = _hue_count(factors)
    fmt = "JPEG" if ext == ".JPEG" else "PNG"
    for index, label in enumerate(labels):
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        image = render_image(rng, factors[label], n_hues, image_size)
        (folder / f"{index}{ext}").write_bytes(_encode(image, fmt))


def _marker(args: dict) -> dict:
    return {"generator": "train.demo_data", "version": FORMAT_VERSION, **args}


def _read_marker(out: Path) -> dict | None:
    try:
        data = read_json(out / MARKER)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_set(out: Path, marker: dict) -> bool:
    """``out`` is a complete demo set made with the arguments (and format version) in ``marker``."""
    existing = _read_marker(out)
    return existing is not None and all(existing.get(k) == v for k, v in marker.items() if k != "generator")


def _write_set(
    folder: Path,
    factors: list,
    marker: dict,
    num_classes: int,
    train_per_class: int,
    test_per_class: int,
    image_size: int,
    seed: int,
) -> None:
    """The whole set into ``folder``: both splits, their label files and the marker."""
    order = np.random.default_rng([seed, 2])
    train_labels = order.permutation(np.repeat(np.arange(num_classes), train_per_class)).tolist()
    test_labels = order.permutation(np.repeat(np.arange(num_classes), test_per_class)).tolist()
    _write_split(folder / "train", "train", train_labels, factors, image_size, seed, ".JPEG")
    _write_split(folder / "test", "test", test_labels, factors, image_size, seed, ".png")
    (folder / "label.txt").write_text("".join(f"{i}.JPEG {c}\n" for i, c in enumerate(train_labels)), encoding="utf-8")
    (folder / "test_labels.txt").write_text(
        "".join(f"{i}.png {c}\n" for i, c in enumerate(test_labels)), encoding="utf-8"
    )
    classes = [{"label": k, "shape": SHAPES[s], "hue_family": h, "copies": c} for k, (s, h, c) in enumerate(factors)]
    (folder / MARKER).write_text(json.dumps({**marker, "classes": classes}, indent=1) + "\n", encoding="utf-8")


def generate_demo_data(
    out: Path,
    num_classes: int = 10,
    train_per_class: int = 200,
    test_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
) -> dict:
    """Write the demo data set to ``out`` (or reuse a complete one made with the same arguments).

    Returns a summary: ``root``, ``created`` (False when reused), image counts and arguments.
    Raises UserError if ``out`` exists and is not a demo data set (user data is never replaced).
    """
    out = Path(out)
    args = {
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "test_per_class": int(test_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    if train_per_class < 1 or test_per_class < 1:
        raise UserError("demo data needs at least 1 training and 1 test image per class")
    if image_size < 16:
        raise UserError(f"demo data image size must be at least 16, got {image_size}")
    factors = resolve_class_factors(num_classes)
    summary = {
        "root": str(out),
        "train_images": num_classes * train_per_class,
        "test_images": num_classes * test_per_class,
        **args,
    }
    marker = _marker(args)
    if out.is_dir() and _same_set(out, marker):
        return {**summary, "created": False}
    start = time.perf_counter()
    try:
        # Decided and written holding the folder's lock (two demo-data or train runs at once), and
        # never over a set a running command reads (hold_demo_data).
        with hold_output(out, "demo-data", "data.root"), _replacing(out):
            settle_leftovers(out)
            if out.is_dir() and _same_set(out, marker):  # a twin finished it while we waited
                return {**summary, "created": False}
            replaced = _check_replaceable(out, args)
            with publishing(out) as tmp:
                _write_set(tmp, factors, marker, **args)
    except OSError as exc:  # a full or read-only file system, a file where a folder should be
        raise UserError(f"{out}: cannot write the demo data ({exc.strerror or exc}); nothing was replaced") from None
    return {**summary, "created": True, "replaced": replaced, "seconds": round(time.perf_counter() - start, 2)}


def _check_replaceable(out: Path, args: dict) -> dict | None:
    """The arguments of the demo set ``out`` holds (None: nothing there); user data is never replaced."""
    if not out.exists():
        return None
    if _read_marker(out) is None and any(out.iterdir()):
        raise UserError(
            f"{out}: exists and is not a generated demo data set (no {MARKER}); choose another folder, it is left "
            "untouched"
        )
    return {k: v for k, v in (_read_marker(out) or {}).items() if k in args}


_read_fds: list[int] = []  # the demo sets this process reads, held for its life


def hold_demo_data(root: Path) -> None:
    """Mark the demo set at ``root`` as read by this process until it ends (a shared kernel lock on
    its marker; forked loader workers share it): ``demo-data`` refuses to replace it meanwhile.
    Nothing happens where ``root`` holds no demo set."""
    try:
        fd = os.open(Path(root) / MARKER, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    if not try_flock(fd, fcntl.LOCK_SH):
        os.close(fd)
        raise UserError(f"{root}: the demo data are being replaced by demo-data; run again once it has ended")
    _read_fds.append(fd)


@contextlib.contextmanager
def _replacing(out: Path):
    """An exclusive kernel lock on the marker of the set at ``out`` (if any) while it is replaced."""
    try:
        fd = os.open(out / MARKER, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        if not try_flock(fd, fcntl.LOCK_EX):
            raise UserError(
                f"{out}: a running command (train) reads this demo data set; not replacing it under it: wait for it "
                "to end, or write the new set elsewhere (--out, data.root)"
            )
        yield
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        info = generate_demo_data(
            Path(args.out),
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            image_size=args.image_size,
            seed=args.seed,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    root = Path(info["root"])
    verb = f"wrote in {info['seconds']} s" if info["created"] else "already complete, reused"
    print(
        f"demo data {root} ({verb}): {info['train_images']} training images in {root / 'train'} "
        f"with labels {root / 'label.txt'}, {info['test_images']} test images in {root / 'test'} "
        f"with hidden labels {root / 'test_labels.txt'}; {info['num_classes']} classes, "
        f"{info['image_size']} px, seed {info['seed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
