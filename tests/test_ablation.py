"""``./run.sh ablate`` (robust/ablation.py): variants, attacks through the whole stack, bootstrap, outputs.

Tiny generated data (4 classes, 32 px) and untrained test_convnext checkpoints: the figures are
not under test here, the way they are measured is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import export_model
from core.config import ConfigError, load_config
from core.io import WriteError
from core.model import create_classifier
from infer.defended import build_defended_model, load_members
from robust import ablation, testset
from tests.conftest import full_disk, shrink

FAST = [
    "eval.subset=16",
    "eval.batch_size=16",
    "eval.steps=3",
    "eval.step_ratio=0.5",
    "eval.aa_version=custom",
    "eval.aa_iters=3",
    "eval.aa_target_classes=1",
    "eval.eot_samples=2",
    "eval.draws=2",
    "eval.eps_linf=0.1",
    "ablation.attack_subset=8",
    "ablation.bootstrap=200",
]


def _export(stem, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.name=test_convnext", "data.num_classes=4", "data.image_size=32"])
    export_model(create_classifier(cfg.model, 4), stem, {"arch": "test_convnext", "num_classes": 4, "image_size": 32})
    return str(stem)


@pytest.fixture(scope="module")
def overrides(tiny_data, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("ablation")
    ckpt = {name: _export(root / name, seed) for seed, name in enumerate(("s0", "s1", "adv0", "surrogate"))}
    common = shrink(["data.test_labels=test_labels.txt", *FAST], tiny_data, root / "runs")
    testset.run(
        load_config(
            None,
            [
                *common,
                f"testset.surrogates=[{ckpt['surrogate']}]",
                f"testset.out_dir={root / 'set'}",
                "testset.attack.eps_l2=[0.5]",
                "testset.attack.steps=[2]",
            ],
        ),
        progress=False,
    )
    return [
        *common,
        f"ablation.testset={root / 'set'}",
        f"ablation.standard=[{ckpt['s0']},{ckpt['s1']}]",
        f"ablation.adversarial=[{ckpt['adv0']}]",
        f"ablation.out_dir={root / 'out'}",
    ]


def test_variants_resolve_to_the_stack_they_name(overrides):
    cfg = load_config(None, overrides)
    single = ablation.resolve_variant("single", cfg)
    assert len(single.submit.checkpoints) == 1 and not single.gcm.enabled and not single.random_pad.enabled
    assert single.tta.scales == [1.0] and not single.tta.hflip and single.submit.temperature == 1.0
    full = ablation.resolve_variant("ensemble+hflip+multiscale+gcm+random_pad+temperature", cfg)
    assert full.submit.checkpoints == cfg.ablation.standard and full.tta.hflip and full.tta.scales == [0.9, 1.0, 1.1]
    assert full.gcm.enabled and full.random_pad.enabled and full.submit.temperature == 2.0
    assert ablation.resolve_variant("adversarial", cfg).submit.checkpoints == cfg.ablation.adversarial
    assert ablation.resolve_variant("mixed", cfg).submit.checkpoints == [
        cfg.ablation.standard[0],
        *cfg.ablation.adversarial,
    ]
    with pytest.raises(ConfigError, match="'ablation.adversarial' needs 2 or 3 checkpoints"):
        ablation.resolve_variant("adversarial+ensemble", cfg)
    with pytest.raises(ConfigError, match="'ablation.corruption' needs at least one checkpoint"):
        ablation.resolve_variant("corruption", cfg)
    with pytest.raises(ConfigError, match=r"ablation.variants\[0\]': 'tta' is not a part"):
        load_config(None, [*overrides, "ablation.variants=[hflip+tta]"])


def test_the_attack_goes_through_every_member_and_every_view(overrides):
    """Every member gets the gradient of every TTA view back during the ablation's attacks: an attack
    that skipped a member or a view (attacking member 0 alone, or the identity view) fails here."""
    cfg = ablation.resolve_variant("ensemble+hflip+multiscale+gcm", load_config(None, overrides))
    members, infos = load_members(cfg.submit.checkpoints, 4)
    model = build_defended_model(members, infos, cfg)
    views = len(model.model.views)
    assert views == 6 and len(members) == 2
    reached = {i: torch.zeros(views, dtype=torch.bool) for i in range(len(members))}

    def record(index):
        def hook(module, grad_input, grad_output):
            g = grad_input[0]
            assert g.shape[0] % views == 0, "a member saw a batch that is not every view of the images"
            per_view = g.reshape(views, g.shape[0] // views, -1).abs().sum((1, 2))
            reached[index] |= per_view > 0

        return hook

    handles = [m.register_full_backward_hook(record(i)) for i, m in enumerate(members)]
    try:
        # 2 images: the first gradient already reaches every member and view (6 took 1.8x as long)
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = model(x).argmax(1)  # every image correct at first: AutoAttack attacks all of them
        ablation.attack_variant(model, x, y, cfg)
    finally:
        for h in handles:
            h.remove()
    assert all(bool(r.all()) for r in reached.values()), reached


def test_bootstrap_interval_says_when_a_difference_is_noise():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.5).astype(float)
    same = ablation.bootstrap_difference(base, base, 1000, seed=0)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "noise": True}
    better = base.copy()
    better[np.flatnonzero(base == 0)[:120]] = 1.0  # +40 points on 300 images
    d = ablation.bootstrap_difference(better, base, 1000, seed=0)
    assert d["diff"] == pytest.approx(40.0) and d["lo"] > 30.0 and not d["noise"]
    flipped = base.copy()
    flipped[:6] = 1.0 - flipped[:6]  # a handful of images either way: noise
    assert ablation.bootstrap_difference(flipped, base, 1000, seed=0)["noise"]


@pytest.mark.slow
def test_run_writes_one_row_per_variant_with_intervals(overrides):
    variants = "ablation.variants=[single,hflip,ensemble,gcm,random_pad,mixed+hflip]"
    cfg = load_config(None, [*overrides, variants])
    # what a run killed while writing its report leaves (issue 29, item 12): the next run removes it
    out = Path(cfg.ablation.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    leftovers = [out / ".ablation.png.k1ll3d_0.tmp", out / ".ablation.md.0badf00d.bak"]
    for path in leftovers:
        path.write_text("x")
    result = ablation.run(cfg, progress=False)
    assert not any(p.exists() for p in leftovers)
    names = [r["variant"] for r in result["table"]]
    assert names == ["single", "hflip", "ensemble", "gcm", "random_pad", "mixed+hflip"]
    rows = result["rows"]
    assert "vs_single" not in rows["single"]
    for name in names[1:]:
        for metric in ablation.METRICS:
            d = rows[name]["vs_single"][metric]
            assert d["lo"] <= d["diff"] <= d["hi"] and d["noise"] == (d["lo"] <= 0 <= d["hi"])
    # GCM changes no prediction: its Phase-I-like and clean differences are exactly 0
    assert rows["gcm"]["vs_single"]["phase1"]["diff"] == 0.0 and rows["gcm"]["vs_single"]["clean"]["diff"] == 0.0
    for row in rows.values():
        assert row["by_kind"]["all"]["n"] == 32 and sum(row["by_kind"][k]["n"] for k in testset.KINDS) == 32
        assert len(row["vectors"]["autoattack"]) == 8 and len(row["vectors"]["clean"]) == 16
    files = result["files"]
    with open(files["csv"], newline="") as fh:
        assert [r["variant"] for r in csv.DictReader(fh)] == names
    assert "| ensemble | 2 x 1 |" in open(files["md"]).read()
    assert json.load(open(files["json"]))["table"] == json.loads(json.dumps(result["table"]))
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _synthetic_rows(seed: int, cfg) -> tuple[dict, dict]:
    """Two measured variants as ``run_variants`` returns them (per-image vectors drawn at random)."""
    rng = np.random.default_rng(seed)
    rows = {}
    for name in ("single", "gcm"):
        vectors = {m: (rng.random(20) < 0.5).astype(float) for m in (*ablation.METRICS, "pgd_naive")}
        by_kind = {"all": {"n": 20, "acc": 100.0 * vectors["phase1"].mean()}}
        rows[name] = {"checkpoints": ["a"], "views": 1, "vectors": vectors, "by_kind": by_kind, "ms_per_image": 1.0}
    ablation.compare_to_single(rows, cfg)
    info = {"testset": "set", "testset_n": 20, "clean_n": 20, "attack_n": 20, "eps_linf": 0.03, "input_models": []}
    return rows, info


@pytest.mark.parametrize("refused", ["ablation.png", "ablation.json"])
def test_the_four_report_files_are_one_unit(tmp_path, monkeypatch, refused):
    """Issue 29, item 7: on a full disk the md/csv of the new run sat beside the json/png of the old one."""
    cfg = load_config(None, ["wandb.mode=disabled"])
    ablation.write_outputs(*_synthetic_rows(0, cfg), tmp_path, cfg)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["ablation.csv", "ablation.json", "ablation.md", "ablation.png"]
    full_disk(monkeypatch, refused)
    with pytest.raises(WriteError, match=f"{refused}: cannot write"):
        ablation.write_outputs(*_synthetic_rows(1, cfg), tmp_path, cfg)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # every old file, no temp file


@pytest.mark.slow
def test_sharpen_and_tuned_temperature_rows(overrides):
    """Issue 38: a temperature below 1 stacked with GCM, and one tuned on the validation split."""
    cfg = load_config(
        None, [*overrides, "ablation.variants=[single,gcm+sharpen,ensemble+tuned]", "ablation.sharpen=0.01"]
    )
    result = ablation.run(cfg, progress=False)
    rows = result["rows"]
    assert rows["gcm+sharpen"]["temperature"] == 0.01
    # one model: sharpening changes no prediction
    assert rows["gcm+sharpen"]["vs_single"]["phase1"]["diff"] == 0.0
    assert rows["gcm+sharpen"]["vs_single"]["clean"]["diff"] == 0.0
    assert rows["ensemble+tuned"]["temperature"] in cfg.ablation.temperatures
    assert "| gcm+sharpen (T=0.01) | 1 x 1 |" in open(result["files"]["md"]).read()
    assert [r["temperature"] for r in result["table"]][:2] == [1.0, 0.01]
