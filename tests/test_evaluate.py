"""evaluate: the honest story about GCM, on a tiny model trained by the real training stage.

The module fixture trains test_convnext for a few seconds on generated 32 px data (4 classes),
then every test goes through evaluate's own code path (``craft`` / ``score`` / ``run``).
"""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from attacks import lp_norm
from core.config import ConfigError, load_config, new_config
from core.io import WriteError
from core.labels import select_subset
from gcm import DefendedModel, RandomResizePad
from infer.defended import build_defended_model, load_members
from phase2 import export
from phase2 import score as file_score
from phase2.draws import draw_settings
from robust import evaluate
from robust.config import EVAL_ATTACKS, EvalConfig
from robust.results import EvalResult, Row, Score
from robust.runner import accuracy, check_budget, craft, score
from robust.specs import SPECS
from robust.verdict import MASKING_POINTS, sanity_checks
from tests.conftest import LEARNED, full_disk, run_module, shrink
from tests.test_attacks import CoinFlip
from train import main as train_main
from train.demo_data import generate_demo_data

# Short attacks on a small subset: seconds per row on 2 CPU cores.
FAST = [
    "eval.subset=48",
    "eval.batch_size=48",
    "eval.steps=10",
    "eval.step_ratio=0.25",
    "eval.cw_steps=10",
    "eval.square_queries=100",
    "eval.aa_version=custom",
    "eval.aa_iters=10",
    "eval.aa_target_classes=3",
    "eval.eps_l2=1.0",
    "eval.eps_l1=30",
    "eval.eps_curve=[0.01,0.0313725,0.1]",
    "eval.corruptions=[gaussian_noise,fog,contrast,speckle_noise]",
    "eval.corruption_severities=[1,5]",
]
STRONG_EPS = 24 / 255  # large enough for PGD to break the undefended tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[str]:
    """Overrides of a run trained well above chance (25%), with hidden test labels."""
    root = tmp_path_factory.mktemp("evaldata")
    data = root / "demo"
    generate_demo_data(data, num_classes=4, train_per_class=150, test_per_class=25, image_size=32)
    overrides = shrink(
        ["train.epochs=12", "train.lr=4e-3", "train.batch_size=32", "data.test_labels=test_labels.txt"],
        data,
        root / "runs",
    )
    result = train_main.run(load_config(None, overrides))
    assert result["best_acc"] >= LEARNED, result  # clearly above chance (tests/conftest.py)
    return overrides


