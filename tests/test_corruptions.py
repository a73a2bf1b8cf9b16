"""ImageNet-C (core/corruptions.py, core/imagenet_c.py, robust/corruptions.py): the fork runs here,
every image has its own seed, and the evaluation cells do not depend on batch size, order or the number of processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.config import ConfigError, new_config
from core.corruptions import ALL_CORRUPTIONS, COMMON, GROUPS, HELD_OUT, group_of
from core.imagenet_c import corrupt, corruption_seed
from gcm import DefendedModel
from robust.corruptions import (
    add_mce,
    corruption_cells,
    iterate_cells,
    run_corruptions,
    summarize,
    training_counterparts,
)
from train.demo_data import render_image, resolve_class_factors


def demo_images(n: int, size: int = 32) -> np.ndarray:
    """``n`` demo-data images (shapes over a gradient): corruptions act on them as on photos."""
    factors = resolve_class_factors(4)
    rng = np.random.default_rng(0)
    return np.stack([np.asarray(render_image(rng, factors[i % 4], 2, size).convert("RGB")) for i in range(n)])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return demo_images(6)


def test_the_fork_imports_with_headless_opencv_only():
    from importlib import metadata

    import imagecorruptions

    assert metadata.version("imagecorruptions-imaug") == "1.1.5"
    # albumentations' headless OpenCV is the only cv2 in the venv: the fork did not bring its own
    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert "opencv-python-headless" in installed and "opencv-python" not in installed
    assert imagecorruptions.get_corruption_names("all") == list(ALL_CORRUPTIONS)
    assert imagecorruptions.get_corruption_names("validation") == list(HELD_OUT)
    for group in ("noise", "blur", "weather", "digital"):
        assert tuple(imagecorruptions.get_corruption_names(group)) == GROUPS[group]


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_each_corruption_is_reproducible_seeded_and_grows_with_severity(images, name):
    image = images[0]
    state = np.random.get_state()
    out = corrupt(image, name, 3, seed=11)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, corrupt(image, name, 3, seed=11))  # same seed, same pixels
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    distortion = [float(np.abs(corrupt(image, name, s, 11).astype(int) - image).mean()) for s in (1, 5)]
    assert 0 < distortion[0] < distortion[1], distortion
    random_ones = set(COMMON + HELD_OUT) - {
        "defocus_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
        "gaussian_blur",
        "saturate",
    }
    if name in random_ones:  # another seed, another draw (glass_blur and impulse_noise take it as an argument)
        assert not np.array_equal(out, corrupt(image, name, 3, seed=12))
    assert group_of(name) in GROUPS


def test_bad_calls_are_value_errors(images):
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(images[0], "rain", 1, 0)
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt(images[0], "fog", 6, 0)
    with pytest.raises(ValueError, match="at least 32 px"):
        corrupt(images[0][:16, :16], "fog", 1, 0)


def test_seed_rule_depends_on_every_part():
    base = corruption_seed("test/7.png", "fog", 3, 0)
    assert base == corruption_seed("test/7.png", "fog", 3, 0) and 0 <= base < 2**32
    others = [
        corruption_seed("test/8.png", "fog", 3, 0),
        corruption_seed("test/7.png", "snow", 3, 0),
        corruption_seed("test/7.png", "fog", 4, 0),
        corruption_seed("test/7.png", "fog", 3, 1),
    ]
    assert base not in others and len(set(others)) == 4


def test_cells_keep_imagenet_c_order_and_unknown_names_are_config_errors():
    assert corruption_cells(["saturate", "fog", "gaussian_noise"], [3, 1]) == [
        ("gaussian_noise", 1),
        ("gaussian_noise", 3),
        ("fog", 1),
        ("fog", 3),
        ("saturate", 1),
        ("saturate", 3),
    ]
    cfg = new_config()
    assert cfg.eval.corruptions == list(ALL_CORRUPTIONS) and cfg.eval.corruption_severities == [1, 2, 3, 4, 5]
    from core.config import apply_overrides

    with pytest.raises(ConfigError, match="eval.corruptions.*'rain' is not one of"):
        apply_overrides(new_config(), ["eval.corruptions=[fog,rain]"])


CELLS = [("gaussian_noise", 2), ("glass_blur", 1), ("frost", 5), ("spatter", 4), ("elastic_transform", 3)]


def _cells(images: np.ndarray, keys: list[str], workers: int) -> dict:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return {cell: batch for cell, batch in iterate_cells(x, keys, CELLS, seed=5, workers=workers)}


def test_cell_images_do_not_depend_on_order_or_processes(images):
    keys = [f"test/{i}.png" for i in range(len(images))]
    one = _cells(images, keys, workers=0)
    assert set(one) == set(CELLS)
    # the images shuffled, computed by 2 loader processes: each image gets the same pixels
    order = [4, 0, 5, 2, 1, 3]
    two = _cells(images[order], [keys[i] for i in order], workers=2)
    for cell in CELLS:
        assert torch.equal(two[cell], one[cell][order]), cell
        single = corrupt(images[3], *cell, corruption_seed(keys[3], *cell, 5))
        assert torch.equal(one[cell][3], torch.from_numpy(single).permute(2, 0, 1))  # the documented rule


class Threshold(nn.Module):
    """Class 1 for bright images, else 0: a model whose answers corruptions change."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-m, m], dim=1) * self.scale


