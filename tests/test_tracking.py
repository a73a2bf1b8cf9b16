"""W&B as a team uses it, offline: one group per run name, model and submission artifacts with
lineage, nothing at all when disabled, and a sweep file that fits our config.

What wandb wrote is read back from its own record files (``run-*.wandb``: its protobuf records
in a LevelDB-style log), with wandb's own ``Record`` message. wandb is imported only by the tests
that run it: where it is absent (the lent GPU machine's image) they skip and the rest still run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from core.config import load_config
from infer import submit
from robust import evaluate
from tests.conftest import ROOT
from train import main as train_main

if TYPE_CHECKING:
    from wandb.proto import wandb_internal_pb2 as pb

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")

BLOCK = 32768  # the record log's block size


def read_records(path: Path) -> list[pb.Record]:
    """Every record of a ``run-*.wandb`` file (header ":W&B", then length-prefixed chunks per block)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        chunk = payload if kind in (1, 2) else chunk + payload  # full / first, or middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def offline_runs(run_dir: Path) -> dict[str, list[pb.Record]]:
    """job_type -> the records of that offline run under ``run_dir/wandb``."""
    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        records = read_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
        runs[run.job_type] = records
    return runs


def of_type(records: list[pb.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def config_of(records: list[pb.Record]) -> dict:
    items = [item for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update]
    items += [item for c in of_type(records, "config") for item in c.update]
    return {item.key: json.loads(item.value_json) for item in items}


def summary_of(records: list[pb.Record]) -> dict:
    out = {}
    for summary in of_type(records, "summary"):
        for item in summary.update:
            out["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline without a key, its artifact staging in the test's folder, not in $HOME."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


EVAL_FAST = [
    "eval.attacks=[fgsm,pgd_linf]",
    "eval.subset=8",
    "eval.batch_size=8",
    "eval.steps=2",
    "eval.eps_curve=[]",
    "eval.corruption_severities=[]",
]


@needs_wandb
def test_train_submit_evaluate_share_a_group_and_the_model_artifact(tiny_config, offline):
    cfg = tiny_config(
        "wandb.mode=offline",
        "wandb.upload_weights=true",
        "train.max_steps=2",
        "data.test_labels=test_labels.txt",
        *EVAL_FAST,
    )
    train_main.run(cfg)
    submit.run(cfg)
    evaluate.run(cfg, progress=False)

    runs = offline_runs(cfg.run_dir)
    assert sorted(runs) == ["evaluate", "submit", "train"]
    for job, records in runs.items():
        (run,) = of_type(records, "run")
        assert run.run_group == cfg.name and run.display_name in (cfg.name, f"{cfg.name}-{job}")

    best = json.loads((cfg.run_dir / "best.json").read_text())
    (model,) = of_type(runs["train"], "artifact")
    assert (model.type, model.name) == ("model", f"model-{cfg.name}") and sorted(model.aliases) == ["best", "latest"]
    assert sorted(entry.path for entry in model.manifest.contents) == ["best.json", "best.safetensors"]
    metadata = json.loads(model.metadata)
    assert metadata["sha256"] == best["sha256"] and metadata["val_acc"] == pytest.approx(best["val_acc"])
    assert summary_of(runs["train"])["best/val_acc"] == pytest.approx(best["val_acc"])

    # Lineage offline: the input model named by artifact and weights' hash (use_artifact needs a server).
    for job in ("submit", "evaluate"):
        (used,) = config_of(runs[job])["input_models"]
        assert used["artifact"] == f"model-{cfg.name}" and used["sha256"] == best["sha256"], job
    meta = json.loads((Path(cfg.submit.out_dir) / "demo.meta.json").read_text())
    assert meta["checkpoints"][0]["wandb_artifact"] == f"model-{cfg.name}"

    (submission,) = of_type(runs["submit"], "artifact")
    assert submission.type == "submission" and submission.name == "submission-demo"
    assert sorted(e.path for e in submission.manifest.contents) == ["demo.csv", "demo.json", "demo.meta.json"]
    assert summary_of(runs["submit"])["test_acc"] == pytest.approx(meta["test_acc"])
    assert "verdict" in summary_of(runs["evaluate"])


@needs_wandb
def test_large_weights_enter_the_artifact_as_a_reference(tiny_config, offline):
    cfg = tiny_config("wandb.mode=offline", "wandb.upload_weights=false", "train.max_steps=1")
    result = train_main.run(cfg)
    (model,) = of_type(offline_runs(cfg.run_dir)["train"], "artifact")
    # the run's wait for data (issue 33) is in its summary, as in its metrics
    summary = summary_of(offline_runs(cfg.run_dir)["train"])
    assert summary["train/data_wait_frac"] == pytest.approx(result["data_wait_frac"])
    entries = {e.path: e for e in model.manifest.contents}
    assert entries["best.safetensors"].ref == (cfg.run_dir / "best.safetensors").resolve().as_uri()
    assert not entries["best.json"].ref  # the small JSON is uploaded


def test_disabled_writes_nothing(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    cfg = tiny_config("wandb.mode=disabled", "train.max_steps=1", *EVAL_FAST)
    train_main.run(cfg)
    submit.run(cfg)
    evaluate.run(cfg, progress=False)
    assert not [p for p in tmp_path.rglob("*wandb*") if p.name != "wandb_data"]
    assert not (tmp_path / "wandb_data").exists()
    assert not (cfg.run_dir / "best.wandb.json").exists()


def test_run_names_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "ab12cd34")
    assert load_config(None, ["name=sweep-$WANDB_RUN_ID"]).name == "sweep-ab12cd34"
    monkeypatch.delenv("WANDB_RUN_ID")
    with pytest.raises(Exception, match="uses an environment variable that is not set"):
        load_config(None, ["name=sweep-$WANDB_RUN_ID"])


def test_the_sweep_file_sweeps_real_keys_with_values_that_cast():
    sweep = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    command = sweep["command"]
    assert command[:3] == ["${env}", "./run.sh", "train"] and command[-1] == "${args_no_hyphens}"
    fixed = [a for a in command[3:-1] if "=" in a] + ["name=sweep-x"]
    config = command[command.index("--config") + 1]
    assert sweep["metric"]["name"] in ("best/val_acc", "best/val_robust_acc")
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec["min"], spec["max"]]
        for value in values:  # each value, through our own loader: unknown keys and bad types fail here
            cfg = load_config(ROOT / config, [*fixed, f"{key}={value}"])
            section, _, name = key.rpartition(".")
            node = cfg
            for part in section.split("."):
                node = getattr(node, part)
            assert getattr(node, name) == pytest.approx(value), key


def test_a_resumed_run_continues_its_wandb_run_and_stages_artifacts_in_the_run_folder(
    tiny_config, offline, monkeypatch, tmp_path, capsys
):
    # wandb staged artifact files in ~/.local/share/wandb (outside runs/, lost when runs/ is copied),
    # each resume=auto started a new W&B run, and the printed `wandb sync ...` was not on the PATH.
    monkeypatch.delenv("WANDB_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no key
    common = ("wandb.mode=offline", "wandb.upload_weights=true", "train.checkpoint_every=1")
    cfg = tiny_config(*common, "train.max_steps=2")
    train_main.run(cfg)
    first = capsys.readouterr().out
    assert (
        f"W&B: offline - wandb.mode=offline (sync later: ./run.sh wandb-sync {cfg.run_dir}; once, before it: "
        ".venv/bin/wandb login)" in first.splitlines()
    )
    train_main.run(tiny_config(*common, "train.max_steps=3", "resume=auto"))
    run_id = (cfg.run_dir / "wandb" / "train-run-id").read_text().strip()
    assert f"; continues W&B run {run_id}" in capsys.readouterr().out

    parts = sorted(cfg.run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(parts) == 2 and {of_type(read_records(p), "run")[0].run_id for p in parts} == {run_id}
    for part in parts:
        for artifact in of_type(read_records(part), "artifact"):
            for entry in artifact.manifest.contents:
                staged = Path(entry.local_path)
                assert staged.is_file() and staged.is_relative_to(cfg.run_dir.resolve()), staged
    assert not (tmp_path / "home" / ".local").exists()

    # the sync command as printed: without a key it says what to type first, in one line
    proc = subprocess.run(
        ["./run.sh", "wandb-sync", str(cfg.run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, HOME=str(tmp_path / "home"), WANDB_API_KEY=""),
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: wandb-sync: no W&B API key (WANDB_API_KEY or ~/.netrc): run .venv/bin/wandb login once, then this again"
    ], proc.stderr
    assert (ROOT / ".venv" / "bin" / "wandb").is_file()
