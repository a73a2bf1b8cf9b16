"""``./run.sh submit``: predict every test image with the defended model and write the files.

``submissions/<name>.csv`` (``image_id,category_id``), the challenge's JSON twin and
``<name>.meta.json``. With several processes each predicts a shard and the main process
writes the same files a single process would. Nothing is written unless every image was
predicted (or explicitly replaced by ``submit.on_bad_image=fallback``), and the files are
checked with ``validate`` before the command reports success.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from core.checkpoint import resolve_checkpoint_files
from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config, config_to_dict
from core.datasets import TestImageDataset, create_eval_loader
from core.devices import (
    available_cores,
    create_accelerator,
    local_processes,
    precision_name,
    resolve_channels_last,
    resolve_num_workers,
)
from core.errors import UserError
from core.images import load_image, to_float_images
from core.io import check_writable
from core.labels import hidden_labels_path, list_test_images, read_hidden_labels, resolve_path, resolve_test_dir
from core.outputs import check_outputs, hold_output
from core.tracking import model_lineage, start_run, use_models
from gcm import DefendedModel
from infer.defended import build_defended_model, describe, input_size_of, load_members, resolve_member_paths
from infer.submission import submission_paths, write_submission
from infer.testset_folder import (
    breakdown,
    check_manifest_matches,
    check_not_surrogate,
    format_breakdown,
    hold_folders_for_reading,
    kinds_by_id,
    read_manifest,
)


def compile_members(model: DefendedModel) -> None:
    """``torch.compile`` each member network in place (``model.compile=true``).

    Only the networks: GCM and the random pad stay eager so the defense computes exactly its
    float32 formula (a fused kernel may evaluate ``sin(1e20 * x)`` differently).
    """
    members = model.model.members
    for i, member in enumerate(members):
        members[i] = torch.compile(member)


def create_model(
    cfg: Config, checkpoints: Sequence[str | Path], accelerator: Accelerator
) -> tuple[DefendedModel, list[dict]]:
    """The defended model of ``checkpoints`` on the accelerator's device, in the configured
    memory layout and (``model.compile``) compiled; returns it with the members' infos."""
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    model = build_defended_model(members, infos, cfg).to(accelerator.device)
    if resolve_channels_last(cfg.model.channels_last, accelerator.device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        compile_members(model)
    return model, infos


def resolve_loader_workers(cfg: Config, accelerator: Accelerator) -> int:
    """Loader worker processes for ``submit``.

    With a GPU, ``submit.num_workers`` decode ahead of the model. On CPU the model's torch
    threads do the work and a worker running beside them preempts them mid-layer: on 2 cores
    with 2 threads, decoding in the main process between forwards beat 1-3 workers (BENCHMARKS.md,
    the scaling rows). So ``submit.cpu_num_workers`` applies there, and
    its default (-1) gives the workers only the cores the threads leave free: 0 when
    ``launch`` gives the process every core (its CPU default), 1 with 2 cores and
    ``OMP_NUM_THREADS=1``.
    """
    if accelerator.device.type != "cpu":
        workers = cfg.submit.num_workers if cfg.submit.num_workers >= 0 else cfg.data.num_workers
        return resolve_num_workers(workers, True, local_processes(accelerator.num_processes))
    if cfg.submit.cpu_num_workers >= 0:
        return cfg.submit.cpu_num_workers
    return max(0, available_cores() // accelerator.num_processes - torch.get_num_threads())


def create_test_loader(cfg: Config, items: Sequence[tuple[Path, int]], image_size: int, accelerator: Accelerator):
    """The loader ``run`` predicts from, prepared for ``accelerator`` (sharded across processes)."""
    workers = resolve_loader_workers(cfg, accelerator)
    dataset = TestImageDataset(items, image_size, decode_threads=torch.get_num_threads() if workers == 0 else 1)
    return accelerator.prepare(create_eval_loader(dataset, cfg.submit.batch_size, workers))


def bad_image_reason(path: Path) -> str:
    try:
        load_image(path)
    except UserError as exc:
        return str(exc)
    return f"{path}: could not be read"


@torch.inference_mode()
def predict(
    model: DefendedModel, loader, accelerator: Accelerator, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Predicted class per image id, gathered from all processes; returns (ids, preds, bad_ids)."""
    ids, preds, bad = [], [], []
    bar = tqdm(loader, desc="predict", disable=not accelerator.is_local_main_process)
    for step, (images, image_ids, ok) in enumerate(bar):
        # accelerate deals whole batches round-robin: this is the batch's index in a 1-process run, so
        # seeding the random layer by it draws the same for a batch whichever process predicts it.
        model.reseed(seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
        with accelerator.autocast():
            logp = model(to_float_images(images))
        pred = logp.argmax(dim=1)
        image_ids, pred, ok = accelerator.gather_for_metrics((image_ids, pred, ok))
        ids += image_ids.tolist()
        preds += pred.tolist()
        bad += image_ids[~ok.bool()].tolist()
    return ids, preds, bad


def test_inputs(cfg: Config) -> list[Path | None]:
    """What ``submit`` reads of the test set: the folder, the hidden labels, the manifest."""
    manifest = resolve_path(cfg.data.root, cfg.data.test_manifest) if cfg.data.test_manifest else None
    return [resolve_test_dir(cfg.data), hidden_labels_path(cfg.data), manifest]


@dataclass
class TestSet:
    """The test images as ``submit`` reads them once: folder, ``(path, id)`` items, hidden labels
    (None without), the make-testset manifest (None without)."""

    __test__ = False  # not a pytest test class despite the name

    folder: Path
    items: list[tuple[Path, int]]
    labels: dict[int, int] | None
    manifest: dict | None


def read_test_set(cfg: Config, infos: Sequence[dict]) -> TestSet:
    """List the test folder once and read what goes with it (labels, manifest checked against both)."""
    folder = resolve_test_dir(cfg.data)
    items = list_test_images(folder)
    return TestSet(folder, items, read_hidden_labels(cfg.data), read_test_manifest(cfg, infos, items))


def read_test_manifest(cfg: Config, infos: Sequence[dict], items: Sequence[tuple[Path, int]]) -> dict | None:
    """The ``data.test_manifest`` of a make-testset folder (None when unset), checked against the
    test folder's images ``items`` and their hidden labels, and against the model: none of its
    members may be a surrogate the transfer images were crafted on."""
    if not cfg.data.test_manifest:
        return None
    if not cfg.data.test_labels:
        raise UserError("config key 'data.test_manifest' needs data.test_labels (the score by kind needs the labels)")
    path = resolve_path(cfg.data.root, cfg.data.test_manifest)
    manifest = read_manifest(path)
    check_manifest_matches(
        manifest, path, [i for _, i in items], resolve_test_dir(cfg.data), read_hidden_labels(cfg.data)
    )
    check_not_surrogate(manifest, [info.get("sha256") for info in infos], "data.test_manifest")
    return manifest


def score_predictions(ids: Sequence[int], preds: Sequence[int], test: TestSet) -> dict:
    """The local score when hidden labels exist: accuracy, and by kind of image for a make-testset set."""
    if test.labels is None:
        return {}
    hits = [(test.labels[i] == p) for i, p in zip(ids, preds) if i in test.labels]
    result = {"test_acc": 100.0 * sum(hits) / len(hits) if hits else float("nan"), "test_labelled": len(hits)}
    if test.manifest is not None:
        correct = {i: float(test.labels[i] == p) for i, p in zip(ids, preds) if i in test.labels}
        result["by_kind"] = breakdown(correct, kinds_by_id(test.manifest))
    return result


def run(cfg: Config) -> dict:
    """Write the submission files for ``cfg``; returns counts, paths and (if labelled) accuracy."""
    start = time.perf_counter()
    accelerator = create_accelerator(cfg.train.mixed_precision)
    # Before the prediction, not after it; on every process, so none waits for a failed one.
    check_writable(Path(cfg.submit.out_dir), "submit.out_dir")
    stem = cfg.submit.stem(cfg.name)
    check_outputs(list(submission_paths(stem).values()), "submit", "submit.file_name")
    # make-testset must not replace the test set while it is read (the manifest of one set and the images of the next)
    with (
        hold_output(stem, "submit", "submit.file_name", accelerator),
        hold_folders_for_reading(test_inputs(cfg), "data.test_dir"),
    ):
        return predict_and_write(cfg, accelerator, start)


def check_replaces_its_own(cfg: Config, infos: Sequence[dict], test_dir: Path) -> None:
    """A submission already under this name is replaced only by the same model's predictions on
    the same test folder (a rerun), or with ``overwrite=true``: the Phase I file of a real model is
    not lost to a demo run or to a make-testset score."""
    meta_path = submission_paths(cfg.submit.stem(cfg.name))["meta"]
    if cfg.overwrite or not meta_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        old_models = [c.get("sha256") for c in old["checkpoints"]]
        old_test = Path(old["test_dir"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        old_models, old_test = None, None
    same_test = old_test is not None and old_test.resolve() == test_dir.resolve()
    if same_test and old_models == [i.get("sha256") for i in infos]:
        return
    what = (
        "an unreadable meta file"
        if old_models is None
        else "another model"
        if same_test
        else f"another test folder ({old_test})"
    )
    raise UserError(
        f"{cfg.submit.stem(cfg.name)}.csv: holds the predictions of {what}; overwrite=true replaces them, or "
        f"submit.file_name=NAME writes beside them"
    )


def predict_and_write(cfg: Config, accelerator: Accelerator, start: float) -> dict:
    """The body of :func:`run`, under the lock of the submission's name: predict on every process,
    then the main process, which holds every prediction, scores and writes them."""
    checkpoints = resolve_member_paths(cfg)
    model, infos = create_model(cfg, checkpoints, accelerator)
    test = read_test_set(cfg, infos)
    check_replaces_its_own(cfg, infos, test.folder)
    loader = create_test_loader(cfg, test.items, input_size_of(infos), accelerator)
    announce(cfg, model, test, loader, accelerator)
    ids, preds, bad = predict(model, loader, accelerator, cfg.random_pad.seed)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {"n_images": len(ids)}
    preds, bad_files = apply_fallback(cfg, test.items, ids, preds, bad, accelerator)
    result = {"n_images": len(ids), **score_predictions(ids, preds, test)}
    lineages = [model_lineage(resolve_checkpoint_files(c)[0].with_suffix(""), i) for c, i in zip(checkpoints, infos)]
    meta = build_meta(cfg, model, list(zip(checkpoints, infos, lineages)), test.folder, bad_files, result, accelerator)
    meta["seconds"] = round(time.perf_counter() - start, 2)  # all but the writing itself
    paths = write_submission(
        Path(cfg.submit.out_dir), cfg.submit.name_of(cfg.name), ids, preds, meta, test.folder, cfg.data.num_classes,
        [i for _, i in test.items],
    )  # fmt: skip
    result.update({"files": {k: str(v) for k, v in paths.items()}, "seconds": time.perf_counter() - start})
    report_written(paths, result, accelerator)
    log_submission(cfg, paths, meta, lineages)
    return result


def announce(cfg: Config, model: DefendedModel, test: TestSet, loader, accelerator: Accelerator) -> None:
    accelerator.print(
        f"submit: {len(test.items)} images from {test.folder}, {describe(model)['members']} member(s), "
        f"{len(model.model.views)} TTA view(s), GCM {'on' if cfg.gcm.enabled else 'off'}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type} in "
        f"{precision_name(accelerator.mixed_precision)} with {torch.get_num_threads()} torch thread(s) and "
        f"{loader.num_workers} loader worker(s) each"
    )


def report_written(paths: dict[str, Path], result: dict, accelerator: Accelerator) -> None:
    acc = (
        f", accuracy on {result['test_labelled']} labelled test images: {result['test_acc']:.2f}%"
        if "test_acc" in result
        else ""
    )
    accelerator.print(
        f"wrote {paths['csv']}, {paths['json']} and {paths['meta']} ({result['n_images']} predictions, validated){acc}"
    )
    if "by_kind" in result:
        accelerator.print(f"local Phase I score by kind: {format_breakdown(result['by_kind'])}")


def apply_fallback(
    cfg: Config, items: list, ids: list, preds: list, bad: Sequence, accelerator: Accelerator
) -> tuple[list, list[str]]:
    """Predictions with unreadable images set to ``submit.fallback_class``, and those images' paths.

    Raises:
        UserError: an unreadable image with ``submit.on_bad_image=error``.
    """
    path_of = {image_id: path for path, image_id in items}
    bad_files = [str(path_of[i]) for i in sorted(bad)]
    if bad_files and cfg.submit.on_bad_image == "error":
        raise UserError(
            f"{bad_image_reason(Path(bad_files[0]))} ({len(bad_files)} unreadable test image(s); "
            f"set submit.on_bad_image=fallback to predict class {cfg.submit.fallback_class} for them)"
        )
    if bad_files:
        bad_set = set(bad)
        preds = [cfg.submit.fallback_class if i in bad_set else p for i, p in zip(ids, preds)]
        accelerator.print(
            f"warning: {len(bad_files)} unreadable image(s) predicted as class "
            f"{cfg.submit.fallback_class} (listed in the meta file)"
        )
    return preds, bad_files


def build_meta(
    cfg: Config,
    model: DefendedModel,
    sources: list[tuple[str, dict, dict]],
    test_dir: Path,
    bad_files: list[str],
    result: dict,
    accelerator: Accelerator,
) -> dict:
    """The meta file: what made these predictions. ``sources`` holds (checkpoint, its info, its
    W&B lineage) per member; the caller adds ``seconds``."""
    import timm  # for its version; loaded by core.model, which keeps wandb out of it

    return {
        "name": cfg.submit.name_of(cfg.name),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "test_dir": str(test_dir),
        "n_images": result["n_images"],
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "precision": precision_name(accelerator.mixed_precision),
        "checkpoints": [
            {
                "path": str(resolve_checkpoint_files(c)[0]),
                "sha256": info.get("sha256"),
                "arch": info["arch"],
                "image_size": info["image_size"],
                "val_acc": info.get("val_acc"),
                "wandb_artifact": lineage["artifact"],
            }
            for c, info, lineage in sources
        ],
        "defense": describe(model),
        "bad_images": bad_files,
        "fallback_class": cfg.submit.fallback_class if bad_files else None,
        **({k: result[k] for k in ("test_acc", "test_labelled")} if "test_acc" in result else {}),
        **({"by_kind": result["by_kind"]} if "by_kind" in result else {}),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "config": config_to_dict(cfg),
    }


def log_submission(cfg: Config, paths: dict[str, Path], meta: dict, lineages: list[dict]) -> None:
    """The submit run in W&B: the models it used as inputs, the files as a ``submission`` artifact,
    the local test accuracy (when hidden labels exist) in the summary."""
    run = start_run(
        cfg,
        "submit",
        {
            "submit": config_to_dict(cfg.submit),
            "tta": config_to_dict(cfg.tta),
            "gcm": config_to_dict(cfg.gcm),
            "random_pad": config_to_dict(cfg.random_pad),
        },
    )
    if run is None:
        return
    import wandb

    try:
        use_models(run, lineages)
        figures = {k: meta[k] for k in ("n_images", "test_acc", "test_labelled") if k in meta}
        figures.update({f"test_acc_{kind}": v["acc"] for kind, v in meta.get("by_kind", {}).items()})
        artifact = wandb.Artifact(
            f"submission-{meta['name']}",
            type="submission",
            metadata={**figures, "models_sha256": [m["sha256"] for m in lineages]},
        )
        for path in paths.values():
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact, aliases=["latest"])
        run.summary.update(figures)
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh submit", "GCM + ensemble + TTA -> submission files.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
