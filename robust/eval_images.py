"""The labelled images every robustness stage evaluates on, loaded once as one float tensor.

The test folder when its hidden labels (``data.test_labels``) exist, else the validation split of
the training data; ``eval.subset`` picks a seeded subset. ``evaluate``, ``make-testset`` (its
source images), ``ablate`` and the Phase II file's score (``phase2.score``) read them here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import Config
from core.datasets import ImageDataset
from core.errors import UserError
from core.images import to_float_images
from core.labels import (
    hidden_labels_path,
    list_test_images,
    read_hidden_labels,
    resolve_samples,
    resolve_test_dir,
    select_subset,
)
from core.transforms import create_eval_transform
from infer.testset_folder import hold_folders_for_reading


def load_eval_images(cfg: Config, image_size: int) -> tuple[torch.Tensor, torch.Tensor, str, list[str]]:
    """Labelled images as one float tensor in [0, 1] at ``image_size``, their labels, the source
    and each image's key (its path relative to ``data.root``: what seeds its corruptions).

    The test folder when its hidden labels (``data.test_labels``) exist, else the validation
    split of the training data. ``eval.subset`` picks a seeded subset.
    """
    labels_path = hidden_labels_path(cfg.data)
    test_dir = resolve_test_dir(cfg.data) if cfg.data.test_dir else None
    # a make-testset folder is read as one set: none replaces it meanwhile
    with hold_folders_for_reading([test_dir, labels_path], "data.test_dir"):
        labels = read_hidden_labels(cfg.data)
        if labels is not None:
            samples = [(p, labels[i]) for p, i in list_test_images(resolve_test_dir(cfg.data)) if i in labels]
            source = f"test set ({labels_path})"
        else:
            samples = resolve_samples(cfg.data)[1]
            source = "validation split" + (f" ({labels_path} not found)" if labels_path is not None else "")
        if not samples:
            raise UserError(
                "evaluate: no labelled images (set data.test_labels, or data.val_fraction > 0 for a validation split)"
            )
        samples = [samples[i] for i in select_subset(len(samples), cfg.eval.subset, cfg.eval.seed)]
        dataset = ImageDataset(samples, create_eval_transform(image_size), cfg.data.bad_images, cfg.data.max_bad_images)
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    keys = [image_key(path, cfg.data.root) for path, _ in dataset.samples]
    return to_float_images(torch.stack(images)), torch.tensor(labels), source, keys


def image_key(path: Path, root: str) -> str:
    """``path`` relative to ``root`` (POSIX form), or the whole path when it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()
