"""The real challenge's path, on a tiny data set of its shape: check-data, the per-phase layouts,
and the README's real-data commands run as written (with the model, image size and steps shrunk).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from core.config import load_config
from core.errors import UserError
from tests.conftest import ROOT, run_module
from train import check_data
from train.demo_data import generate_demo_data

# What turns a 224-px convnext_tiny recipe into seconds on a CPU; everything else is the config's.
SHRINK = [
    "model.name=test_convnext",
    "data.image_size=32",
    "train.max_steps=2",
    "train.epochs=1",
    "train.batch_size=8",
    "train.adv.val_images=8",
    "data.num_workers=0",
    "submit.batch_size=32",
    "wandb.mode=disabled",
]


def make_phase(root: Path, classes: int, per_class: int, train_dir: str, test_dir: str | None) -> Path:
    """A challenge-shaped phase folder: ``train_dir/*.JPEG`` + ``label.txt`` (+ ``test_dir/N.png``)."""
    made = root.parent / f".gen-{root.name}"
    generate_demo_data(made, num_classes=classes, train_per_class=per_class, test_per_class=1, image_size=32)
    root.mkdir(parents=True)
    shutil.move(made / "train", root / train_dir)
    shutil.move(made / "label.txt", root / "label.txt")
    if test_dir:
        shutil.move(made / "test", root / test_dir)
    shutil.rmtree(made)
    return root


@pytest.fixture(scope="module")
def challenge_data(tmp_path_factory) -> Path:
    """data/cvpr22/ as README 'The real challenge' shows it: 20 classes in Phase I, 100 in Phase II."""
    data = tmp_path_factory.mktemp("cvpr22") / "cvpr22"
    make_phase(data / "phase1", 20, 4, "train", "track1_test1")
    make_phase(data / "phase2", 100, 2, "train_p2", None)
    return data


def phase_config(data: Path, phase: int, *overrides: str):
    return load_config(ROOT / f"configs/cvpr22_phase{phase}.yaml", [f"data.root={data / f'phase{phase}'}", *overrides])


def test_each_phase_reads_its_own_labels_and_every_class_is_there(challenge_data, capsys):
    for phase, classes in ((1, 20), (2, 100)):
        report = check_data.run(phase_config(challenge_data, phase), progress=False)
        assert report["problems"] == [] and report["unlisted"] == []
        out = capsys.readouterr().out
        assert f"({classes} classes, all with training images)" in out and "JPEG" in out
    assert "track1_test1" in out or report["test"] is None  # Phase II ships no test folder


def test_phase2_on_phase1s_label_file_is_refused_in_one_line(challenge_data, tmp_path):
    # the 20-class label file under the 100-class config: every label is in range, 80 classes are empty
    phase1 = challenge_data / "phase1"
    overrides = [f"data.root={challenge_data / 'phase2'}", f"data.train_labels={phase1 / 'label.txt'}"]
    overrides += [f"data.train_dir={phase1 / 'train'}", f"out_dir={tmp_path / 'runs'}", *SHRINK]
    proc = run_module("launch", "train.main", "--config", "configs/cvpr22_phase2.yaml", *overrides)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {phase1 / 'label.txt'}: 80 of data.num_classes=100 classes have no training image (missing: "
        "20, 21, 22, 23, 24, 25, 26, 27, 28, 29, ... (80 in all)); is this the label file of another phase? "
        "(data.allow_missing_classes=true trains anyway)"
    ]
    assert not proc.stdout and not (tmp_path / "runs").exists()  # refused before any process started


def test_a_layout_that_does_not_match_is_one_line(tmp_path, challenge_data):
    with pytest.raises(UserError, match=r"^data.root .*/nowhere: no such folder"):
        check_data.run(load_config(ROOT / "configs/cvpr22_phase1.yaml", [f"data.root={tmp_path / 'nowhere'}"]))
    with pytest.raises(UserError, match=r"^data.train_dir: .*/phase2/train: is not a folder|^data.train_dir: .*"):
        check_data.run(phase_config(challenge_data, 2, "data.train_dir=train"))


