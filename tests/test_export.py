"""Export: the torch.export file predicts like the in-process defended model (GCM, ensemble, TTA,
random resize-pad draw for draw), keeps GCM's gradient and the random draws; budget checks."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch

from core.checkpoint import export_model
from core.config import load_config
from core.errors import UserError
from core.model import count_params, create_classifier
from core.outputs import record_owner
from gcm import GradientConcealment, RandomResizePad
from gcm.random_pad import resize_pad, resize_pad_static
from infer.defended import build_defended_model, load_members
from phase2 import export
from phase2.parity import check_round_trip, fixed_draw
from tests.conftest import full_disk, run_module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two randomly initialised test_convnext members at 32 px and a third one at 48 px."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, ["model.name=test_convnext"])
    stems = []
    for seed, size in ((0, 32), (1, 32), (2, 48)):
        torch.manual_seed(seed)
        stem = root / f"m{seed}"
        export_model(
            create_classifier(cfg.model, 4), stem, {"arch": "test_convnext", "num_classes": 4, "image_size": size}
        )
        stems.append(stem)
    return stems


def _overrides(checkpoints, tmp_path, *extra):
    members = ",".join(str(s) for s in checkpoints)
    return [
        f"submit.checkpoints=[{members}]",
        "data.num_classes=4",
        "data.image_size=32",
        f"export.path={tmp_path / 'defended.pt2'}",
        "export.formats=[pt2]",  # the in-process file: ensembles and TTA (the Phase II files: test_phase2.py)
        "tta.hflip=true",
        *extra,
    ]


def _cfg(checkpoints, tmp_path, *extra):
    return load_config(None, _overrides(checkpoints, tmp_path, *extra))


def _in_process(cfg):
    members, infos = load_members(cfg.submit.checkpoints, cfg.data.num_classes)
    return build_defended_model(members, infos, cfg)


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """GCM on, 2 members x 2 TTA views, exported through the CLI entry point ``main``."""
    out = tmp_path_factory.mktemp("export")
    overrides = _overrides(checkpoints[:2], out)
    result = export.main(overrides)
    return result, load_config(None, overrides)


def test_exported_file_predicts_like_the_in_process_model(exported):
    result, cfg = exported
    loaded = torch.export.load(result["path"]).module()
    model = _in_process(cfg)
    assert isinstance(model.gcm, GradientConcealment) and len(model.model.views) == 2
    torch.manual_seed(3)
    for batch in (1, 5, 9):  # exported with a batch of 2: the batch dimension is dynamic
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).exp()
            got = loaded(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(got.argmax(1), expected.argmax(1))
        torch.testing.assert_close(got.sum(1), torch.ones(batch))
    assert result["round_trip_max_abs_diff"] <= export.ROUND_TRIP_ATOL


def test_budget_json_sits_next_to_the_file(exported):
    result, cfg = exported
    report = json.loads(open(result["budget_path"]).read())
    assert result["budget_path"].endswith("defended.budget.json")
    model = _in_process(cfg)
    assert report["params"] == count_params(model) == sum(m["params"] for m in report["members"])
    assert report["within_budget"] and report["breaches"] == []
    assert report["tta_views"] == 2 and len(report["members"]) == 2 and report["input_size"] == 32
    assert report["defense"]["gcm"]["enabled"] and report["defense"]["members"] == 2
    assert report["gmacs"] == pytest.approx(result["gmacs"]) and report["gmacs"] > 0
    for fmt, path in result["paths"].items():  # the set is checkable: each file's hash in the report
        if fmt != "budget":
            assert report["files"][fmt]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest(), fmt


def test_exported_file_keeps_the_concealed_gradient(exported):
    # The organizers attack the file white-box: GCM's ~1e12 gradient must survive the export.
    result, cfg = exported
    loaded = torch.export.load(result["path"]).module()
    model = _in_process(cfg)
    plain = build_defended_model(
        model.model.members, [{"image_size": s} for s in model.model.image_sizes], cfg, defense=False
    )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def grad(fn):
        xi = x.clone().requires_grad_(True)
        fn(xi)[:, 0].log().sum().backward()
        return xi.grad

    got, expected, undefended = grad(loaded), grad(lambda v: model(v).exp()), grad(lambda v: plain(v).exp())
    assert undefended.abs().max() < 1e3 < 1e6 < got.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_static_resize_pad_matches_interpolate():
    # The fixed-shape version traced by torch.export vs F.interpolate + F.pad (the eager path).
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for height, width in ((224, 224), (32, 32), (32, 64), (40, 40), (64, 48), (7, 5)):
        x = torch.rand(2, 3, height, width, generator=g)
        for i in range(25):
            h = height if i == 0 else int(torch.randint(max(1, height // 2), height + 1, (1,), generator=g))
            w = min(max(round(h * width / height), 1), width)
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            expected = resize_pad(x, top, left, h, w)
            got = resize_pad_static(x, *(torch.tensor(v) for v in (top, left, h, w)))
            assert got.shape == x.shape and torch.equal(got == 0, expected == 0)
            worst = max(worst, (got - expected).abs().max().item())
    assert worst <= 1e-6
    x64 = torch.rand(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(resize_pad_static(x64, 1, 2, 9, 8), resize_pad(x64, 1, 2, 9, 8), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: resize_pad_static(v, 1, 2, 9, 8), (x64,))


@pytest.mark.parametrize("size", [(224, 224), (32, 64)])
def test_tensor_draws_have_the_eager_distribution(size):
    height, width = size
    pad = RandomResizePad() if size == (224, 224) else RandomResizePad(min_ratio=0.5, max_ratio=0.75)
    eager = {pad.draw_box(height, width) for _ in range(400)}
    torch.manual_seed(0)
    traced = {tuple(int(v) for v in pad.draw_box_tensors(height, width)) for _ in range(400)}
    (lo, hi), (lo_w, hi_w) = pad.side_range(height), pad.side_range(width)
    for top, left, h, w in traced:
        assert lo <= h <= hi and w == min(max(round(h * width / height), lo_w), hi_w)
        assert 0 <= top <= height - h and 0 <= left <= width - w
    assert {b[2] for b in traced} == {b[2] for b in eager} == set(range(lo, hi + 1))
    assert len({b[:2] for b in traced}) > 10


def test_random_pad_exports_and_stays_random(checkpoints, tmp_path):
    cfg = _cfg(checkpoints[:1], tmp_path, "random_pad.enabled=true", "random_pad.min_ratio=0.5")
    result = export.run(cfg)
    program = torch.export.load(result["path"])
    assert export.random_ops(program), "the draws must be ops of the graph"
    loaded = program.module()
    model = _in_process(cfg)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        calls = [loaded(x) for _ in range(6)]  # a file that froze one draw would give 6 equal outputs
        assert any(not torch.equal(calls[0], c) for c in calls[1:])
        boxes = set()
        for seed in range(4):  # draw for draw: replay the global RNG, pin the box in-process
            torch.manual_seed(seed)
            got = loaded(x)
            torch.manual_seed(seed)
            box = tuple(int(v) for v in model.random_pad.draw_box_tensors(32, 32))
            boxes.add(box)
            with fixed_draw(model, box):
                expected = model(x).exp()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.sum(1), torch.ones(3))
    assert len(boxes) > 1
    assert json.loads(open(result["budget_path"]).read())["defense"]["random_pad"]["enabled"]


class GlobalDraw(torch.nn.Module):
    """What the exported graph runs in place of the random pad: tensor draws from the global RNG."""

    def __init__(self, pad: RandomResizePad) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return resize_pad_static(x, *self.pad.draw_box_tensors(*x.shape[-2:]))


def test_round_trip_check_catches_a_wrong_or_frozen_program(checkpoints, tmp_path):
    cfg = _cfg(checkpoints[:1], tmp_path, "random_pad.enabled=true", "random_pad.min_ratio=0.5")
    model = _in_process(cfg)
    like_the_file = _in_process(cfg)
    like_the_file.random_pad = GlobalDraw(like_the_file.random_pad)
    assert check_round_trip(export.ProbabilityOutput(like_the_file).eval(), model, 32) <= 1e-6
    other = _in_process(_cfg(checkpoints[1:2], tmp_path, "random_pad.enabled=true", "random_pad.min_ratio=0.5"))
    other.random_pad = GlobalDraw(other.random_pad)
    assert check_round_trip(export.ProbabilityOutput(other).eval(), model, 32) > export.ROUND_TRIP_ATOL
    frozen = _in_process(cfg)
    with fixed_draw(frozen, (3, 3, 20, 20)):  # what a naive trace would have kept
        assert check_round_trip(export.ProbabilityOutput(frozen).eval(), model, 32) > export.ROUND_TRIP_ATOL


def test_a_program_that_does_not_round_trip_writes_nothing(checkpoints, exported, tmp_path, monkeypatch):
    # Pretend torch.export produced the program of another model (the fixture's 2-member one).
    result, _ = exported
    monkeypatch.setattr(export, "export_program", lambda model, size: torch.export.load(result["path"]))
    with pytest.raises(UserError, match=r"does not reproduce the in-process model .*no file written"):
        export.run(_cfg(checkpoints[1:2], tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_gmacs_scale_with_views_and_members(checkpoints, tmp_path):
    def report(members, *extra):
        cfg = _cfg(members, tmp_path, "tta.hflip=false", *extra)
        model = _in_process(cfg)
        return export.budget_report(model, max(model.model.image_sizes), cfg)

    one = report(checkpoints[:1])["gmacs"]
    big = report(checkpoints[2:])["gmacs"]
    assert 0 < one < big  # 48 px costs more than 32 px
    two_views = report(checkpoints[:1], "tta.hflip=true")
    assert two_views["gmacs"] == pytest.approx(2 * one, rel=0.02)
    assert two_views["members"][0]["gmacs"] == pytest.approx(2 * two_views["members"][0]["gmacs_per_view"])
    mixed = report([checkpoints[0], checkpoints[2]])  # fed 48 px; the 32 px member resizes down
    assert mixed["gmacs"] == pytest.approx(one + big, rel=0.02)
    assert [m["gmacs_per_view"] for m in mixed["members"]] == pytest.approx([one, big], rel=0.02)


def test_flop_counter_matches_convnext_tiny_reference():
    # Published: convnext_tiny is 4.47 GMACs at 224 (with a 1000-class head; 100 classes: -0.0007)
    model = timm.create_model("convnext_tiny", num_classes=100).eval()
    assert export.count_gmacs(model, 224) == pytest.approx(4.47, rel=0.03)


def test_over_budget_warns_or_refuses_without_a_file(checkpoints, tmp_path, capsys):
    limits = ["budget.max_gmacs=0.0001", "budget.max_params=1000"]
    result = export.run(_cfg(checkpoints[:1], tmp_path, "tta.hflip=false", *limits))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert f"{result['gmacs']:.4g} GMACs per image > budget.max_gmacs 0.0001" in warnings[0]
    assert "> budget.max_params 0.001M" in warnings[0] and "TTA" in warnings[0]
    assert not result["within_budget"] and (tmp_path / "defended.pt2").is_file()
    for f in tmp_path.iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"over budget: .*GMACs per image > budget.max_gmacs .*no model file"):
        export.run(_cfg(checkpoints[:1], tmp_path, *limits, "budget.enforce=true"))
    assert list(tmp_path.iterdir()) == []


def test_export_path_that_is_a_folder_is_a_user_error(checkpoints, tmp_path):
    with pytest.raises(UserError, match="export.path: .* is a folder"):
        export.run(load_config(None, [f"submit.checkpoints=[{checkpoints[0]}]", f"export.path={tmp_path}"]))


def test_cli_missing_checkpoint_is_exit_2(tmp_path):
    proc = run_module("phase2.export", f"submit.checkpoints=[{tmp_path / 'nope'}]", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'nope'}.safetensors (train first, or set submit.checkpoints)"
    ]


@pytest.mark.parametrize("refused", ["defended.pt2", "defended.budget.json"])
def test_a_full_disk_while_exporting_keeps_the_earlier_files(checkpoints, tmp_path, monkeypatch, refused):
    """The files are one unit: a disk full on the last model file or on the budget JSON leaves
    every earlier file as it was (not new ONNX and zip files beside an old budget)."""
    common = ["tta.hflip=false", "export.formats=[onnx,zip,pt2]"]
    export.run(_cfg(checkpoints[:1], tmp_path, *common, "export.channel_order=rgb"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"defended.onnx", "defended.zip", "defended.pt2", "defended.budget.json"} <= set(before)
    bgr = _cfg(checkpoints[:1], tmp_path, *common, "export.channel_order=bgr")  # other bytes in every file
    with monkeypatch.context() as m:
        full_disk(m, refused)
        with pytest.raises(UserError, match=rf"export.path: cannot write .*{refused} \(No space left on device\)"):
            export.run(bgr)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    export.run(bgr)  # with room on the disk, every file changes
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before) and all(after[name] != before[name] for name in before)


def test_an_export_never_lands_on_a_model(checkpoints, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    export_model(
        load_members(checkpoints[:1], 4)[0][0],
        run_dir / "best",
        {"arch": "test_convnext", "num_classes": 4, "image_size": 32, **record_owner("train", "model checkpoint")},
    )
    for path in (run_dir / "best.pt2", run_dir / "best.safetensors"):
        cfg = _cfg(checkpoints[:1], tmp_path, f"export.path={path}")
        # export.path names the files' stem: the refusal names the first file, <path>.<format>
        refused = rf"^export.path: export would write {path}(\.\w+)?, which belongs to the model"
        with pytest.raises(UserError, match=refused):
            export.run(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.json", "best.safetensors"]


def test_a_narrower_export_leaves_one_exports_files_under_its_stem(checkpoints, tmp_path, monkeypatch):
    """Issue 29, item 6: `export.formats=[zip]` after a full export left the earlier .onnx/.pt2
    (another channel order) beside the new zip, and the budget JSON listed only the zip."""
    full = ["tta.hflip=false", "export.formats=[onnx,zip,pt2]", "export.channel_order=rgb"]
    export.run(_cfg(checkpoints[:1], tmp_path, *full))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    narrower = _cfg(checkpoints[:1], tmp_path, "tta.hflip=false", "export.formats=[zip]", "export.channel_order=bgr")
    with monkeypatch.context() as m:  # a failure keeps the whole earlier set, the files it would remove included
        full_disk(m, "defended.budget.json")
        with pytest.raises(UserError, match="No space left on device"):
            export.run(narrower)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    export.run(narrower)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["defended.budget.json", "defended.zip"]
    report = json.loads((tmp_path / "defended.budget.json").read_text())
    assert list(report["files"]) == ["zip"]
    assert report["files"]["zip"]["sha256"] == hashlib.sha256((tmp_path / "defended.zip").read_bytes()).hexdigest()
    assert export.recorded_file_problem(tmp_path / "defended.zip") == (tmp_path / "defended.budget.json", None)


def test_leftovers_of_a_killed_export_are_removed_by_the_next_one(checkpoints, tmp_path):
    """Issue 29, item 12: an export killed between writing its temp files and renaming them left
    `.tmp` and `.bak` files (38 MB in the probe) that no later export removed."""
    leftovers = [tmp_path / ".defended.onnx.k1ll3d_0.tmp", tmp_path / ".defended.budget.json.0badf00d.bak"]
    tmp_path.mkdir(exist_ok=True)
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    export.run(_cfg(checkpoints[:1], tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["defended.budget.json", "defended.pt2"]
