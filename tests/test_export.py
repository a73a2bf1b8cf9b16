"""Export: the torch.export file predicts like the in-process defended model; budget checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from infer import export
from infer.defended import build_defended_model, load_members
from tests.conftest import ROOT
from train.checkpoint import export_model
from train.config import load_config
from train.errors import UserError
from train.model import create_classifier


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, ["model.name=test_convnext"])
    stems = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        stem = root / f"m{seed}"
        export_model(create_classifier(cfg.model, 4), stem, {"arch": "test_convnext", "num_classes": 4, "image_size": 32})
        stems.append(stem)
    return stems


def _cfg(checkpoints, tmp_path, *extra):
    members = ",".join(str(s) for s in checkpoints)
    return load_config(None, [f"submit.checkpoints=[{members}]", "data.num_classes=4", "data.image_size=32",
                              f"export.path={tmp_path / 'defended.pt2'}", "tta.hflip=true", *extra])


def test_exported_file_predicts_like_the_in_process_model(checkpoints, tmp_path):
    cfg = _cfg(checkpoints, tmp_path)
    result = export.run(cfg)
    loaded = torch.export.load(result["path"]).module()
    members, infos = load_members(cfg.submit.checkpoints, 4)
    model = build_defended_model(members, infos, cfg)
    assert type(model.gcm).__name__ == "GradientConcealment"
    torch.manual_seed(3)
    for batch in (1, 5, 9):  # the batch dimension is dynamic
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).exp()
            got = loaded(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(got.argmax(1), expected.argmax(1))
        torch.testing.assert_close(got.sum(1), torch.ones(batch))
    report = json.loads((tmp_path / "defended.budget.json").read_text())
    assert report["within_budget"] and report["tta_views"] == 2 and len(report["members"]) == 2


def test_gmacs_scale_with_views_and_members(checkpoints, tmp_path):
    def gmacs(*extra):
        cfg = _cfg(checkpoints[:1], tmp_path, "tta.hflip=false", *extra)
        members, infos = load_members(cfg.submit.checkpoints, 4)
        return export.budget_report(build_defended_model(members, infos, cfg), 32, cfg)["gmacs"]

    one = gmacs()
    assert one > 0
    assert gmacs("tta.hflip=true") == pytest.approx(2 * one, rel=0.02)
    members = ",".join(str(s) for s in checkpoints)
    assert gmacs(f"submit.checkpoints=[{members}]") == pytest.approx(2 * one, rel=0.02)


def test_flop_counter_matches_convnext_tiny_reference():
    # DESIGN.md: convnext_tiny is 4.47 GMACs at 224
    model = timm.create_model("convnext_tiny", num_classes=100).eval()
    assert export.count_gmacs(model, 224) == pytest.approx(4.47, rel=0.03)


def test_over_budget_warns_or_refuses_without_a_file(checkpoints, tmp_path, capsys):
    export.run(_cfg(checkpoints, tmp_path, "budget.max_gmacs=0.00001"))
    assert "warning: over budget" in capsys.readouterr().out
    (tmp_path / "defended.pt2").unlink()
    with pytest.raises(UserError, match=r"over budget: .*GMACs per image > budget.max_gmacs .*no model file"):
        export.run(_cfg(checkpoints, tmp_path, "budget.max_gmacs=0.00001", "budget.enforce=true"))
    assert not (tmp_path / "defended.pt2").exists()


def test_random_pad_is_refused_rather_than_frozen(checkpoints, tmp_path):
    with pytest.raises(UserError, match="random_pad.enabled=true cannot be exported faithfully"):
        export.run(_cfg(checkpoints, tmp_path, "random_pad.enabled=true"))


def test_cli_missing_checkpoint_is_exit_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "infer.export", f"submit.checkpoints=[{tmp_path / 'nope'}]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'nope'}.safetensors "
                                                "(train first, or set submit.checkpoints)"]
