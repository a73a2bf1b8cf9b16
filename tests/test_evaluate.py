"""evaluate: the honest story about GCM on a trained tiny model, through the real code path."""

from __future__ import annotations

import pytest
import torch

from infer import evaluate
from infer.attacks import lp_norm, pgd
from infer.defended import build_defended_model, load_members
from tests.conftest import shrink
from train import main as train_main
from train.config import load_config
from train.demo_data import generate_demo_data

FAST = ["eval.subset=48", "eval.steps=10", "eval.step_ratio=0.25", "eval.cw_steps=10", "eval.square_queries=100",
        "eval.eps_curve=[0.01,0.05,0.2]", "eval.corruption_severities=[1]", "eval.batch_size=48"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    data = root / "demo"
    generate_demo_data(data, num_classes=4, train_per_class=150, test_per_class=15, image_size=32)
    runs = root / "runs"
    overrides = shrink(["train.epochs=12", "train.lr=4e-3", "train.batch_size=32", "data.test_labels=test_labels.txt"],
                       data, runs)
    result = train_main.run(load_config(None, overrides))
    assert result["best_acc"] >= 55.0
    return overrides


def test_gcm_story_pgd_gcm_bpda(trained):
    cfg = load_config(None, [*trained, *FAST, "eval.eps_linf=0.2"])
    members, infos = load_members([cfg.run_dir / "best"], 4)
    undefended = build_defended_model(members, infos, cfg, defense=False)
    defended = build_defended_model(members, infos, cfg)
    x, y, _, source = evaluate.load_eval_images(cfg, 32)
    assert source.startswith("test set") and len(x) == 48
    rows = {"und": evaluate.run_row(undefended, x, y, cfg, False, False),
            "gcm": evaluate.run_row(defended, x, y, cfg, False, False),
            "ada": evaluate.run_row(defended, x, y, cfg, True, False)}
    acc = {k: 100.0 * float(v["attacks"]["pgd_linf"].float().mean()) for k, v in rows.items()}
    clean = 100.0 * float(rows["gcm"]["clean"].float().mean())
    assert acc["und"] <= 10.0, acc  # PGD breaks the undefended model
    assert acc["gcm"] >= clean - 10.0, (acc, clean)  # the same PGD is blind through GCM
    assert acc["ada"] <= acc["und"] + 10.0, acc  # BPDA restores it


def test_adversarial_images_stay_in_ball_and_box(trained):
    cfg = load_config(None, [*trained, *FAST])
    members, infos = load_members([cfg.run_dir / "best"], 4)
    defended = build_defended_model(members, infos, cfg)
    x, y, _, _ = evaluate.load_eval_images(cfg, 32)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5), ("l1", 8.0)):
        adv = pgd(defended, x[:16], y[:16], eps, norm=norm, steps=5, generator=torch.Generator().manual_seed(0))
        assert float(lp_norm(adv - x[:16], norm).max()) <= eps + 1e-4
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_report_files_warnings_and_verdict(trained, tmp_path):
    cfg = load_config(None, [*trained, *FAST, f"eval.out_dir={tmp_path}"])
    result = evaluate.run(cfg, progress=False)
    for name in ("eval.md", "eval.csv", "eval.json", "eval_bars.png", "eval_eps_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "eval.md").read_text()
    assert "| model | Top-1 | FGSM | PGD-L1 | PGD-L2 | PGD-Linf | C&W | worst case |" in md
    assert "WARNING: GRADIENT MASKING" in md
    t = result["table"]
    for key in ("undefended", "gcm", "adaptive"):
        assert f"{t[key]['pgd_linf']['robust_acc']:.1f}%" in result["verdict"]
    assert t["gcm"]["pgd_linf"]["robust_acc"] > t["adaptive"]["pgd_linf"]["robust_acc"]
    assert len((tmp_path / "eval.csv").read_text().splitlines()) > 10


@pytest.mark.slow
def test_random_pad_eot_path_is_reproducible(trained, tmp_path):
    small = [*trained, *FAST, "random_pad.enabled=true", "eval.draws=2", "eval.eot_samples=2", "eval.subset=16",
             "eval.attacks=[fgsm,pgd_linf]", "eval.corruption_severities=[]"]
    a = evaluate.run(load_config(None, [*small, f"eval.out_dir={tmp_path / 'a'}"]), progress=False)
    b = evaluate.run(load_config(None, [*small, f"eval.out_dir={tmp_path / 'b'}"]), progress=False)
    assert a["table"] == b["table"] and a["eps_curve"] == b["eps_curve"]