@pytest.fixture(scope="module")
def setup(trained):
    """(cfg, undefended, defended, x, y) on the trained run, through evaluate's loader."""
    cfg = load_config(None, [*trained, *FAST])
    members, infos = load_members([cfg.run_dir / "best"], cfg.data.num_classes)
    undefended = build_defended_model(members, infos, cfg, defense=False)
    defended = build_defended_model(members, infos, cfg)
    x, y, source, keys = evaluate.load_eval_images(cfg, 32)
    assert len(keys) == len(set(keys)) == 48 and all(k.startswith("test/") for k in keys)
    assert source.startswith("test set") and x.shape == (48, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    return cfg, undefended, defended, x, y


def _pgd_acc(model, x, y, cfg, adaptive=False) -> float:
    adv = craft("pgd_linf", model, x, y, cfg, eps=STRONG_EPS, adaptive=adaptive)
    return accuracy(score(model, adv, y, cfg))


def test_pgd_breaks_undefended_gcm_hides_it_bpda_restores_it(setup):
    cfg, undefended, defended, x, y = setup
    clean = accuracy(score(defended, x, y, cfg))
    assert clean == accuracy(score(undefended, x, y, cfg))  # GCM changes no prediction
    und = _pgd_acc(undefended, x, y, cfg)
    gcm = _pgd_acc(defended, x, y, cfg)
    bpda = _pgd_acc(defended, x, y, cfg, adaptive=True)
    # PGD breaks the undefended model: at least 30 points (14 images) taken, at most 10 left. The
    # clean accuracy itself depends on the weights (46-81% over TEST_SEED 1-3).
    assert und <= 10.0 and clean - und >= 30.0, (clean, und)
    assert gcm >= clean - 10.0, (gcm, clean)  # the same PGD is blind through GCM
    assert bpda <= und + 10.0, (bpda, und)  # BPDA through GCM restores it
    assert not any(m.bpda for m in defended.modules() if hasattr(m, "bpda"))  # switched back off


@pytest.mark.parametrize("adaptive", [False, True])
def test_every_attack_stays_in_its_ball_and_the_box(setup, adaptive):
    cfg, _, defended, x, y = setup
    x, y = x[:12], y[:12]
    for spec in (s for s in SPECS.values() if s.craft is not None):
        name, eps, norm = spec.name, spec.budget(cfg.eval), spec.norm
        adv = craft(name, defended, x, y, cfg, adaptive=adaptive)
        assert adv.shape == x.shape and adv.dtype == torch.float32, name
        assert float(lp_norm(adv - x, norm).max()) <= eps * (1 + 1e-4) + 1e-6, name
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0, name
        if name not in ("cw_l2", "square", "autoattack"):  # these may leave an image untouched
            assert float(lp_norm(adv - x, norm).max()) > 0.5 * eps, name  # the budget is actually used


def test_budget_check_rejects_an_escaped_image(setup):
    _, _, _, x, _ = setup
    x = x[:4]
    check_budget(SPECS["pgd_l2"], x, (x + 0.001).clamp(0, 1), 1.0)  # inside: no error
    with pytest.raises(RuntimeError, match="pgd_linf left its budget"):
        check_budget(SPECS["pgd_linf"], x, (x + 0.1).clamp(0, 1), 8 / 255)
    with pytest.raises(RuntimeError, match="outside"):
        check_budget(SPECS["noise"], x, x + 2.0, 8 / 255 + 3.0)


def test_report_files_table_warnings_and_verdict(trained, tmp_path):
    run_dir = load_config(None, trained).run_dir
    # the model itself as the mCE baseline: its errors divided by themselves
    cfg = load_config(None, [*trained, *FAST, f"eval.out_dir={tmp_path}", f"eval.corruption_baseline={run_dir}/best"])
    result = evaluate.run(cfg, progress=False)
    for name in ("eval.md", "eval.csv", "eval.json", "eval_bars.png", "eval_eps_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "eval.md").read_text()
    assert "| model | Top-1 | FGSM | PGD-L1 | PGD-L2 | PGD-Linf | C&W | AutoAttack | worst case |" in md
    und, gcm, ada = (result.robust_acc(k, "pgd_linf") for k in ("undefended", "defended", "adaptive"))
    # GCM alone is deterministic: the adaptive row is the undefended one, computed once and said so.
    assert "same as undefended: BPDA through a deterministic GCM" in result.rows["adaptive"].label
    assert result.rows["adaptive"].attacks == result.rows["undefended"].attacks and ada == und
    assert gcm > ada + MASKING_POINTS  # standard PGD is fooled by GCM, BPDA is not
    # AutoAttack, the field's standard: under BPDA at least as strong as our PGD (one image of
    # slack), and just as blind as PGD when it differentiates naively through GCM.
    aa = {k: result.robust_acc(k, "autoattack") for k in ("undefended", "defended", "adaptive")}
    assert aa["adaptive"] <= ada + 100.0 / result.n + 1e-9, (aa, ada)
    assert aa["defended"] > aa["adaptive"] + MASKING_POINTS, aa
    assert "AutoAttack: a custom subset (apgd-ce, apgd-t; 10 iterations" in md
    # ImageNet-C: 4 corruptions x 2 severities on the defended model and on the baseline (the same weights)
    defended, baseline = (result.corruption["models"][k] for k in ("defended", "baseline"))
    assert defended["cells"] == baseline["cells"] and len(defended["cells"]) == 4
    common = [v for name in ("gaussian_noise", "fog", "contrast") for v in defended["cells"][name].values()]
    assert len(common) == 6 and result.mean_corruption_acc == pytest.approx(sum(common) / 6)
    assert not defended["complete"] and defended["groups"]["held_out"] == pytest.approx(
        sum(defended["cells"]["speckle_noise"].values()) / 2
    )
    assert defended["mce"] == pytest.approx(100.0)
    assert (
        f"mean over the common cells run (not all 75: not RobustBench's figure): **{result.mean_corruption_acc:.1f}%**"
        in md
    )
    assert "| fog | weather | " in md and "mCE 100.0%" in md
    # trained with the default corruption family: its noise has a counterpart, the others do not
    assert "gaussian_noise (GaussNoise, ISONoise)" in md and "fog (PlasmaBrightnessContrast)" in md
    # The masking warning fires for the standard GCM row: the transfer attack beats white-box PGD.
    masking = [n for n in result.sanity if n.startswith("WARNING: GRADIENT MASKING")]
    assert any("transfer" in n for n in masking) and any("adaptive attack" in n for n in masking), result.sanity
    assert all(n in md for n in result.sanity)
    for value in (und, gcm, ada):
        assert f"{value:.1f}%" in result.verdict
    assert "gradient masking" in result.verdict and result.verdict in md
    # Worst case is a per-image AND: never above any single attack of its row.
    for row in result.rows.values():
        assert row.worst_case.robust_acc <= min(s.robust_acc for s in row.attacks.values()) + 1e-9
        assert 0.0 <= row.worst_case.ar <= 100.0
    with open(tmp_path / "eval.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["model", "attack", "clean_acc", "robust_acc", "ar", "eps", "norm", "steps", "n"]
    pgd = next(r for r in table if r["model"] == "defended" and r["attack"] == "pgd_linf")
    assert float(pgd["robust_acc"]) == pytest.approx(gcm, abs=0.01) and pgd["norm"] == "linf" and pgd["n"] == "48"
    assert {r["attack"] for r in table} >= {
        "square",
        "transfer_same_weights",
        "noise",
        "worst_case",
        "corruption_fog_s5",
    }
    fog = next(r for r in table if r["model"] == "baseline" and r["attack"] == "corruption_fog_s5")
    assert float(fog["robust_acc"]) == pytest.approx(defended["cells"]["fog"][5], abs=0.01)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["rows"]["adaptive"]["attacks"]["pgd_linf"]["robust_acc"] == pytest.approx(ada)
    assert saved["eps_curve"]["undefended"][1] == pytest.approx(und)  # the eps_linf point is the table's


def test_corruptions_alone_on_the_validation_split(trained, tmp_path):
    # how the demo configs were chosen: no attack, the held-out four, validation images only
    cfg = load_config(
        None,
        [
            *trained,
            *FAST,
            "data.test_labels=",
            "eval.attacks=[]",
            "eval.eps_curve=[]",
            "eval.corruptions=[speckle_noise,gaussian_blur,spatter,saturate]",
            "eval.corruption_severities=[2]",
            f"eval.out_dir={tmp_path}",
        ],
    )
    result = evaluate.run(cfg, progress=False)
    assert result.source.startswith("validation split") and result.n == 48  # eval.subset of the 120
    summary = result.corruption["models"]["defended"]
    assert list(summary["cells"]) == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert summary["imagenet_c"] is None and result.mean_corruption_acc is None  # no common corruption ran
    assert summary["groups"]["held_out"] == pytest.approx(sum(c[2] for c in summary["cells"].values()) / 4)
    md = (tmp_path / "eval.md").read_text()
    assert "held-out four" in md and "PGD-Linf was not run" in result.verdict
    assert "Budgets" not in md  # no attack ran, so no budget to state


def test_the_adaptive_row_of_a_deterministic_gcm_is_the_undefended_row(setup, trained):
    """What evaluate reuses, computed both ways: BPDA through GCM without a random layer leaves the
    same images correct as the undefended model, attack by attack, also for an ensemble with TTA."""
    _, _, _, x, y = setup
    best = str(load_config(None, trained).run_dir / "best")
    overrides = [*trained, *FAST, "eval.attacks=[fgsm,pgd_linf,pgd_l2,cw_l2,autoattack]", "tta.hflip=true"]
    cfg = load_config(None, [*overrides, f"submit.checkpoints=[{best},{best}]", "submit.weights=[0.7,0.3]"])
    models = evaluate.build_models(cfg, torch.device("cpu"))
    assert evaluate.same_as_undefended(models.defended) == {
        "adaptive": "same as undefended: BPDA through a deterministic GCM"
    }
    undefended = evaluate.run_row(models.undefended, x, y, cfg)
    adaptive = evaluate.run_row(models.defended, x, y, cfg, adaptive=True)
    assert torch.equal(undefended["clean"], adaptive["clean"])
    assert set(undefended["attacks"]) == {"fgsm", "pgd_linf", "pgd_l2", "cw_l2", "autoattack"}
    for name, correct in undefended["attacks"].items():
        assert torch.equal(correct, adaptive["attacks"][name]), name
    # A random layer makes the rows differ (EOT), no GCM makes the standard row the same too.
    padded = evaluate.build_models(load_config(None, [*overrides, "random_pad.enabled=true"]), torch.device("cpu"))
    assert evaluate.same_as_undefended(padded.defended) == {}
    bare = evaluate.build_models(load_config(None, [*overrides, "gcm.enabled=false"]), torch.device("cpu"))
    assert set(evaluate.same_as_undefended(bare.defended)) == {"defended", "adaptive"}


def _score(attack: str, robust_acc: float) -> Score:
    return Score(attack, attack, "linf", 8 / 255, 10, 80.0, robust_acc, float("nan"))


def test_sanity_checks_flag_weak_attacks():
    rows = {
        k: Row(k, 80.0, {"fgsm": _score("fgsm", 30.0), "pgd_linf": _score("pgd_linf", 50.0)})
        for k in ("undefended", "defended", "adaptive")
    }
    rows["adaptive"].attacks["autoattack"] = _score("autoattack", 50.0 - MASKING_POINTS - 1)
    rows["defended"].attacks["autoattack"] = _score("autoattack", 50.0 - MASKING_POINTS)  # within the margin
    result = EvalResult(
        n=100,
        source="test",
        defense="GCM",
        adaptive_attack="BPDA",
        checkpoints=[],
        surrogate="",
        settings={},
        randomized=False,
        rows=rows,
        black_box=[_score("noise", 40.0)],
        eps_curve={"eps": [1 / 255, 8 / 255], "undefended": [60.0, 40.0]},
        corruption={},
    )
    notes = sanity_checks(result)
    assert sum("weaker than single-step FGSM" in n for n in notes) == 3
    assert any(n.startswith("WARNING: undefended accuracy along eps") for n in notes)
    assert any(n.startswith("WARNING: random noise") for n in notes)
    overstated = [n for n in notes if "PGD column overstates" in n]
    assert len(overstated) == 1 and overstated[0].startswith("WARNING: adaptive: AutoAttack leaves 44.0%"), notes
    assert not any("GRADIENT MASKING" in n for n in notes)


def test_bad_eval_config_is_a_user_error(trained):
    with pytest.raises(ConfigError, match="eval.attacks.*'pgd_l3'"):
        load_config(None, [*trained, "eval.attacks=[fgsm,pgd_l3]"])
    with pytest.raises(ConfigError, match="eval.corruption_severities"):
        load_config(None, [*trained, "eval.corruption_severities=[0]"])


def test_every_configurable_attack_has_one_spec():
    assert tuple(SPECS) == EVAL_ATTACKS
    e = EvalConfig()
    for spec in SPECS.values():
        assert spec.budget(e) > 0 and spec.norm in ("linf", "l2", "l1"), spec.name
        assert spec.steps_key is None or hasattr(e, spec.steps_key), spec.name
    assert set(EvalConfig().attacks) == set(EVAL_ATTACKS)


def test_craft_in_batches_equals_one_batch(setup, trained):
    cfg, undefended, _, x, y = setup
    small = load_config(None, [*trained, *FAST, "eval.batch_size=7"])
    whole = score(undefended, craft("fgsm", undefended, x, y, cfg), y, cfg)
    batched = score(undefended, craft("fgsm", undefended, x, y, small), y, small)
    assert whole.dtype == torch.bool and torch.equal(whole, batched)


def test_score_averages_the_draws_of_a_randomized_model(setup):
    cfg, undefended, _, x, y = setup
    correct = score(undefended, x, y, cfg)
    assert correct.shape == (len(x),) and correct.dtype == torch.bool
    # A random layer that changes nothing (ratio 1) in front of a model right or wrong by a coin flip.
    coin = CoinFlip(undefended)
    randomized = DefendedModel(coin, random_pad=RandomResizePad(min_ratio=1.0, max_ratio=1.0))
    cfg = new_config()
    cfg.eval.draws, cfg.eval.batch_size = 50, len(x)
    torch.manual_seed(0)
    draws = score(randomized, x, y, cfg)
    assert draws.shape == (50, len(x)) and coin.calls == 50
    assert 0.0 < accuracy(draws) < accuracy(correct)


def test_subset_is_seeded_and_clamped():
    a = select_subset(100, 10, seed=3)
    assert list(a) == list(select_subset(100, 10, seed=3)) and list(a) == sorted(set(a))
    assert list(select_subset(5, 10, seed=3)) == list(range(5))
    assert list(select_subset(5, 0, seed=3)) == list(range(5))


@pytest.mark.slow
def test_random_pad_eot_path_is_reproducible(trained, tmp_path):
    small = [
        *trained,
        *FAST,
        "random_pad.enabled=true",
        "eval.draws=3",
        "eval.eot_samples=2",
        "eval.subset=16",
        "eval.attacks=[fgsm,pgd_linf,cw_l2,transfer]",
        "eval.corruption_severities=[]",
        "eval.cw_steps=3",
        "eval.eps_curve=[0.0313725]",
    ]
    a = evaluate.run(load_config(None, [*small, f"eval.out_dir={tmp_path / 'a'}"]), progress=False)
    b = evaluate.run(load_config(None, [*small, f"eval.out_dir={tmp_path / 'b'}"]), progress=False)
    assert a.randomized and "EOT over random pad" in a.rows["adaptive"].label
    assert "same as undefended" not in a.rows["adaptive"].label  # random pad: computed, with EOT
    budgets = next(line for line in (tmp_path / "a" / "eval.md").read_text().splitlines() if "Budgets" in line)
    assert "FGSM and PGD-Linf eps" in budgets and "C&W L2 3 Adam steps" in budgets and "EOT 2 samples" in budgets
    assert not any(name in budgets for name in ("PGD-L2", "PGD-L1", "AutoAttack")), budgets
    assert a.rows == b.rows and a.black_box == b.black_box and a.eps_curve == b.eps_curve
    # Expected accuracy over 3 draws of 16 images: multiples of 100 / 48.
    top1 = a.rows["defended"].top1
    assert abs(top1 * 48 / 100 - round(top1 * 48 / 100)) < 1e-6


@pytest.mark.slow
def test_two_processes_evaluate_what_one_does(trained, tmp_path):
    """``./run.sh evaluate --num_processes 2``: the batches and the corruption cells are spread over
    the processes (gloo here, GPUs elsewhere) and every figure is the one a single process computes,
    the random pad's draws, the attacks' random starts and AutoAttack included."""
    small = [
        *trained,
        *FAST,
        "random_pad.enabled=true",
        "eval.draws=2",
        "eval.eot_samples=2",
        "eval.subset=24",
        "eval.batch_size=8",
        "eval.attacks=[fgsm,pgd_linf,autoattack,transfer,noise]",
        "eval.aa_iters=3",
        "eval.corruptions=[fog,gaussian_noise,contrast]",
        "eval.corruption_severities=[1,3]",
        "eval.eps_curve=[0.0313725,0.1]",
    ]
    reports = {}
    for processes in (1, 2):
        out = tmp_path / str(processes)
        flags = ["--num_processes", "2"] if processes == 2 else []
        proc = run_module("launch", "robust.evaluate", *flags, *small, f"eval.out_dir={out}", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            "evaluate: 24 images from the test set" in proc.stdout and f"{processes} process(es) on cpu" in proc.stdout
        )
        reports[processes] = json.loads((out / "eval.json").read_text())
    for key in ("rows", "black_box", "eps_curve", "corruption"):
        assert reports[2][key] == reports[1][key], key


def test_evaluate_attacks_an_exported_phase2_file(trained, tmp_path):
    """eval.file: the exported zip and ONNX file themselves under attack, naive and with BPDA
    through the file's own GCM (the zip's model.py layer, the converted graph's Sin)."""
    export_overrides = ["export.channel_order=bgr", "export.formats=[onnx,zip]", f"export.path={tmp_path / 'm'}"]
    paths = export.run(load_config(None, [*trained, *export_overrides]))["paths"]
    small = [*trained, *FAST, "eval.subset=24", "eval.batch_size=24", f"eval.eps_linf={STRONG_EPS}"]
    for fmt in ("zip", "onnx"):
        out = tmp_path / fmt
        cfg = load_config(None, [*small, f"eval.file={paths[fmt]}", f"eval.out_dir={out}"])
        result = file_score.run(cfg, progress=False)
        naive, adaptive = result["rows"]
        assert result["channel_order"] == "bgr" and adaptive["adaptive"] and not naive["adaptive"]
        assert naive["clean"] == adaptive["clean"] >= 50.0
        # PGD is blind through GCM (AutoAttack's APGD still gets somewhere); BPDA through the file's GCM is not.
        assert naive["pgd_linf"] >= naive["clean"] - 15.0 and adaptive["pgd_linf"] <= 20.0, (fmt, result["rows"])
        assert naive["autoattack"] > adaptive["autoattack"] and adaptive["autoattack"] <= 20.0, (fmt, result["rows"])
        assert json.loads((out / "eval_file.json").read_text())["rows"] == result["rows"]
        assert "| adaptive (BPDA through the file's GCM) |" in (out / "eval_file.md").read_text()


def test_phase2_draws_come_from_the_documented_distribution():
    cfg = load_config(None, ["phase2.draws=60", "phase2.seed=5", "phase2.attack.steps=[3,7]"])
    draws = draw_settings(cfg)
    assert draws == draw_settings(cfg) and len(draws) == 60
    a = cfg.phase2.attack
    assert {d["kind"] for d in draws} == set(a.kinds) and {d["norm"] for d in draws} == {"linf", "l2"}
    assert all(d["eps"] in getattr(a, f"eps_{d['norm']}") and d["steps"] in (3, 7) for d in draws)
    other = draw_settings(load_config(None, ["phase2.draws=60", "phase2.seed=6"]))
    assert other != draws, "another seed must draw other settings"


def test_phase2_score_attacks_the_exported_file_naive_and_adaptive(trained, tmp_path):
    """k drawn white-box attacks on the exported zip: blind through its GCM, effective with BPDA;
    the summary is the draws' own mean, min and spread."""
    exported = ["export.formats=[zip]", "export.channel_order=bgr", f"export.path={tmp_path / 'm'}"]
    paths = export.run(load_config(None, [*trained, *exported]))["paths"]
    overrides = [
        *trained,
        *FAST,
        "eval.subset=24",
        "eval.batch_size=24",
        "eval.attacks=[fgsm]",  # the file table's columns are not under test here
        f"eval.file={paths['zip']}",
        f"eval.out_dir={tmp_path / 'eval'}",
        "phase2.draws=3",
        "phase2.attack.kinds=[pgd,mifgsm]",
        "phase2.attack.norms=[linf]",
        f"phase2.attack.eps_linf=[{STRONG_EPS}]",
        "phase2.attack.steps=[10]",
    ]
    result = file_score.run(load_config(None, overrides), progress=False)["phase2"]
    assert len(result["draws"]) == 3
    for attacker in ("naive", "adaptive"):
        accs = [d[attacker] for d in result["draws"]]
        s = result[attacker]
        assert s["accs"] == accs and s["mean"] == pytest.approx(sum(accs) / 3)
        assert s["min"] == min(accs) and s["max"] == max(accs) and s["std"] >= 0
    assert result["naive"]["mean"] >= 40.0 and result["adaptive"]["max"] <= 20.0, result
    text = (tmp_path / "eval" / "eval_file.md").read_text()
    assert "Phase-II-like score: 3 white-box attacks" in text and "| **mean** |" in text


def test_the_file_reports_two_files_are_one_unit(tmp_path, monkeypatch):
    """Issue 29, item 7: eval_file.md and eval_file.json were written one after the other."""
    rows = [{"row": r, "adaptive": r == "adaptive", "clean": 50.0} for r in ("naive", "adaptive")]
    result = {"file": "m.zip", "format": "zip", "channel_order": "bgr", "n": 8, "source": "test", "eps_linf": 0.03}
    result["rows"] = rows
    file_score.write_file_report(result, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk(monkeypatch, "eval_file.json")
    with pytest.raises(WriteError, match="eval_file.json: cannot write"):
        file_score.write_file_report({**result, "n": 9}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_progress_counts_every_attack_with_an_overall_eta(tiny_config, capsys):
    # Each attack had a one-step bar (AutoAttack sat at 0/1 for minutes) and nothing said how
    # much of the evaluation was left. Any weights do: this counts, it does not measure.
    overrides = [
        "train.max_steps=1",
        "eval.attacks=[fgsm,pgd_linf,autoattack,square,transfer]",
        "eval.subset=8",
        "eval.batch_size=8",
        "eval.steps=2",
        "eval.square_queries=5",
        "eval.aa_version=custom",
        "eval.aa_iters=2",
        "eval.aa_target_classes=1",
        "eval.eps_curve=[0.01,0.0313725]",
        "eval.corruptions=[fog]",
        "eval.corruption_severities=[1]",
        "data.test_labels=test_labels.txt",
    ]
    cfg = tiny_config(*overrides)
    train_main.run(cfg)
    capsys.readouterr()
    evaluate.run(cfg, progress=True)
    captured = capsys.readouterr()
    total = int(re.search(r"; (\d+) attacks to run", captured.out).group(1))
    done = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) attacks", captured.out)]
    assert done == [(k, total) for k in range(1, total + 1)], captured.out
    assert len(re.findall(r"attacks, about \d+ (s|min) left\)", captured.out)) == total - 1
    # the bars count images, and AutoAttack's says which of its parts is running
    assert "0/8 [" in captured.err and "APGD-T (2/2 parts)" in captured.err
