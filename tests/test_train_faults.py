"""Training under faults: SIGKILL, torn checkpoint writes, full disk, NaN loss, bad out_dir."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import load_model
from core.cli import Terminated
from core.config import load_config
from core.errors import UserError
from tests.conftest import ROOT, full_disk, run_module, shrink, weight_difference
from train import main as train_main
from train.engine import TrainingDiverged
from train.state import resolve_resume

COMMON = ["train.epochs=2", "model.drop_path_rate=0.1", "train.checkpoint_every=1", "aug.corruption_p=0.5"]


@pytest.fixture(scope="module")
def base_runs(tiny_data, tmp_path_factory):
    """``base_runs(steps)``: the run folder of ``COMMON`` trained for ``steps`` steps, trained once for
    the module (several faults start from the same finished run)."""
    made = {}

    def get(steps: int):
        if steps not in made:
            out = tmp_path_factory.mktemp(f"base{steps}")
            train_main.run(load_config(None, shrink([*COMMON, f"train.max_steps={steps}"], tiny_data, out)))
            made[steps] = out / "demo"
        return made[steps]

    return get


@pytest.fixture
def trained(base_runs, tiny_config):
    """``trained(steps) -> Config``: this test's own copy of the base run of ``steps`` steps, in its
    ``tiny_config`` run folder (what ``train_main.run(tiny_config(*COMMON, "train.max_steps=N"))`` makes)."""

    def copy(steps: int):
        cfg = tiny_config(*COMMON, f"train.max_steps={steps}")
        shutil.copytree(base_runs(steps), cfg.run_dir)
        return cfg

    return copy


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_data, tiny_config, tmp_path):
    full = tiny_config(*COMMON, "name=full")
    train_main.run(full)

    out = tmp_path / "runs"
    args = shrink([*COMMON, "name=killed"], tiny_data, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = out / "killed" / "checkpoints"
    deadline = time.time() + 300
    # kill once the run is inside epoch 0 with a few checkpoints behind it (8 steps per epoch)
    while time.time() < deadline and proc.poll() is None:
        names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
        if any(n.startswith("e0000_b000004") for n in names):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    survivors = sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".tmp"))
    assert survivors and all(n.startswith("e0000") for n in survivors)

    resumed = train_main.run(tiny_config(*COMMON, "name=killed", f"out_dir={out}", "resume=auto"))
    assert resumed["epochs"] == 2
    assert weight_difference(full.run_dir, out / "killed") < 1e-5


def test_torn_checkpoint_is_never_resumed_from(trained, tiny_config):
    cfg = trained(3)
    ckpts = cfg.run_dir / "checkpoints"
    last = sorted(ckpts.iterdir())[-1]
    # what a kill in the middle of save_state leaves: a newer folder still under its temporary name
    torn = ckpts / ".e0000_b000005.tmp"
    shutil.copytree(last, torn)
    for f in torn.iterdir():
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    assert resolve_resume(tiny_config(*COMMON, "resume=auto")) == last
    result = train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4"))
    assert result["global_step"] == 4


def test_disk_full_during_checkpoint_keeps_earlier_ones(trained, tiny_config, monkeypatch):
    cfg = trained(2)
    before = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    weights_before = (cfg.run_dir / "last.safetensors").read_bytes()

    from accelerate import Accelerator

    def full_disk(self, output_dir=None, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        (open(os.path.join(output_dir, "model.safetensors"), "wb")).write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(UserError, match="No space left on device; earlier checkpoints are intact"):
        train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4"))
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == before
    assert load_model(cfg.run_dir / "last")  # exports still load (hash checked)
    assert (cfg.run_dir / "last.safetensors").read_bytes() != b"" and weights_before


def test_disk_full_while_exporting_best_and_last_keeps_the_earlier_ones(trained, tiny_config, monkeypatch):
    cfg = trained(2)
    exports = ("best.*", "last.*", ".*.tmp")
    before = {p.name: p.read_bytes() for pattern in exports for p in cfg.run_dir.glob(pattern)}
    full_disk(monkeypatch, "last.safetensors")
    with pytest.raises(
        UserError,
        match=r"cannot write the exported model .*demo/last.safetensors: No space left on device; earlier exports",
    ):
        train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4"))
    assert {p.name: p.read_bytes() for pattern in exports for p in cfg.run_dir.glob(pattern)} == before
    assert load_model(cfg.run_dir / "last")


class _CallsAGlobal:
    """Unpickled, it would call ``os.getpid`` (harmless here; ``os.system`` in an attack)."""

    def __reduce__(self):
        return (os.getpid, ())


def test_a_resume_checkpoint_with_a_blocked_pickle_is_one_line(tiny_config):
    cfg = tiny_config(*COMMON, "train.max_steps=1")
    train_main.run(cfg)
    (ckpt,) = resolve_resume(tiny_config(*COMMON, "resume=auto")).parent.iterdir()
    torch.save(_CallsAGlobal(), ckpt / "optimizer.bin")  # what a handed-over checkpoint may carry
    with pytest.raises(
        UserError,
        match=rf"^resume: {ckpt}/optimizer.bin: refused to unpickle it: it holds more than tensors and plain "
        r"data \(Trying to load unsupported GLOBAL posix.getpid",
    ):
        train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=2"))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_saving_leaves_no_torn_folder(trained, tiny_config, monkeypatch, stop):
    """A stop signal lands as an exception in whatever Python is doing; mid-save it used to leave
    the temporary folder behind (seen in tests/test_launch.py when SIGTERM landed mid-save)."""
    cfg = trained(2)
    before = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())

    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def save_then_stop(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)  # a complete folder, still under its .tmp name
        raise stop()

    monkeypatch.setattr(Accelerator, "save_state", save_then_stop)
    with pytest.raises(stop):
        train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4"))
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == before


def test_pruning_old_checkpoints_survives_leftovers_of_an_earlier_kill(tiny_config):
    cfg = tiny_config(*COMMON, "train.max_steps=2", "train.keep_checkpoints=1")
    train_main.run(cfg)
    ckpts = cfg.run_dir / "checkpoints"
    (only,) = ckpts.iterdir()
    leftover = ckpts / f".{only.name}.tmp"  # what a SIGKILL mid-delete leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4", "train.keep_checkpoints=1"))
    assert [p.name for p in ckpts.iterdir()] == ["e0000_b000004"]


def test_unwritable_out_dir_is_one_clear_error(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"out_dir: cannot write to .*file/demo"):
        train_main.run(tiny_config(f"out_dir={blocker}"))


def test_weights_blowing_up_stop_before_a_bad_checkpoint(tiny_config, monkeypatch):
    # two good optimizer steps (each checkpointed), then the third turns the weights into inf
    steps = {"n": 0}
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = tiny_config("train.checkpoint_every=1", "train.epochs=3")
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf|NaN/inf).*last good checkpoint is kept"):
        train_main.run(cfg)
    # the checkpoints left behind are the good steps', with finite weights: a resume starts from them
    ckpts = sorted((cfg.run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["e0000_b000001", "e0000_b000002"]
    for ckpt in ckpts:
        state = load_file(str(ckpt / "model.safetensors"))
        assert all(bool(v.isfinite().all()) for v in state.values()), ckpt.name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):

    calls = {"n": 0}
    real_forward = torch.nn.CrossEntropyLoss.forward

    def nan_on_fourth_batch(self, input, target):
        calls["n"] += 1
        loss = real_forward(self, input, target)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_on_fourth_batch)
    cfg = tiny_config("train.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 0, batch 3.*last good checkpoint is kept"):
        train_main.run(cfg)
    names = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert names == ["e0000_b000002", "e0000_b000003"]  # keep_checkpoints=2, the newest before the NaN
    monkeypatch.undo()
    resumed = train_main.run(tiny_config("resume=auto"))
    assert resumed["global_step"] == 8


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "model cut short": (lambda c: _cut(c / "model.safetensors"), "model.safetensors is damaged"),
    "EMA cut short": (lambda c: _cut(c / "ema.safetensors"), "ema.safetensors is damaged"),
    "optimizer cut short": (lambda c: _cut(c / "optimizer.bin"), "optimizer.bin is damaged"),
    "state a list": (lambda c: (c / "train_state.json").write_text("[1, 2]"), "train_state.json is a JSON list"),
    "epoch a string": (
        lambda c: (c / "train_state.json").write_text(
            (c / "train_state.json").read_text().replace('"epoch": 0', '"epoch": "0"', 1)
        ),
        "train_state.json: progress.epoch is '0'",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(trained, tiny_config, capsys, damage):
    # issue 35, 18: tracebacks, no fallback, and a hint that repeated the crash.
    cfg = trained(3)
    older, newest = sorted((cfg.run_dir / "checkpoints").iterdir())
    spoil, why = DAMAGE[damage]
    spoil(newest)
    with pytest.raises(UserError, match=rf"^resume: {newest} cannot be resumed from: {why}"):
        train_main.run(tiny_config(*COMMON, f"resume={newest}", "train.max_steps=5"))  # named: no fallback
    capsys.readouterr()
    result = train_main.run(tiny_config(*COMMON, "resume=auto", "train.max_steps=4"))
    out = capsys.readouterr().out
    assert f"note: resume: skipped {newest}: {why}" in out and f"resumed from {older} " in out
    assert result["global_step"] == 4


def test_every_checkpoint_damaged_is_one_line_without_a_resume_hint(trained, tiny_data, tmp_path):
    out = tmp_path / "runs"
    assert trained(2).run_dir == out / "demo"
    for ckpt in (out / "demo" / "checkpoints").iterdir():
        (ckpt / "train_state.json").write_text("[]")
    proc = run_module("launch", "train.main", *shrink([*COMMON, "resume=auto"], tiny_data, out), timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: resume: no intact checkpoint in {out / 'demo' / 'checkpoints'} (2 damaged")
    assert line.endswith("train under a new name=..., or start again with overwrite=true")


def test_a_mid_epoch_resume_under_another_per_process_batch_is_refused(trained, tiny_config):
    # issue 35, 2: 16 x 1 -> 8 x 2 keeps the global batch, and "batch 2" meant other images.
    trained(2)
    with pytest.raises(UserError, match=r"stopped after batch 2 of an epoch with train.batch_size=16 and "):
        train_main.run(
            tiny_config(*COMMON, "resume=auto", "train.batch_size=8", "train.grad_accum_steps=2", "train.max_steps=3")
        )