def test_scores_do_not_depend_on_batch_size(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    keys = [f"k{i}" for i in range(6)]
    runs = []
    for batch_size in (6, 4):
        cfg = new_config()
        cfg.eval.corruptions, cfg.eval.corruption_severities = ["fog", "contrast", "shot_noise"], [1, 5]
        cfg.eval.batch_size, cfg.data.num_workers = batch_size, 0
        runs.append(run_corruptions({"m": DefendedModel(Threshold())}, x, y, keys, cfg))
    assert runs[0]["m"].keys() == runs[1]["m"].keys() and len(runs[0]["m"]) == 6
    for cell, correct in runs[0]["m"].items():
        assert correct.dtype == torch.bool and torch.equal(correct, runs[1]["m"][cell]), cell


def _correct(accuracy_percent: float, n: int = 20) -> torch.Tensor:
    k = round(accuracy_percent * n / 100)
    return torch.tensor([True] * k + [False] * (n - k))


def test_summary_figures_and_mce_by_hand():
    cells = {(name, s): _correct(90 - 5 * s) for name in COMMON for s in range(1, 6)}  # 85 .. 65
    cells[("fog", 5)] = _correct(50.0)
    cells.update({(name, 1): _correct(50.0) for name in HELD_OUT})
    s = summarize(cells, _correct(100.0))
    assert s.complete and s.clean == 100.0
    assert s.imagenet_c == pytest.approx((75.0 * 75 - 15.0) / 75)  # one cell of 65% became 50%
    assert s.groups["weather"] == pytest.approx((75.0 * 20 - 15.0) / 20)
    assert s.groups["noise"] == pytest.approx(75.0) and s.groups["held_out"] == pytest.approx(50.0)
    # the worst common corruption (the held-out four, at 50%, have their own mean)
    assert s.worst == ("fog", pytest.approx(72.0)) and s.worst_group == ("weather", pytest.approx(74.25))
    # a baseline with twice the model's errors everywhere: mCE and relative mCE 50%
    errors = {k: 100.0 - 100.0 * float(v.float().mean()) for k, v in cells.items()}
    base = summarize({k: _correct(100.0 - 2 * e) for k, e in errors.items()}, _correct(100.0))
    add_mce(s, base)
    assert s.mce == pytest.approx(50.0) and s.relative_mce == pytest.approx(50.0)
    # relative mCE discounts the clean error: a model 10 points worse on clean images and on every cell
    # degrades exactly as much as the model itself (100%), though its mCE is above 100%
    shifted = summarize({k: _correct(100.0 * float(v.float().mean()) - 10) for k, v in cells.items()}, _correct(90.0))
    add_mce(shifted, s)
    assert shifted.relative_mce == pytest.approx(100.0) and shifted.mce > 100.0
    partial = summarize({("fog", 1): _correct(80.0)}, _correct(90.0))
    assert not partial.complete and partial.imagenet_c == 80.0 and partial.groups["noise"] is None


def test_training_counterparts_follow_the_saved_config():
    cfg = new_config()
    from core.config import config_to_dict

    found = training_counterparts(config_to_dict(cfg))
    assert found["gaussian_noise"] == ["GaussNoise", "ISONoise"] and "jpeg_compression" in found
    assert "frost" not in found  # no training counterpart in the default family
    cfg.aug.corruptions = []
    assert training_counterparts(config_to_dict(cfg)) == {}
    cfg.aug.color_jitter = 0.4
    assert set(training_counterparts(config_to_dict(cfg))) == {"brightness", "contrast", "saturate"}


@pytest.mark.parametrize("name", ["pixelate", "jpeg_compression"])
def test_corrupted_images_are_writable_arrays(name):
    # Both came back as a read-only view of a PIL image: torch.from_numpy then warned "The given
    # NumPy array is not writable" from robust/corruptions.py, once per loader worker.
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = corrupt(image, name, 3, 0)
    assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.uint8