def test_check_data_reports_unlisted_unreadable_and_counts(tmp_path, capsys):
    root = make_phase(tmp_path / "p", 3, 5, "train", "test")
    (root / "train" / "stray.JPEG").write_bytes((root / "train" / "0.JPEG").read_bytes())  # no label lists it
    (root / "train" / "1.JPEG").write_bytes(b"not an image")
    Image.new("RGB", (48, 40)).save(root / "train" / "2.JPEG")
    cfg = load_config(None, [f"data.root={root}", "data.demo=false", "data.num_classes=3", "data.val_fraction=0"])
    report = check_data.run(cfg, progress=False)
    out = capsys.readouterr().out
    assert report["unlisted"] == ["stray.JPEG"] and report["train"]["bad"] == [str(root / "train" / "1.JPEG")]
    assert report["problems"] and "1 training/validation images cannot be read" in report["problems"][0]
    assert "per class: min 5 (class 0), median 5, max 5 (class 0)" in out
    assert "width 32-48" in out and "height 32-40" in out and "test: " in out
    skip = load_config(None, [f"data.root={root}", "data.demo=false", "data.num_classes=3", "data.bad_images=skip"])
    assert check_data.run(skip, progress=False)["problems"] == []  # training would skip it: a note, not a stop
    with pytest.raises(UserError, match=r"1 of data.num_classes=4 classes have no training image \(missing: 3\)"):
        check_data.run(load_config(None, [f"data.root={root}", "data.demo=false", "data.num_classes=4"]))
    ok = load_config(
        None, [f"data.root={root}", "data.demo=false", "data.num_classes=4", "data.allow_missing_classes=true"]
    )
    assert check_data.run(ok, progress=False)["train"]["n"] > 0


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("<!-- real-data commands -->") : text.index("<!-- end real-data commands -->")]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("./run.sh ")]


@pytest.mark.slow
def test_the_readmes_real_data_commands_run_as_written(challenge_data, tmp_path):
    commands = readme_commands()
    assert len(commands) == 7 and sum("check-data" in c for c in commands) == 2
    # A copy of the checkout with the data where the configs look (the user's data/ stays untouched).
    repo = tmp_path / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    (repo / "data").mkdir()
    shutil.copytree(challenge_data, repo / "data" / "cvpr22")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH="")
    for command in commands:
        extra = ["--image-size", "32", *SHRINK] if " check-submission " in command else SHRINK
        proc = subprocess.run(
            ["bash", "-c", command + " " + " ".join(extra)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # the files each phase uploads
    predictions = json.loads((repo / "submissions/t1_p1_result.json").read_text())
    assert [p["image_id"] for p in predictions] == list(range(20)) and {"category_id"} < set(predictions[0])
    assert (repo / "runs/cvpr22_phase2/cvpr22_phase2.zip").is_file()


def test_check_data_names_a_missing_class_with_a_validation_label_file(tmp_path, capsys):
    # issue 35, 3: data.val_labels skipped the class coverage (check-data and train's preflight).
    root = make_phase(tmp_path / "p", 3, 4, "train", None)
    lines = (root / "label.txt").read_text().splitlines()
    (root / "train.txt").write_text("".join(f"{line}\n" for line in lines if not line.endswith(" 2")))
    (root / "val.txt").write_text("".join(f"{line}\n" for line in lines if line.endswith(" 2")))
    keys = [f"data.root={root}", "data.demo=false", "data.num_classes=3", "data.train_labels=train.txt"]
    keys.append("data.val_labels=val.txt")
    with pytest.raises(UserError, match=r"1 of data.num_classes=3 classes have no training image \(missing: 2\)"):
        check_data.run(load_config(None, keys))
    capsys.readouterr()
    check_data.run(load_config(None, [*keys, "data.allow_missing_classes=true"]), progress=False)
    assert "(3 classes, 1 without a training image (data.allow_missing_classes=true))" in capsys.readouterr().out
