"""The datasets the loaders read from: labelled images and test images, as uint8 CHW tensors."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from core.errors import UserError
from core.images import check_images, load_image
from core.transforms import create_eval_transform


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW; a stack of views (VxHxWx3, AugMix with its consistency loss) -> Vx3xHxW."""
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"transform must return HxWx3 uint8, got {image.dtype} {image.shape}")
    axes = (2, 0, 1) if image.ndim == 3 else (0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(axes)))


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

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable | None,
        bad_images: str = "error",
        max_bad: int = 100,
    ) -> None:
        if bad_images not in ("error", "skip"):  # the config's value is checked by validate_config
            raise ValueError(f"bad_images must be 'error' or 'skip', not {bad_images!r}")
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
                    raise UserError(
                        f"more than data.max_bad_images={self.max_bad} unreadable images; last: {exc}"
                    ) from None
                warnings.warn(f"skipping unreadable image {exc}", stacklevel=2)
        raise UserError("no readable image left in the data set")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._load(index)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return _to_chw_tensor(image), label


class TestImageDataset(Dataset):
    """Test images ``[(path, image_id)]`` -> ``(uint8 CHW image, image_id, ok)``, resized square.

    An undecodable file gives ``ok=False`` and a black image instead of killing the loader
    worker, so the caller can name every bad file at once.

    Args:
        items: ``(path, image_id)`` pairs, e.g. from :func:`core.labels.list_test_images`.
        image_size: Side of the square the images are resized to (:class:`EvalResize`).
        decode_threads: Threads that decode a batch together (``__getitems__``) when the
            loader has no workers, as ``submit`` does on CPU: decoding between two forwards
            would otherwise leave all but one core idle. OpenCV and PIL release the GIL while
            decoding. Loader workers always decode one image at a time.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, items: Sequence[tuple[Path, int]], image_size: int, decode_threads: int = 1) -> None:
        self.items = [(Path(p), int(i)) for p, i in items]
        self.image_size = image_size
        self.transform = create_eval_transform(image_size)
        self.decode_threads = decode_threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # a worker process gets no thread pool

    def __getitems__(self, indices: Sequence[int]) -> list:
        if self.decode_threads <= 1 or len(indices) < 2 or get_worker_info() is not None:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return list(self._pool.map(self.__getitem__, indices))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        path, image_id = self.items[index]
        try:
            image = self.transform(image=load_image(path))["image"]
            return _to_chw_tensor(image), image_id, True
        except UserError:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), image_id, False


def create_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, persistent: bool = True) -> DataLoader:
    """In-order loader for validation and prediction (no augmentation, nothing dropped); ``persistent``:
    its workers stay between passes (false: started for each pass, e.g. validation between epochs)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
