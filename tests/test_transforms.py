"""Augmentation pipelines: strict argument checking, reseeding across workers/epochs, eval determinism."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from core.config import AugConfig
from core.datasets import ImageDataset
from core.errors import UserError
from core.transforms import create_eval_transform, create_train_transform
from train.loaders import create_train_loader

SIZE = 32


def random_image(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_default_config_builds_and_runs_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform = create_train_transform(AugConfig(), SIZE)
        for seed in range(30):  # exercises most corruptions of the OneOf
            transform.set_random_seed(seed)
            out = transform(image=random_image())["image"]
            assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["AntialiasedResizedCrop", "HorizontalFlip", "OneOf"]
    assert len(transform.transforms[2].transforms) == len(AugConfig().corruptions)


def test_optional_parts_follow_the_config():
    cfg = AugConfig(color_jitter=0.4, corruption_p=0.0, extra=[{"name": "ToGray", "p": 0.1}])
    names = [type(t).__name__ for t in create_train_transform(cfg, SIZE).transforms]
    assert names == ["AntialiasedResizedCrop", "HorizontalFlip", "ColorJitter", "ToGray"]
    assert create_train_transform(cfg, SIZE).transforms[-1].p == 0.1


@pytest.mark.parametrize(
    "key, spec, expected",
    [
        (
            "corruptions",
            {"name": "GaussNoise", "var_limit": [10.0, 50.0]},
            "'var_limit' are not valid for transform GaussNoise",
        ),
        ("extra", {"name": "ImageCompression", "quality_lower": 30}, "'quality_lower' are not valid"),
        ("corruptions", {"name": "NoSuchBlur"}, "unknown albumentations transform 'NoSuchBlur'"),
        ("extra", {"name": "Compose"}, "unknown albumentations transform 'Compose'"),
        ("corruptions", {"name": "GaussNoise", "std_range": [2, 1]}, "bad arguments for GaussNoise"),
        ("extra", {"name": "RandomCrop", "height": 8, "width": 8}, "RandomCrop must keep a 32x32x3 uint8 image"),
        ("extra", {"name": "Normalize"}, "Normalize must keep a 32x32x3 uint8 image, got float32"),
        ("corruptions", {"blur_limit": 3}, "expected a mapping with a 'name' key"),
    ],
)
def test_bad_transform_entries_are_user_errors(key, spec, expected):
    entries = [{"name": "GaussianBlur"}, spec]
    cfg = AugConfig(**{key: entries})
    with pytest.raises(UserError) as info:
        create_train_transform(cfg, SIZE)
    assert f"aug.{key}[1]" in str(info.value)
    assert expected in str(info.value)


def test_bad_crop_ranges_are_user_errors():
    with pytest.raises(UserError, match="aug.scale"):
        create_train_transform(AugConfig(scale=[0.5]), SIZE)
    with pytest.raises(UserError, match="aug.scale"):
        create_train_transform(AugConfig(scale=[0.5, 1.5]), SIZE)
    with pytest.raises(UserError, match="aug.ratio"):
        create_train_transform(AugConfig(ratio=[1.3, 0.7]), SIZE)


def test_same_seed_same_output_and_draws_are_independent():
    transform = create_train_transform(AugConfig(), SIZE)
    image = random_image()
    outs = []
    for seed in (3, 3, 4):
        transform.set_random_seed(seed)
        outs.append(transform(image=image)["image"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])

    # Plain A.Compose.set_random_seed gives every child the same seed, so hflip (p=0.5) and
    # the corruption OneOf (p=0.3) make the same draw: a corruption would never come without
    # a flip. SeededCompose shares one generator, so the four combinations all occur.
    transform.save_applied_params = True
    combos = Counter()
    for seed in range(1000):
        transform.set_random_seed(seed)
        applied = {name for name, _ in transform(image=image)["applied_transforms"]}
        combos["HorizontalFlip" in applied, bool(applied - {"HorizontalFlip", "AntialiasedResizedCrop"})] += 1
    assert 100 < combos[False, True] < 200  # ~0.5 * 0.3 * 1000
    assert 100 < combos[True, True] < 200
    assert 250 < combos[False, False] < 450 and 250 < combos[True, False] < 450


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "0.png"
    Image.fromarray(random_image(64, 64, seed=1)).save(path)
    return path


def loader_epochs(image_path: Path, num_workers: int, epochs: int = 2) -> list[torch.Tensor]:
    """Per epoch, the 8 augmented copies of one image that the real training loader yields."""
    dataset = ImageDataset([(image_path, 0)] * 8, create_train_transform(AugConfig(), SIZE))
    loader = create_train_loader(dataset, batch_size=4, seed=3, num_workers=num_workers)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat([images for images, _ in loader]))
    return out


def test_training_loader_draws_per_sample_and_epoch_whatever_the_workers(image_path):
    e0, e1 = loader_epochs(image_path, num_workers=2)
    # Every copy of the image gets its own augmentation, and each epoch new ones.
    assert len({bytes(img.numpy()) for img in torch.cat([e0, e1])}) == 16
    # Seeded by (seed, epoch, sample): the same batches with no worker processes, or on a second run.
    same0, same1 = loader_epochs(image_path, num_workers=0)
    assert torch.equal(e0, same0) and torch.equal(e1, same1)


def test_eval_transform_is_deterministic_and_uses_area_for_downscale():
    transform = create_eval_transform(SIZE)
    image = random_image(80, 64)
    outs = []
    for seed in (0, 1, None):
        transform.set_random_seed(seed)
        outs.append(transform(image=image)["image"])
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert outs[0].shape == (SIZE, SIZE, 3) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    small = random_image(16, 20)
    up = transform(image=small)["image"]
    assert np.array_equal(up, cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("shape", [(80, 64), (16, 20), (SIZE, SIZE), (SIZE, 70), (20, 90), (SIZE + 1, SIZE - 1)])
def test_eval_transform_gives_albumentations_resize_pixels(shape):
    # EvalResize replaces A.Compose([A.Resize(...)]) for speed: the pixels must not change.
    reference = A.Compose([A.Resize(SIZE, SIZE, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")])
    image = random_image(*shape)
    out = create_eval_transform(SIZE)(image=image)["image"]
    assert np.array_equal(out, reference(image=image)["image"])


def test_pipelines_are_albumentations_composes():
    # Callers rely on the A.Compose API (set_random_seed, transforms, serialization repr).
    assert isinstance(create_train_transform(AugConfig(), SIZE), A.Compose)
    assert "AntialiasedResizedCrop" in repr(create_train_transform(AugConfig(), SIZE))


def test_training_corruptions_switch_off_with_an_empty_list(tiny_config):
    # aug.corruptions=[]: no corruption-style augmentation at all (evaluation's ImageNet-C stays unseen)
    image = random_image()
    applied = {}
    for overrides in ((), ("aug.corruptions=[]",)):
        transform = create_train_transform(tiny_config(*overrides).aug, SIZE)
        transform.save_applied_params = True
        names = set()
        for seed in range(100):
            transform.set_random_seed(seed)
            names |= {name for name, _ in transform(image=image)["applied_transforms"]}
        applied[overrides] = names - {"AntialiasedResizedCrop", "HorizontalFlip"}
    assert tiny_config("aug.corruptions=[]").aug.corruptions == []
    assert applied[("aug.corruptions=[]",)] == set()
    assert {"GaussNoise", "ImageCompression"} <= applied[()]  # the default family does apply them


def test_the_crop_draws_as_albumentations_and_shrinks_like_inter_area():
    # The same crop as A.RandomResizedCrop under the same seed; a shrinking crop's pixels within a
    # grey level of OpenCV's INTER_AREA on average (a smooth photo-like image), an enlarging one's equal.
    from core.transforms import AntialiasedResizedCrop

    yy, xx = np.mgrid[0:300, 0:400]
    image = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, (np.sin(xx / 9) * np.cos(yy / 7) + 1) * 120], -1)
    image = image.astype(np.uint8)
    for size, scale in ((224, (0.6, 1.0)), (512, (0.9, 1.0))):
        ours = A.Compose([AntialiasedResizedCrop(size=(size, size), scale=scale, area_for_downscale="image")])
        ref = A.Compose([A.RandomResizedCrop(size=(size, size), scale=scale, area_for_downscale="image")])
        for seed in range(5):
            ours.set_random_seed(seed)
            ref.set_random_seed(seed)
            a, b = ours(image=image)["image"], ref(image=image)["image"]
            assert a.shape == b.shape == (size, size, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
            diff = np.abs(a.astype(float) - b).mean()
            assert diff < 1.0 if size == 224 else diff == 0, (size, seed, diff)
