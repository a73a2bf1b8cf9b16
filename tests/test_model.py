"""Model factory: local pretrained weights, normalization inside the model, clear errors."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from core.checkpoint import export_model, load_model
from core.config import load_config
from core.errors import UserError
from core.model import create_backbone, create_classifier


def test_local_pretrained_file_loads_backbone_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_convnext", num_classes=1000)
    path = tmp_path / "test_convnext.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone("test_convnext", num_classes=7, pretrained_file=str(path))
    assert model.get_classifier().out_features == 7
    loaded, original = model.state_dict(), source.state_dict()
    body = [k for k in loaded if not k.startswith("head.fc")]
    assert body and all(torch.equal(loaded[k], original[k]) for k in body)


def test_missing_pretrained_file_and_unknown_arch_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model.pretrained_file: no such file"):
        create_backbone("test_convnext", 3, pretrained_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="model.name: unknown timm model 'convnext_tinyy'"):
        create_backbone("convnext_tinyy", 3)


def test_normalization_lives_in_the_model():
    cfg = load_config(None, ["model.name=test_convnext"])
    model = create_classifier(cfg.model, 3).eval()
    assert model.normalize.enabled and model.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - 0.5) / 0.5))
    raw = create_classifier(load_config(None, ["model.name=test_convnext", "model.normalize=false"]).model, 3)
    assert not raw.normalize.enabled


def test_conv_stem_is_built_recorded_and_rebuilt(tmp_path):
    cfg = load_config(None, ["model.name=test_convnext", "model.stem=overlap"])
    model = create_classifier(cfg.model, 3).eval()
    patch = create_classifier(load_config(None, ["model.name=test_convnext"]).model, 3)
    convs = [m for m in model.backbone.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and convs[0].stride == (2, 2)  # two stride-2 convolutions instead of a 4x4 patchify
    assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in patch.parameters())
    # The checkpoint records the stem and load_model rebuilds it (the weights would not fit the patch stem).
    export_model(
        model, tmp_path / "best", {"arch": "test_convnext", "num_classes": 3, "image_size": 32, "stem": "overlap"}
    )
    loaded, info = load_model(tmp_path / "best")
    assert info["stem"] == "overlap"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(UserError, match="model.stem=overlap: 'resnet18' has no such stem"):
        create_backbone("resnet18", 3, stem="overlap")
