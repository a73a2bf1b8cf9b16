"""Submit stage: defended model, ensemble/TTA, submission files, bad test images, 2 processes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from core.checkpoint import load_model
from core.config import load_config
from core.outputs import acquire
from infer import submit
from infer.defended import EnsembleTTA, View, apply_view, build_defended_model, load_members, resolve_views
from infer.submission import set_problems, validate_file
from tests.conftest import TINY_DATA, full_disk, run_module, shrink
from train import main as train_main


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny model trained for 2 epochs by the real training stage: (data_root, runs_dir)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, shrink(["train.epochs=2"], tiny_data, runs))
    train_main.run(cfg)
    return tiny_data, runs


def _cfg(trained, tmp_path, *overrides):
    data, runs = trained
    return load_config(None, shrink([f"submit.out_dir={tmp_path / 'subs'}", *overrides], data, runs))


def test_submit_writes_valid_files_and_meta(trained, tmp_path, capsys):
    cfg = _cfg(trained, tmp_path, "tta.hflip=true")
    result = submit.run(cfg)
    subs = tmp_path / "subs"
    # the success line names all three files (it left out the meta file)
    assert f"wrote {subs}/demo.csv, {subs}/demo.json and {subs}/demo.meta.json (" in capsys.readouterr().out
    assert sorted(p.name for p in subs.iterdir()) == ["demo.csv", "demo.json", "demo.meta.json"]
    test_dir = trained[0] / "test"
    assert validate_file(subs / "demo.csv", test_dir, 4).ok and validate_file(subs / "demo.json", test_dir, 4).ok
    rows = (subs / "demo.csv").read_text().splitlines()
    n_test = TINY_DATA["num_classes"] * TINY_DATA["test_per_class"]
    assert rows[0] == "image_id,category_id" and len(rows) == 1 + n_test
    entries = json.loads((subs / "demo.json").read_text())
    assert [e["image_id"] for e in entries] == list(range(n_test))
    assert [f"{e['image_id']},{e['category_id']}" for e in entries] == rows[1:]
    meta = json.loads((subs / "demo.meta.json").read_text())
    assert meta["defense"]["gcm"] == {"enabled": True, "w": 1e20, "eps": 1e-8}
    assert meta["defense"]["tta_views"] == ["scale1", "scale1+hflip"]
    assert len(meta["checkpoints"][0]["sha256"]) == 64
    assert meta["test_labelled"] == n_test and 0 <= meta["test_acc"] <= 100
    assert result["test_acc"] == meta["test_acc"]


def test_an_unwritable_out_dir_fails_before_any_prediction(trained, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted although the files could not be written")

    monkeypatch.setattr(submit, "predict", no_prediction)
    cfg = load_config(None, shrink([f"submit.out_dir={tmp_path / 'a_file' / 'subs'}"], *trained))
    with pytest.raises(submit.UserError, match=r"submit.out_dir: cannot write to .*a_file/subs"):
        submit.run(cfg)


def _no_prediction(monkeypatch) -> None:
    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted although the files could not be written")

    monkeypatch.setattr(submit, "predict", no_prediction)


def test_a_submission_never_lands_on_a_model(trained, tmp_path, monkeypatch):
    data, runs = trained
    run_dir = runs / "demo"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    _no_prediction(monkeypatch)
    for name in ("best", "last"):
        cfg = load_config(None, shrink([f"submit.out_dir={run_dir}", f"submit.file_name={name}"], data, runs))
        with pytest.raises(
            submit.UserError,
            match=rf"^submit.file_name: submit would write {run_dir}/{name}.csv, which belongs to the model "
            rf"checkpoint '{name}' of {run_dir} \(written by train\)",
        ):
            submit.run(cfg)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert load_model(run_dir / "best")


def test_a_second_submit_to_one_name_is_refused_before_predicting(trained, tmp_path, monkeypatch):
    _no_prediction(monkeypatch)
    with acquire(tmp_path / "subs" / "demo", "submit", "submit.file_name"):
        with pytest.raises(submit.UserError, match=rf"subs/demo: in use by submit \(pid {os.getpid()} on "):
            submit.run(_cfg(trained, tmp_path))
    assert not (tmp_path / "subs").exists()


def test_a_full_disk_while_writing_the_submission_keeps_the_earlier_one(trained, tmp_path, monkeypatch):
    cfg = _cfg(trained, tmp_path)
    submit.run(cfg)
    subs = tmp_path / "subs"
    before = {p.name: p.read_bytes() for p in subs.iterdir()}
    full_disk(monkeypatch, "demo.json")
    with pytest.raises(
        submit.UserError, match=r"subs/demo.json: cannot write \(No space left on device\); nothing was replaced"
    ):
        submit.run(cfg)
    assert {p.name: p.read_bytes() for p in subs.iterdir()} == before  # the older set, whole; no temp file left
    assert set_problems(subs / "demo.csv") == []


def test_gcm_does_not_change_predictions(trained, tmp_path):
    with_gcm = submit.run(_cfg(trained, tmp_path, "submit.file_name=on"))
    without = submit.run(_cfg(trained, tmp_path, "submit.file_name=off", "gcm.enabled=false"))
    subs = tmp_path / "subs"
    assert (subs / "on.csv").read_bytes() == (subs / "off.csv").read_bytes()
    assert with_gcm["test_acc"] == without["test_acc"]


def test_randomized_defense_submissions_are_reproducible(trained, tmp_path):
    common = ["random_pad.enabled=true", "random_pad.min_ratio=0.5", "submit.batch_size=5"]
    submit.run(_cfg(trained, tmp_path, "submit.file_name=a", *common))
    submit.run(_cfg(trained, tmp_path, "submit.file_name=b", *common))
    submit.run(_cfg(trained, tmp_path, "submit.file_name=c", *common, "random_pad.seed=1"))
    subs = tmp_path / "subs"
    assert (subs / "a.csv").read_bytes() == (subs / "b.csv").read_bytes()
    assert (subs / "a.json").read_bytes() == (subs / "b.json").read_bytes()
    # the layer really is random: another seed changes some predictions at this strength
    assert (subs / "a.csv").read_bytes() != (subs / "c.csv").read_bytes()


def test_bad_test_image_stops_with_no_output(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    (data / "test" / "7.png").write_bytes(b"not a png at all")
    cfg = _cfg(trained, tmp_path, f"data.root={data}")
    with pytest.raises(submit.UserError, match=r"7\.png.*submit\.on_bad_image=fallback"):
        submit.run(cfg)
    assert not (tmp_path / "subs").exists() or not any((tmp_path / "subs").iterdir())

    cfg = _cfg(trained, tmp_path, f"data.root={data}", "submit.on_bad_image=fallback", "submit.fallback_class=3")
    submit.run(cfg)
    meta = json.loads((tmp_path / "subs" / "demo.meta.json").read_text())
    assert meta["bad_images"] == [str(data / "test" / "7.png")] and meta["fallback_class"] == 3
    rows = dict(line.split(",") for line in (tmp_path / "subs" / "demo.csv").read_text().splitlines()[1:])
    assert rows["7"] == "3"


def test_ensemble_and_tta_aggregation(trained):
    _, runs = trained
    members, infos = load_members([runs / "demo" / "best", runs / "demo" / "last"], 4)
    x = torch.rand(5, 3, 32, 32)
    views = resolve_views([1.0, 0.9], hflip=True)
    assert [str(v) for v in views] == ["scale1", "scale0.9", "scale1+hflip", "scale0.9+hflip"]
    ens = EnsembleTTA(members, [32, 32], views, weights=[3.0, 1.0]).eval()
    with torch.no_grad():
        logp = ens(x)
        # by hand: per member, mean softmax over views; then members weighted 3:1
        probs = []
        for m in members:
            p = torch.stack([m(apply_view(x, v.scale, v.hflip)).softmax(-1) for v in views]).mean(0)
            probs.append(p)
        expected = 0.75 * probs[0] + 0.25 * probs[1]
    assert logp.shape == (5, 4)
    torch.testing.assert_close(logp.exp(), expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(5), atol=1e-5)
    # mean-logit aggregation and temperature
    ens_logit = EnsembleTTA(members[:1], [32], [View()], aggregate="logit", temperature=2.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(ens_logit(x), (members[0](x) / 2.0).log_softmax(-1))
    # a member with another input size gets the image resized
    ens_sizes = EnsembleTTA(members[:1], [48], [View()]).eval()
    with torch.no_grad():
        assert ens_sizes(x).shape == (5, 4)


def test_view_geometry():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    assert torch.equal(apply_view(x, 1.0, True), x.flip(-1))
    small = apply_view(torch.ones(1, 3, 8, 8), 0.5, False)
    assert small.shape == (1, 3, 8, 8) and small[..., 0, 0].sum() == 0 and small[..., 4, 4].sum() == 3
    assert apply_view(torch.ones(1, 3, 8, 8), 1.25, False).shape == (1, 3, 8, 8)


def test_defended_model_matches_submit_layers(trained):
    cfg = load_config(None, ["random_pad.enabled=true", "data.image_size=32"])
    members, infos = load_members([trained[1] / "demo" / "best"], 4)
    model = build_defended_model(members, infos, cfg)
    names = [type(m).__name__ for m in (model.gcm, model.random_pad)]
    assert names == ["GradientConcealment", "RandomResizePad"] and model.randomized
    plain = build_defended_model(members, infos, cfg, defense=False)
    assert (plain.gcm, plain.random_pad) == (None, None) and not plain.randomized
    assert plain.model.members[0] is model.model.members[0]  # the same networks, only the defense differs


@pytest.mark.slow
def test_two_process_submit_writes_the_same_files(trained, tmp_path):
    data, runs = trained
    # random pad on: its draws must not depend on how batches are spread over processes
    common = ["submit.batch_size=7", "random_pad.enabled=true", "random_pad.min_ratio=0.5"]
    overrides = shrink([f"submit.out_dir={tmp_path / 'two'}", *common], data, runs)
    proc = run_module("launch", "infer.submit", "--num_processes", "2", *overrides, OMP_NUM_THREADS="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the launcher splits the cores between the processes (accelerate alone would give each 1 thread)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 process(es) on cpu in fp32 with {threads} torch thread(s)" in proc.stdout, proc.stdout
    submit.run(load_config(None, shrink([f"submit.out_dir={tmp_path / 'one'}", *common], data, runs)))
    for name in ("demo.csv", "demo.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    meta = json.loads((tmp_path / "two" / "demo.meta.json").read_text())
    assert meta["num_processes"] == 2 and meta["n_images"] == 32


# --- submit on CPU: loader workers, threaded decoding, compilation ---------------------------


def test_cpu_submit_loader_workers_take_only_the_free_cores(tiny_config, tiny_data):
    from accelerate import Accelerator

    from core.labels import list_test_images
    from infer.submit import create_test_loader

    accelerator = Accelerator(cpu=True)
    items = list_test_images(tiny_data / "test")
    cfg = tiny_config("submit.num_workers=3", "submit.cpu_num_workers=1")
    assert create_test_loader(cfg, items, 32, accelerator).num_workers == 1  # explicit value wins
    cfg = tiny_config("submit.num_workers=3")  # cpu_num_workers=-1: auto
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # the model's threads occupy every core: decode in between
        loader = create_test_loader(cfg, items, 32, accelerator)
        assert loader.num_workers == 0 and loader.dataset.decode_threads == cores  # decode on every core
        torch.set_num_threads(1)  # as under accelerate launch (OMP_NUM_THREADS=1)
        assert create_test_loader(cfg, items, 32, accelerator).num_workers == cores - 1
    finally:
        torch.set_num_threads(threads)
    images, ids, ok = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and ok.all()


def test_threaded_batch_decoding_gives_the_same_batch(tiny_data, tmp_path):
    import pickle

    from core.datasets import TestImageDataset
    from core.labels import list_test_images

    items = list_test_images(tiny_data / "test")[:10]
    bad = tmp_path / "999.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.append((bad, 999))
    one, threaded = TestImageDataset(items, 32), TestImageDataset(items, 32, decode_threads=2)
    order = list(range(len(items)))[::-1]
    expected, got = one.__getitems__(order), threaded.__getitems__(order)
    assert threaded._pool is not None  # the batch went through the pool
    assert [(i, ok) for _, i, ok in got] == [(i, ok) for _, i, ok in expected]
    assert got[0][1:] == (999, False) and all(ok for _, _, ok in got[1:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, expected))
    assert pickle.loads(pickle.dumps(threaded))._pool is None  # what a loader worker receives


def test_compile_wraps_only_the_member_networks(tiny_config):
    from core.model import create_classifier
    from gcm import GradientConcealment
    from infer.defended import build_defended_model
    from infer.submit import compile_members

    cfg = tiny_config("model.compile=true")
    members = [create_classifier(cfg.model, 4).eval() for _ in range(2)]
    model = build_defended_model(members, [{"image_size": 32}] * 2, cfg)
    compile_members(model)
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.model.members)
    assert [m._orig_mod for m in model.model.members] == members
    assert type(model.gcm) is GradientConcealment  # the defense stays eager float32
