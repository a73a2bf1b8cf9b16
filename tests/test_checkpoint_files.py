"""Exported checkpoints as a pair: read while ``train`` republishes them, and what a hostile or
mismatched pair gets (a hub reference, an unknown network, the wrong shapes, a nested JSON)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from core.checkpoint import export_model, load_model, read_checkpoint
from core.config import load_config
from core.errors import UserError
from core.model import create_classifier
from tests.conftest import ROOT

META = {"arch": "test_convnext", "num_classes": 4, "image_size": 32}


def _model(seed: int):
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.name=test_convnext", "data.num_classes=4", "data.image_size=32"])
    return create_classifier(cfg.model, 4)


@pytest.fixture(scope="module")
def two_models():
    """Two different networks of one architecture, told apart by ``val_acc`` (0.0 and 1.0)."""
    return [_model(0), _model(1)]


def _handed(model, stem: Path, **changes) -> Path:
    """``model`` exported to ``stem``, then its JSON edited as the one who hands us the file might."""
    export_model(model, stem, META)
    info = json.loads(Path(f"{stem}.json").read_text())
    Path(f"{stem}.json").write_text(json.dumps({**info, **changes}))
    return stem


def _assert_pair(model, info, models) -> None:
    """The weights loaded are those of the model the JSON describes."""
    expected = models[int(info["val_acc"])].state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"weights of one, JSON of the other: {info}"


class _Republish:
    """Wraps a file opened for reading: when the reader closes it, ``train`` republishes ``best``."""

    def __init__(self, fh, republish) -> None:
        self._fh, self._republish = fh, republish

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._fh.close()
        self._republish()


@pytest.mark.parametrize("after", [".safetensors", ".json"], ids=["after-weights-read", "after-json-read"])
def test_a_republish_between_the_reads_never_mixes_the_pair(two_models, tmp_path, monkeypatch, after):
    """The reader is forced to meet a republish (weights, then JSON, as ``export_model`` writes
    them) right after it has read one of the two files: whatever it returns must be one pair."""
    stem = tmp_path / "best"
    export_model(two_models[0], stem, {**META, "val_acc": 0.0})
    real_open, done = io.open, []

    def republish() -> None:
        if not done:
            done.append(True)
            monkeypatch.setattr(io, "open", real_open)
            monkeypatch.setattr("builtins.open", real_open)
            export_model(two_models[1], stem, {**META, "val_acc": 1.0})

    def opening(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        reading = "r" in mode and "+" not in mode
        return _Republish(fh, republish) if reading and str(file) == f"{stem}{after}" else fh

    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr("builtins.open", opening)
    model, info = load_model(stem)
    assert done, "the forced republish did not happen"
    _assert_pair(model, info, two_models)


REPUBLISHER = """
import sys
from pathlib import Path
from core.checkpoint import export_model, load_model, read_checkpoint
stem, stop = Path(sys.argv[1]), Path(sys.argv[2])
models = [load_model(p)[0] for p in sys.argv[3:5]]
count = 0
while not stop.exists():
    meta = {"arch": "test_convnext", "num_classes": 4, "image_size": 32, "val_acc": float(count % 2)}
    export_model(models[count % 2], stem, meta)
    count += 1
    # renamed into place: the test reads it while this loop writes the next one
    Path(f"{stop}.count.tmp").write_text(str(count))
    Path(f"{stop}.count.tmp").replace(f"{stop}.count")
