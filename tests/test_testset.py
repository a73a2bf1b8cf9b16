"""``./run.sh make-testset`` (robust/testset.py) and the score by kind ``submit`` reads from its manifest.

Tiny generated data (4 classes, 32 px, 32 test images with hidden labels) and two untrained
test_convnext checkpoints: one the surrogate the transfer attacks are crafted on, one the
submitted model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import export_model
from core.config import ConfigError, load_config
from core.errors import UserError
from core.model import create_classifier
from infer import submit
from infer.testset_folder import KINDS, hold_folder_for_writing
from robust import ablation, testset
from tests.conftest import shrink

MIXES = [(0.25, 0.25, 0.25, 0.25), (0.5, 0.1, 0.2, 0.2), (0.0, 0.0, 0.3, 0.7), (1.0, 0.0, 0.0, 0.0)]


def _export(stem: Path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.name=test_convnext", "data.num_classes=4", "data.image_size=32"])
    export_model(create_classifier(cfg.model, 4), stem, {"arch": "test_convnext", "num_classes": 4, "image_size": 32})
    return str(stem)


@pytest.fixture(scope="module")
def setting(tiny_data, tmp_path_factory):
    """(overrides, folder) of a make-testset run of the 32 hidden-label test images."""
    root = tmp_path_factory.mktemp("testset")
    surrogate, submitted = _export(root / "surrogate", 0), _export(root / "submitted", 1)
    overrides = shrink(
        [
            "data.test_labels=test_labels.txt",
            f"submit.checkpoints=[{submitted}]",
            f"testset.surrogates=[{surrogate}]",
            f"testset.out_dir={root / 'set'}",
            # 32 px: L2 budgets of the same per-pixel strength as the 224 px defaults
            "testset.attack.eps_l2=[0.3,0.6]",
            "testset.attack.steps=[2,3]",
        ],
        tiny_data,
        root / "runs",
    )
    testset.run(load_config(None, overrides), progress=False)
    return overrides, root / "set"


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("mix", MIXES, ids=[str(m) for m in MIXES])
@pytest.mark.parametrize("n", [7, 32, 301])
def test_kind_counts_follow_the_fractions(n, mix):
    t = load_config(None, [f"testset.{k}={v}" for k, v in zip(KINDS, mix)]).testset
    counts = Counter(testset.assign_kinds(n, t, seed=3))
    assert sum(counts.values()) == n
    for kind, fraction in zip(KINDS, mix):
        assert abs(counts[kind] - fraction * n) < 1.0, (kind, counts)


def test_the_folder_has_the_challenge_layout_and_the_mix(setting):
    overrides, folder = setting
    names = sorted(p.name for p in (folder / "test").iterdir())
    assert names == sorted(f"{i}.png" for i in range(32))
    labels = dict(line.split() for line in (folder / "test_labels.txt").read_text().splitlines())
    manifest = _manifest(folder)
    assert {e["file"]: str(e["label"]) for e in manifest["images"]} == labels
    assert Counter(e["kind"] for e in manifest["images"]) == {k: 8 for k in KINDS}
    assert manifest["surrogates"][0]["sha256"] and not list(folder.parent.glob(".set.*")), "temp folder left behind"
    for e in manifest["images"]:
        ops = [s["op"] for s in e["steps"]]
        expected = {"clean": [], "corruption": ["corruption"], "transfer": ["attack"]}.get(e["kind"])
        assert ops == expected if expected is not None else sorted(ops) == ["attack", "corruption"]


def test_same_command_same_bytes(setting, tmp_path):
    overrides, folder = setting
    testset.run(load_config(None, [*overrides, f"testset.out_dir={tmp_path / 'again'}"]), progress=False)
    first = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert first.keys() == second.keys() and len(first) == 35  # 32 images, labels, manifest, readers lock
    assert all(first[k] == second[k] for k in first), [str(k) for k in first if first[k] != second[k]]


def test_every_image_is_its_steps_applied_in_order(setting):
    """Each image equals its manifest's steps replayed on the source image; a stacked image differs
    from either of its two transformations alone, and both orders occur."""
    overrides, folder = setting
    cfg = load_config(None, overrides)
    source, labels, _, _ = testset.load_source(cfg)
    surrogates, _ = testset.load_surrogates(cfg)
    orders = set()
    for e in _manifest(folder)["images"]:
        image, label = source[e["id"]], int(labels[e["id"]])
        written = _pixels(folder / "test" / e["file"])
        assert torch.equal(written, testset.apply_steps(image, label, e["steps"], surrogates)), e
        if e["kind"] == "clean":
            assert torch.equal(written, image)
        if e["kind"] != "stacked":
            continue
        orders.add(tuple(s["op"] for s in e["steps"]))
        for step in e["steps"]:
            alone = testset.apply_step(image, label, step, surrogates)
            assert not torch.equal(written, alone), f"image {e['id']}: the stack equals its {step['op']} alone"
        assert not torch.equal(written, image)
    assert orders == {("attack", "corruption"), ("corruption", "attack")}


def test_transfer_images_stay_near_their_budget(setting):
    overrides, folder = setting
    source = testset.load_source(load_config(None, overrides))[0]
    norms = set()
    for e in _manifest(folder)["images"]:
        if e["kind"] != "transfer":
            continue
        (step,) = e["steps"]
        delta = (_pixels(folder / "test" / e["file"]).float() - source[e["id"]].float()) / 255
        assert delta.abs().max() > 0, "the attack changed nothing"
        norms.add(step["norm"])
        # rounding to uint8 moves each pixel at most half a level: its own Linf, sqrt(d) of them in L2
        rounding = 0.5 / 255
        if step["norm"] == "linf":
            assert delta.abs().max() <= step["eps"] + rounding + 1e-6
        else:
            assert delta.norm() <= step["eps"] + rounding * delta.numel() ** 0.5 + 1e-6, (e["file"], step)
    assert norms == {"linf", "l2"}, "both norms of the draw are bounded here"


def test_refusals_are_one_line_and_write_nothing(setting, tmp_path):
    overrides, folder = setting
    cfg = load_config(None, overrides)
    with pytest.raises(UserError, match="already exists"):
        testset.run(cfg, progress=False)
    target = tmp_path / "new"
    surrogate = cfg.testset.surrogates[0]
    with pytest.raises(ConfigError, match=r"testset.surrogates\[0\].*is the submitted model"):
        testset.run(
            load_config(None, [*overrides, f"submit.checkpoints=[{surrogate}]", f"testset.out_dir={target}"]),
            progress=False,
        )
    with pytest.raises(ConfigError, match="testset.surrogates' needs at least one checkpoint"):
        testset.run(load_config(None, [*overrides, "testset.surrogates=[]", f"testset.out_dir={target}"]), False)
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(None, [*overrides, "testset.clean=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'testset.mix'"):
        load_config(None, [*overrides, "testset.mix=1"])
    assert not target.exists() and not list(tmp_path.iterdir())


def test_submit_scores_by_kind_and_refuses_a_surrogate(setting, tmp_path):
    overrides, folder = setting
    scored = [
        *overrides,
        f"data.root={folder}",
        "data.test_dir=test",
        "data.test_labels=test_labels.txt",
        "data.test_manifest=manifest.json",
        f"submit.out_dir={tmp_path}",
    ]
    result = submit.run(load_config(None, scored))
    meta = json.loads(Path(result["files"]["meta"]).read_text())
    preds = {int(r["image_id"]): r["category_id"] for r in json.loads(Path(result["files"]["json"]).read_text())}
    for kind in KINDS:
        ids = [e["id"] for e in _manifest(folder)["images"] if e["kind"] == kind]
        hits = sum(preds[i] == e["label"] for e in _manifest(folder)["images"] for i in [e["id"]] if i in ids)
        assert meta["by_kind"][kind] == {"n": 8, "acc": 100.0 * hits / 8}
    assert meta["by_kind"]["all"]["acc"] == pytest.approx(result["test_acc"])
    surrogate = load_config(None, overrides).testset.surrogates[0]
    with pytest.raises(UserError, match="surrogate"):
        submit.run(load_config(None, [*scored, f"submit.checkpoints=[{surrogate}]", "submit.file_name=other"]))


# --- issue 29: one writer, readers that see one whole set, a manifest that is the folder's -----


FAST_SET = ["testset.clean=0.5", "testset.corruption=0.5", "testset.transfer=0", "testset.stacked=0"]


def test_a_second_make_testset_decides_holding_the_lock(setting, tmp_path, monkeypatch):
    """Item 3: B looked for an existing folder before taking its lock; A finishing in between was
    then replaced by B without testset.overwrite=true."""
    overrides, _ = setting
    cfg = load_config(None, [*overrides, *FAST_SET, f"testset.out_dir={tmp_path / 'set'}"])
    real = testset.hold_output
    calls = []

    def hold_output(*args, **kwargs):
        if not calls:  # B, on its way to the lock: A runs from start to end right now
            calls.append("A")
            testset.run(cfg, progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(testset, "hold_output", hold_output)
    with pytest.raises(UserError, match="already exists"):
        testset.run(cfg, progress=False)  # B
    assert calls == ["A"] and len(_manifest(tmp_path / "set")["images"]) == 32


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_make_testset_never_replaces_a_set_while_submit_reads_it(setting, tmp_path, monkeypatch):
    """Item 4: a submit reading the set while make-testset replaced it scored the old manifest
    against the new images. The writer is refused while a reader reads, and the other way round."""
    overrides, folder = setting
    folder = _copy(folder, tmp_path / "set")
    before = (folder / "manifest.json").read_bytes()
    scored = [
        *overrides,
        f"data.root={folder}",
        "data.test_manifest=manifest.json",
        f"submit.out_dir={tmp_path / 'subs'}",
    ]
    replace = load_config(None, [*overrides, *FAST_SET, f"testset.out_dir={folder}", "testset.overwrite=true"])
    real = submit.predict

    def predict(*args, **kwargs):  # make-testset starts while submit predicts from the folder
        testset.run(replace, progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(submit, "predict", predict)
    with pytest.raises(UserError, match=rf"testset.out_dir: {folder} is being read by another command"):
        submit.run(load_config(None, scored))
    assert (folder / "manifest.json").read_bytes() == before
    monkeypatch.undo()
    with hold_folder_for_writing(folder, "testset.out_dir"):  # make-testset at work on the folder
        with pytest.raises(UserError, match=rf"data.test_dir: {folder} is being replaced by make-testset"):
            submit.run(load_config(None, scored))
        with pytest.raises(UserError, match=rf"ablation.testset: {folder} is being replaced"):
            ablation.load_testset(folder, 32)
    assert not (tmp_path / "subs").exists()


def _edit_manifest(folder: Path, edit) -> None:
    data = _manifest(folder)
    edit(data["images"])
    (folder / "manifest.json").write_text(json.dumps(data))


MISMATCHES = {
    "an image deleted": (lambda f: (f / "test" / "5.png").unlink(), r"images\[5\] describes image 5, which .* not"),
    "an extra image": (
        lambda f: (f / "test" / "40.png").write_bytes((f / "test" / "0.png").read_bytes()),
        r"image 40 of .* is not in the manifest \(1 image",
    ),
    "an id missing": (lambda f: _edit_manifest(f, lambda im: im.pop(3)), r"image 3 of .* is not in the manifest"),
    "an id twice": (
        lambda f: _edit_manifest(f, lambda im: im.append(dict(im[2], kind="clean"))),
        r"images\[32\] repeats the id 2 of images\[2\]",
    ),
    "an id of no image": (
        lambda f: _edit_manifest(f, lambda im: im[7].update(id=77)),
        r"images\[7\] describes image 77, which",
    ),
    "another label": (
        lambda f: _edit_manifest(f, lambda im: im[4].update(label=(im[4]["label"] + 1) % 4)),
        r"images\[4\] \(image 4\) has label \d, the hidden labels say \d",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_manifest_that_is_not_its_folders_is_one_line(setting, tmp_path, case):
    """Item 5: missing, duplicate and extra ids, and a deleted image, all passed without a word."""
    overrides, folder = setting
    folder = _copy(folder, tmp_path / "set")
    edit, message = MISMATCHES[case]
    edit(folder)
    cfg = load_config(
        None, [*overrides, f"data.root={folder}", "data.test_manifest=manifest.json", f"submit.out_dir={tmp_path}/s"]
    )
    with pytest.raises(UserError, match=message) as refused:
        submit.run(cfg)
    assert "\n" not in str(refused.value) and not (tmp_path / "s").exists()
    if case != "an extra image":  # ablate reads only the labelled images: an unlabelled extra one is not in its set
        with pytest.raises(UserError, match=message):
            ablation.load_testset(folder, 32)


def test_leftovers_of_a_killed_make_testset_are_cleaned_or_put_back(setting, tmp_path):
    """Item 12: a partial hidden temporary folder of a killed run was never removed."""
    overrides, folder = setting
    out = tmp_path / "set"
    cfg = load_config(None, [*overrides, *FAST_SET, f"testset.out_dir={out}", "testset.overwrite=true"])
    partial = tmp_path / ".set.tmp"  # core.io.publishing's names
    (partial / "test").mkdir(parents=True)
    (partial / "test" / "0.png").write_bytes(b"half")
    testset.run(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # killed between moving the old set aside and renaming the new one in: the old set comes back
    old = tmp_path / ".set.old"
    out.rename(old)
    (partial / "test").mkdir(parents=True)
    with pytest.raises(UserError, match="already exists"):
        testset.run(load_config(None, [*overrides, *FAST_SET, f"testset.out_dir={out}"]), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and (out / "manifest.json").is_file()


def test_a_linked_out_dir_stays_a_link_and_leaves_nothing_beside_it(setting, tmp_path):
    # issue 35, 15: make-testset through a linked out_dir replaced the link with a folder and left
    # a `.X.old-*` link for ever.
    overrides, _ = setting
    real = tmp_path / "sets" / "v1"
    real.parent.mkdir()
    link = tmp_path / "current"
    os.symlink(real, link)  # to a folder not made yet, then to the set it made (replaced)
    for overwrite in ("false", "true"):
        cfg = load_config(None, [*overrides, f"testset.out_dir={link}", f"testset.overwrite={overwrite}"])
        testset.run(cfg, progress=False)
        assert link.is_symlink() and os.readlink(link) == str(real) and (real / "manifest.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["current", "sets"]
        assert sorted(p.name for p in real.parent.iterdir() if not p.name.endswith(".lock")) == ["v1"]
