"""Issue 38's training recipes on the real code path: two stages (``train.init_from``) and weight
averaging (``./run.sh average``), on tiny generated data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import load_model
from core.errors import UserError
from train import average
from train import main as train_main
from train.state import checkpoint_dirs


def _weights(stem) -> dict[str, torch.Tensor]:
    return load_file(f"{stem}.safetensors")


def test_init_from_starts_from_the_other_runs_weights_with_a_fresh_schedule(tiny_config, capsys):
    first = tiny_config("name=stage1", "train.max_steps=2")
    train_main.run(first)
    start = _weights(first.run_dir / "best")
    # lr 1e-12: the second stage cannot move far from where it starts, so its weights show where that was
    second = tiny_config(
        "name=stage2", "train.max_steps=1", f"train.init_from={first.run_dir}/best", "train.lr=1e-12", "train.ema=false"
    )
    result = train_main.run(second)
    assert result["global_step"] == 1  # a fresh schedule: the first run's 2 steps are not counted
    assert "init_from:" in capsys.readouterr().out
    after = _weights(second.run_dir / "last")
    backbone = [k for k in start if k.startswith("backbone.")]
    assert max(float((after[k] - start[k]).abs().max()) for k in backbone) < 1e-6
    # without init_from the same run starts elsewhere (timm's initialisation)
    fresh = tiny_config("name=fresh", "train.max_steps=1", "train.lr=1e-12", "train.ema=false")
    train_main.run(fresh)
    other = _weights(fresh.run_dir / "last")
    assert max(float((other[k] - start[k]).abs().max()) for k in backbone) > 1e-3


def test_resume_wins_over_init_from(tiny_config):
    first = tiny_config("name=src", "train.max_steps=1")
    train_main.run(first)
    # the second stage stops after one step, then resumes with init_from still set
    cfg = tiny_config("name=ft", "train.max_steps=1", f"train.init_from={first.run_dir}/best")
    train_main.run(cfg)
    before = _weights(cfg.run_dir / "last")
    resumed = tiny_config("name=ft", "train.max_steps=2", "resume=auto", f"train.init_from={first.run_dir}/best")
    result = train_main.run(resumed)
    assert result["global_step"] == 2
    # the resumed run stands at step 2 of its own run; the init weights were not loaded over it
    ckpt = checkpoint_dirs(cfg.run_dir)[-1]
    assert json.loads((ckpt / "train_state.json").read_text())["progress"]["global_step"] == 2
    assert not torch.equal(_weights(cfg.run_dir / "last")["backbone.head.fc.weight"], before["backbone.head.fc.weight"])


@pytest.mark.parametrize(
    "override, key",
    [("model.name=convnext_atto", "model.name"), ("model.stem=overlap", "model.stem")],
)
def test_init_from_another_network_is_one_line_naming_the_key(tiny_config, override, key):
    first = tiny_config("name=src", "train.max_steps=1")
    train_main.run(first)
    cfg = tiny_config("name=bad", "train.max_steps=1", f"train.init_from={first.run_dir}/best", override)
    with pytest.raises(UserError) as err:
        train_main.run(cfg)
    text = str(err.value)
    assert "\n" not in text and key in text and "best.json" in text
    assert not cfg.run_dir.exists()  # nothing left behind by the refused run


def test_init_from_a_missing_model_is_one_line(tiny_config, tmp_path):
    cfg = tiny_config("name=bad", f"train.init_from={tmp_path}/nope/best")
    with pytest.raises(UserError, match=r"train.init_from=.*nope/best: no exported model"):
        train_main.run(cfg)


def test_a_second_stage_at_a_higher_resolution_is_an_ordinary_checkpoint(tiny_config, capsys):
    """A coarse resolution schedule: stage 1 at 32 px, stage 2 at 64 px from its weights."""
    first = tiny_config("name=src", "train.max_steps=1")
    train_main.run(first)
    cfg = tiny_config("name=ft", "train.max_steps=1", f"train.init_from={first.run_dir}/best", "data.image_size=64")
    train_main.run(cfg)
    assert "trained at 32 px" in capsys.readouterr().out
    model, info = load_model(cfg.run_dir / "best")
    assert info["config"]["train"]["init_from"] == f"{first.run_dir}/best" and info["image_size"] == 64
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4)


# --- ./run.sh average ------------------------------------------------------------------------


@pytest.fixture
def two_runs(tiny_config):
    """Two runs from a shared start (train.init_from), each 2 steps on its own seed."""
    start = tiny_config("name=start", "train.max_steps=2")
    train_main.run(start)
    runs = []
    for seed in (1, 2):
        cfg = tiny_config(
            f"name=run{seed}", "train.max_steps=2", f"seed={seed}", f"train.init_from={start.run_dir}/best"
        )
        train_main.run(cfg)
        runs.append(cfg.run_dir)
    return runs


def test_a_uniform_soup_is_the_mean_of_the_runs_and_an_ordinary_checkpoint(tiny_config, two_runs):
    cfg = tiny_config("name=soup", "train.average.mode=uniform", f"train.average.runs=[{two_runs[0]},{two_runs[1]}]")
    result = average.run(cfg)
    a, b, soup = (_weights(p) for p in (two_runs[0] / "best", two_runs[1] / "best", cfg.run_dir / "best"))
    assert all(torch.allclose(soup[k], (a[k] + b[k]) / 2) for k in a)
    model, info = load_model(cfg.run_dir / "best")  # what submit, evaluate and export load
    assert info["averaged"]["kept"] == result["kept"] and len(result["kept"]) == 2
    assert info["val_acc"] == pytest.approx(result["result"]["acc"])
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_a_greedy_soup_adds_a_run_only_if_validation_improves(tiny_config, two_runs):
    copy = two_runs[0].parent / "copy"
    copy.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(two_runs[0] / f"best{suffix}", copy / f"best{suffix}")
    # the copy averages to the same weights: the same score, not an improvement, so it is left out
    cfg = tiny_config("name=greedy", f"train.average.runs=[{two_runs[0]},{copy}]")
    result = average.run(cfg)
    assert len(result["kept"]) == 1
    assert set(result["scores"]) == {str(two_runs[0] / "best"), str(copy / "best")}
    assert result["result"]["score"] == pytest.approx(max(s["score"] for s in result["scores"].values()))


def test_the_last_k_checkpoints_average_to_their_mean(tiny_config):
    src = tiny_config("name=long", "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    train_main.run(src)
    folders = checkpoint_dirs(src.run_dir)[-2:]
    cfg = tiny_config("name=swa", "train.average.mode=last", f"train.average.runs=[{src.run_dir}]")
    average.run(cfg)
    x, y = (load_file(str(f / "model.safetensors")) for f in folders)
    out = _weights(cfg.run_dir / "best")
    assert all(torch.allclose(out[k], (x[k] + y[k]) / 2) for k in out)
    ema = tiny_config(
        "name=swa_ema", "train.average.mode=last", "train.average.weights=ema", f"train.average.runs=[{src.run_dir}]"
    )
    average.run(ema)
    x, y = (load_file(str(f / "ema.safetensors")) for f in folders)
    out = _weights(ema.run_dir / "best")
    assert all(torch.allclose(out[k], (x[k] + y[k]) / 2) for k in out)


def test_averaging_refuses_bad_input_in_one_line(tiny_config, tmp_path):
    a = tiny_config("name=a", "train.max_steps=1")
    train_main.run(a)
    other = tiny_config("name=o", "train.max_steps=1", "model.stem=overlap")
    train_main.run(other)
    cases = [
        (f"train.average.runs=[{a.run_dir},{tmp_path}/missing]", "missing: no exported model"),
        (f"train.average.runs=[{a.run_dir},{other.run_dir}]", "stem=overlap"),
        (f"train.average.runs=[{a.run_dir}]", "needs two runs or more"),
        (f"train.average.mode=last train.average.runs=[{a.run_dir}] train.average.last=3", "holds 1 checkpoint"),
    ]
    for override, message in cases:
        cfg = tiny_config("name=out", *override.split())
        with pytest.raises(UserError) as err:
            average.run(cfg)
        assert message in str(err.value) and "\n" not in str(err.value), override
        assert not (cfg.run_dir / "best.safetensors").exists()
    # an existing model under the name is never replaced without overwrite=true
    cfg = tiny_config("name=a", "train.average.mode=uniform", f"train.average.runs=[{a.run_dir},{a.run_dir}]")
    with pytest.raises(UserError, match="overwrite=true"):
        average.run(cfg)


# --- output temperature ----------------------------------------------------------------------


class _Constant(torch.nn.Module):
    """A member that predicts the same logits for every image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_temperature_changes_an_ensembles_prediction_never_one_models(tiny_config):
    from infer.temperature import tune_temperature

    cfg = tiny_config("submit.aggregate=prob")
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 1, 1, 1])
    infos = [{"image_size": 32}] * 3
    # one sure member for class 0 against two unsure ones for class 1: at T=1 the sure vote wins the
    # mean probability (0.51 for class 0), sharpened (T=0.01) every vote counts one (0.33 for class 0)
    members = [_Constant([10.0, 0.0]), _Constant([0.0, 1.0]), _Constant([0.0, 1.0])]
    tuned = tune_temperature(members, infos, cfg, [1.0, 0.01], x, y)
    acc = {r["temperature"]: r["acc"] for r in tuned["table"]}
    assert acc == {1.0: 0.0, 0.01: 100.0} and tuned["temperature"] == 0.01
    # one member: the same prediction at every temperature; the tie goes to the lower cross-entropy
    one = tune_temperature(members[1:2], infos[:1], cfg, [0.01, 1.0, 4.0], x, y)
    assert len({r["acc"] for r in one["table"]}) == 1
    assert one["temperature"] == 0.01  # always right here, so the sharpest is the most confident
    wrong = tune_temperature(members[1:2], infos[:1], cfg, [0.01, 1.0, 4.0], x, torch.zeros(4, dtype=torch.long))
    assert wrong["temperature"] == 4.0  # always wrong: the softest costs the least
