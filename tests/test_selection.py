"""``train.select=score`` (train/selection.py): ``best`` by the Phase-II-like score on a fixed part of
the validation split, measured as ``evaluate eval.file=FILE phase2.draws=k`` measures the defended model."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from core.checkpoint import load_model
from core.config import ConfigError
from core.corruptions import HELD_OUT
from core.labels import resolve_samples
from gcm import DefendedModel, GradientConcealment
from phase2.draws import run_phase2
from robust.corruptions import corruption_cells, run_corruptions
from train import main as train_main
from train.selection import create_score_set, measure_score

SCORE = ["train.select=score", "train.score.images=12", "train.score.draws=2"]


@pytest.mark.slow
def test_best_is_picked_by_the_score(tiny_config):
    cfg = tiny_config(*SCORE, "train.epochs=2")
    result = train_main.run(cfg)
    info = json.loads((cfg.run_dir / "best.json").read_text())
    assert info["selected_by"] == "score"
    assert set(info["val_score_parts"]) == {"clean", "corruption", "attack"}
    (ckpt,) = sorted((cfg.run_dir / "checkpoints").iterdir())[-1:]
    history = json.loads((ckpt / "train_state.json").read_text())["progress"]["history"]
    scores = [max(h["val_score"], h["val_ema_score"]) for h in history]
    assert len(scores) == 2 and result["best_acc"] == pytest.approx(max(scores))
    assert all(h["val_score_seconds"] > 0 for h in history)
    # the score only chooses: the same seed under the default selection trains the same weights
    default = tiny_config("train.epochs=2", "name=default_select")
    train_main.run(default)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(run / "checkpoints" / ckpt.name / name)) for run in (cfg.run_dir, default.run_dir))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_the_score_is_what_evaluate_measures_on_the_defended_model(tiny_config):
    # The same images, corruptions and attack draws: the score's parts equal evaluate's clean
    # accuracy, its ImageNet-C cells and the adaptive (BPDA through GCM) Phase-II-like draws.
    cfg = tiny_config("train.select=score", "train.score.images=10", "train.score.draws=2", "eval.batch_size=64")
    train_main.run(cfg)
    net, _ = load_model(cfg.run_dir / "best")
    _, val = resolve_samples(cfg.data)
    s = create_score_set(cfg, val)
    got = measure_score(net, s, Accelerator(cpu=True))["score_parts"]

    x, y = s.x.float() / 255, s.y
    defended = DefendedModel(net, GradientConcealment()).eval()
    assert got["clean"] == pytest.approx(100.0 * float((defended(x).argmax(1) == y).float().mean()))
    cfg.phase2.draws = cfg.train.score.draws
    phase2 = run_phase2(defended, x, y, cfg)
    assert got["attack"] == pytest.approx(phase2["adaptive"]["mean"])
    cfg.eval.corruptions, cfg.eval.corruption_severities = list(HELD_OUT), [3]
    cells = corruption_cells(HELD_OUT, [3])
    keys = [str(p) for p, _ in [val[i] for i in _chosen(cfg, len(val))]]
    correct = run_corruptions({"defended": defended}, x, y, keys, cfg)["defended"]
    assert got["corruption"] == pytest.approx(100.0 * float(torch.cat([correct[c] for c in cells]).float().mean()))


def _chosen(cfg, n):
    from core.labels import select_subset

    return select_subset(n, cfg.train.score.images, cfg.data.split_seed)


def test_score_weights_must_be_three(tiny_config):
    with pytest.raises(ConfigError, match="train.score.weights"):
        tiny_config("train.score.weights=[1,1]")