"""


@pytest.mark.slow
def test_a_real_republisher_never_makes_a_reader_mix_the_pair(two_models, tmp_path):
    sources = []
    for i, model in enumerate(two_models):
        export_model(model, tmp_path / f"src{i}", {**META, "val_acc": float(i)})
        sources.append(str(tmp_path / f"src{i}"))
    stem, stop = tmp_path / "best", tmp_path / "stop"
    export_model(two_models[0], stem, {**META, "val_acc": 0.0})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", REPUBLISHER, str(stem), str(stop), *sources], cwd=ROOT, env=env)
    counter = Path(f"{stop}.count")
    try:
        deadline = time.time() + 120
        while not counter.exists():
            assert proc.poll() is None and time.time() < deadline, "the republisher did not start"
            time.sleep(0.05)
        first = int(counter.read_text())
        seen = set()
        for _ in range(100):  # the reading half of load_model (building the network is the slow half)
            info, state = read_checkpoint(Path(f"{stem}.safetensors"), Path(f"{stem}.json"))
            expected = two_models[int(info["val_acc"])].state_dict()
            assert all(torch.equal(state[k], expected[k]) for k in expected), (
                f"weights of one, JSON of the other: {info}"
            )
            seen.add(info["val_acc"])
        published = int(counter.read_text()) - first
    finally:
        stop.touch()
        proc.wait(timeout=60)
    assert published >= 10 and seen == {0.0, 1.0}, (published, seen)  # the reads did overlap republishes


def test_a_pair_that_stays_inconsistent_is_refused(two_models, tmp_path):
    stem = tmp_path / "best"
    export_model(two_models[0], stem, {**META, "val_acc": 0.0})
    export_model(two_models[1], tmp_path / "other", {**META, "val_acc": 1.0})
    Path(f"{stem}.safetensors").write_bytes(Path(f"{tmp_path / 'other'}.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"best.safetensors: contents do not match the sha256 in best.json"):
        load_model(stem)


@pytest.mark.parametrize(
    "arch", ["hf-hub:owner/model", "timm/convnext_atto", "../models/x", "local-dir:/tmp/x", "convnext_atto:x"]
)
def test_a_checkpoint_never_makes_the_product_fetch_anything(two_models, tmp_path, monkeypatch, arch):
    stem = _handed(two_models[0], tmp_path / "handed", arch=arch)

    def no_network(*args, **kwargs):
        raise AssertionError("a checkpoint file reached timm.create_model with a hub/path reference")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(UserError, match=rf"^{stem}.json: checkpoint JSON 'arch' is .*not a plain timm model name"):
        load_model(stem)


def test_an_unknown_arch_names_the_checkpoint_file(two_models, tmp_path):
    stem = tmp_path / "odd"
    export_model(two_models[0], stem, {**META, "arch": "convnext_nonexistent"})
    with pytest.raises(UserError, match=rf"^{stem}.json: checkpoint JSON 'arch' 'convnext_nonexistent' is not a model"):
        load_model(stem)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(two_models, tmp_path):
    stem = _handed(two_models[0], tmp_path / "odd", num_classes=7)
    with pytest.raises(
        UserError,
        match=r"odd.safetensors: weights do not fit test_convnext with 7 classes: tensor "
        r"'backbone.head.fc.weight' has shape \(4, 64\) in the file, the model's is \(7, 64\)",
    ):
        load_model(stem)


def test_a_deeply_nested_checkpoint_json_is_one_line(two_models, tmp_path):
    stem = tmp_path / "deep"
    export_model(two_models[0], stem, META)
    Path(f"{stem}.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"deep.json: not a valid checkpoint JSON \(JSON nested too deeply\)"):
        load_model(stem)


def test_checkpoint_json_mean_and_std_are_checked(two_models, tmp_path):
    stem = _handed(two_models[0], tmp_path / "odd", mean="zero")
    with pytest.raises(UserError, match=r"odd.json: checkpoint JSON 'mean' is 'zero', not null or 3 numbers"):
        load_model(stem)


def test_the_recorded_sha256_is_of_the_bytes_written(two_models, tmp_path):
    weights = export_model(two_models[0], tmp_path / "m", META)
    import hashlib

    info = json.loads((tmp_path / "m.json").read_text())
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert read_checkpoint(weights, tmp_path / "m.json")[0]["sha256"] == info["sha256"]


def test_a_channels_last_model_is_saved_in_the_standard_layout(tmp_path):
    """What a GPU run holds (``model.channels_last`` is on there): its NHWC weights and their copies
    (the EMA's checkpoint, the exports) are written as safetensors, which refuses a non-contiguous
    tensor, and load back equal into a model of the standard layout."""
    from safetensors.torch import load_file, save_file

    from core.checkpoint import state_dict_of

    model = _model(0).to(memory_format=torch.channels_last)
    assert not model.state_dict()["backbone.stem.0.weight"].is_contiguous()  # else this test shows nothing
    state = state_dict_of(model)
    assert all(v.is_contiguous() for v in state.values())
    save_file(state, str(tmp_path / "ema.safetensors"))  # the EMA's file in a training checkpoint
    export_model(model, tmp_path / "best", META)
    loaded, _ = load_model(tmp_path / "best")
    for key, value in load_file(str(tmp_path / "ema.safetensors")).items():
        assert torch.equal(value, loaded.state_dict()[key]) and torch.equal(value, model.state_dict()[key])
