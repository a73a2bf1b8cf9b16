"""``./run.sh average``: one exported model from the weights of several (``train.average``).

* ``mode=last``: the last ``train.average.last`` full-state checkpoints of one run
  (``runs/X/checkpoints/e*``), their raw weights or their EMA (``train.average.weights``):
  SWA-style averaging along one trajectory (Izmailov et al. 2018; timm's ``avg_checkpoints.py``).
* ``mode=uniform`` / ``greedy``: the ``best`` models of several runs from a shared start (model
  soups, Wortsman et al. 2022): the plain mean, or greedy: runs sorted by validation score, each
  added only if the soup's validation score improves.

The validation score is the one ``train`` picks ``best`` by (:func:`train.state.selection_of`): the
PGD accuracy on the fixed robust-validation subset under adversarial training, else the clean
accuracy, both measured by ``train.engine``'s own functions on this config's validation split. A
network with BatchNorm gets its statistics recomputed on the training images (the averaged weights'
running means are not the averaged network's); ConvNeXt has LayerNorm only, so nothing is recomputed.

The result is ``runs/<name>/best`` (``.safetensors`` + ``.json``, each written atomically), which
``submit``, ``evaluate`` and ``export`` take as they take a trained run's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.checkpoint import export_model, read_checkpoint, read_checkpoint_info, resolve_checkpoint_files
from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.errors import UserError
from core.model import ImageClassifier, create_backbone
from core.outputs import hold_output
from train.engine import evaluate, evaluate_robust
from train.setup import WorkerSplit, create_accelerator, create_loaders
from train.state import EMA_WEIGHTS, checkpoint_dirs, selection_of

NETWORK_KEYS = ("arch", "num_classes", "stem")
MODEL_FILE = "model.safetensors"  # accelerate's save_state name for the (one) prepared model


# --- sources -------------------------------------------------------------------------------


def read_run_best(path: str) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(label, info, state)`` of one exported model named by ``train.average.runs``."""
    try:
        weights, info_path = resolve_checkpoint_files(path)
    except UserError:
        raise UserError(f"train.average.runs: {path}: no exported model (expected runs/NAME, runs/NAME/best)") from None
    info, state = read_checkpoint(weights, info_path)
    return str(weights.with_suffix("")), info, state


def read_last_checkpoints(run: str, k: int, which: str) -> tuple[dict, list[tuple[str, dict[str, torch.Tensor]]]]:
    """The run's exported ``last`` info and the ``which`` weights of its last ``k`` full-state checkpoints."""
    run_dir = Path(run)
    found = checkpoint_dirs(run_dir)
    if len(found) < k:
        raise UserError(
            f"train.average.last={k}: {run_dir / 'checkpoints'} holds {len(found)} checkpoint(s); train with "
            f"train.keep_checkpoints>={k} (train.checkpoint_every: several per epoch), or lower train.average.last"
        )
    _, info_path = resolve_checkpoint_files(run_dir / "last")
    info = read_checkpoint_info(info_path)
    name = MODEL_FILE if which == "model" else EMA_WEIGHTS
    states = []
    for folder in found[-k:]:
        try:
            states.append((str(folder), load_file(str(folder / name))))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"train.average: cannot read {folder / name} ({str(exc).splitlines()[0][:160]})") from None
    return info, states


def check_same_network(infos: Sequence[tuple[str, dict]]) -> None:
    """Every source must be the same network (arch, classes, stem) and input size."""
    (first_label, first), *rest = infos
    for label, info in rest:
        for key in (*NETWORK_KEYS, "image_size"):
            a, b = first.get(key, "patch" if key == "stem" else None), info.get(key, "patch" if key == "stem" else None)
            if a != b:
                raise UserError(f"train.average: {label} has {key}={b}, {first_label} has {key}={a}: not one network")


def check_same_tensors(states: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> None:
    (first_label, first), *rest = states
    for label, state in rest:
        if state.keys() != first.keys():
            extra = sorted(set(state) ^ set(first))[0]
            raise UserError(f"train.average: {label} and {first_label} differ in tensor {extra!r}: not one network")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise UserError(
                    f"train.average: tensor {key!r} is {tuple(tensor.shape)} in {label}, "
                    f"{tuple(first[key].shape)} in {first_label}"
                )


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean (float32) of state dicts with the same tensors; integer buffers from the first."""
    out = {}
    for key, tensor in states[0].items():
        if tensor.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0)
        else:
            out[key] = tensor.clone()  # e.g. BatchNorm's num_batches_tracked
    return out


# --- validation ----------------------------------------------------------------------------


class Validator:
    """The validation score ``train`` selects ``best`` by, for any weights of one network."""

    def __init__(self, cfg: Config, info: dict) -> None:
        self.cfg = cfg
        self.accelerator = create_accelerator(cfg)
        loaders = create_loaders(cfg, WorkerSplit(0, 0))
        if loaders.val is None:
            raise UserError("train.average: this config has no validation split (data.val_fraction=0, no val labels)")
        self.val = self.accelerator.prepare(loaders.val)
        self.robust = self.accelerator.prepare(loaders.robust) if loaders.robust is not None else None
        self.model = build_network(info).to(self.accelerator.device)

    def score(self, state: dict[str, torch.Tensor]) -> dict:
        self.model.load_state_dict(state, strict=True)
        metrics = evaluate(self.model, self.val, self.accelerator)
        if self.robust is not None:
            adv = self.cfg.train.adv
            metrics["robust_acc"] = evaluate_robust(
                self.model, self.robust, self.accelerator, adv.eps, adv.val_steps, self.cfg.seed
            )
        metrics["selected_by"] = selection_of(self.cfg, metrics)
        metrics["score"] = metrics["robust_acc" if metrics["selected_by"] == "robust" else "acc"]
        return metrics


def build_network(info: dict) -> ImageClassifier:
    backbone = create_backbone(str(info["arch"]), int(info["num_classes"]), stem=str(info.get("stem", "patch")))
    return ImageClassifier(backbone, info.get("mean"), info.get("std"))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_batchnorm(model: nn.Module, cfg: Config) -> None:
    """BatchNorm statistics of the averaged weights from one pass over the training images
    (``torch.optim.swa_utils.update_bn``, as SWA does)."""
    from core.images import to_float_images

    loader = create_loaders(cfg, WorkerSplit(0, 0)).train
    batches = ((to_float_images(x), y) for x, y in loader)
    torch.optim.swa_utils.update_bn(batches, model)


# --- soups ---------------------------------------------------------------------------------


def greedy_soup(
    sources: list[tuple[str, dict[str, torch.Tensor]]], validator: Validator, log
) -> tuple[list[str], dict[str, dict], dict]:
    """Wortsman et al.'s greedy soup: sources by validation score, best first; each is kept only if
    the soup with it scores higher on validation. Returns the kept labels, every source's and the soup's scores."""
    scores = {label: validator.score(state) for label, state in sources}
    for label in scores:
        log(f"  {label}: validation {describe(scores[label])}")
    ranked = sorted(sources, key=lambda s: -scores[s[0]]["score"])
    kept, soup_score = [ranked[0]], scores[ranked[0][0]]
    for label, state in ranked[1:]:
        trial = validator.score(average_states([s for _, s in kept] + [state]))
        added = trial["score"] > soup_score["score"]
        log(f"  + {label}: soup {describe(trial)} -> {'kept' if added else 'left out'}")
        if added:
            kept.append((label, state))
            soup_score = trial
    return [label for label, _ in kept], scores, soup_score


def describe(metrics: dict) -> str:
    robust = f", PGD {metrics['robust_acc']:.2f}%" if "robust_acc" in metrics else ""
    return f"clean {metrics['acc']:.2f}%{robust} (score: {metrics['selected_by']})"


# --- the command ---------------------------------------------------------------------------


def resolve_sources(cfg: Config) -> tuple[dict, list[tuple[str, dict[str, torch.Tensor]]]]:
    """The network's info and the ``(label, state)`` of every source the mode names."""
    a = cfg.train.average
    if a.mode == "last":
        if len(a.runs) != 1:
            raise UserError(f"train.average.mode=last: train.average.runs must name one run ({len(a.runs)} named)")
        if Path(a.runs[0]).resolve() == cfg.run_dir.resolve():
            raise UserError(f"train.average: name={cfg.name} is the averaged run itself: write under another name=...")
        info, states = read_last_checkpoints(a.runs[0], a.last, a.weights)
        check_same_tensors(states)
        return info, states
    if len(a.runs) < 2:
        raise UserError(f"train.average.mode={a.mode} needs two runs or more in train.average.runs (has {len(a.runs)})")
    read = [read_run_best(r) for r in a.runs]
    check_same_network([(label, info) for label, info, _ in read])
    states = [(label, state) for label, _, state in read]
    check_same_tensors(states)
    return read[0][1], states


def check_output_free(cfg: Config) -> Path:
    stem = cfg.run_dir / "best"
    if Path(f"{stem}.safetensors").exists() and not cfg.overwrite:
        raise UserError(
            f"name={cfg.name}: {stem}.safetensors exists; average under another name=..., or replace it: overwrite=true"
        )
    return stem


def run(cfg: Config, log=print) -> dict:
    """Average as ``train.average`` says, write ``runs/<name>/best`` and return what was done."""
    start = time.perf_counter()
    with hold_output(cfg.run_dir, "average", "name"):  # never beside a train or average of the same name
        stem = check_output_free(cfg)
        info, sources = resolve_sources(cfg)
        check_config_fits(cfg, info)
        log(f"average: mode={cfg.train.average.mode}, {len(sources)} source(s) of {info['arch']}")
        model, kept, scores, result = average(cfg, info, sources, log)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            export_model(model, stem, averaged_meta(cfg, info, sources, kept, scores, result))
        except OSError as exc:
            raise UserError(f"cannot write {stem}: {exc.strerror or exc}") from None
    seconds = time.perf_counter() - start
    log(f"wrote {stem}.safetensors ({seconds:.0f} s); submit and export take it: submit.checkpoints=[{stem}]")
    return {"stem": str(stem), "kept": kept, "scores": scores, "result": result, "seconds": seconds}


def check_config_fits(cfg: Config, info: dict) -> None:
    """The validation split and attack come from this config: it must be the sources' network's."""
    if cfg.model.name != info["arch"] or cfg.data.num_classes != info["num_classes"]:
        raise UserError(
            f"train.average: the sources are {info['arch']} with {info['num_classes']} classes, this config has "
            f"model.name={cfg.model.name}, data.num_classes={cfg.data.num_classes}: pass the config they trained with"
        )


def average(cfg: Config, info: dict, sources: list, log) -> tuple[ImageClassifier, list[str], dict, dict]:
    """The averaged network (greedy: of the sources the soup keeps), the kept labels, the sources'
    validation scores (greedy only) and the result's."""
    validator = Validator(cfg, info)
    scores: dict[str, dict] = {}
    if cfg.train.average.mode == "greedy":
        kept, scores, _ = greedy_soup(sources, validator, log)
        chosen = [s for label, s in sources if label in kept]
    else:
        kept, chosen = [label for label, _ in sources], [s for _, s in sources]
    model = build_network(info)
    model.load_state_dict(average_states(chosen), strict=True)
    if has_batchnorm(model):
        recompute_batchnorm(model, cfg)
        log("  BatchNorm statistics recomputed on the training images")
    result = validator.score(model.state_dict())
    log(f"  averaged {len(kept)} of {len(sources)}: validation {describe(result)}")
    return model.eval(), kept, scores, result


def averaged_meta(cfg: Config, info: dict, sources: list, kept: list[str], scores: dict, result: dict) -> dict:
    a = cfg.train.average
    return {
        "arch": info["arch"],
        "num_classes": info["num_classes"],
        "image_size": info["image_size"],
        "stem": info.get("stem", "patch"),
        "weights": f"average ({a.mode})",
        "val_acc": result["acc"],
        "val_n": result["n"],
        "selected_by": result["selected_by"],
        **({"val_robust_acc": result["robust_acc"]} if "robust_acc" in result else {}),
        "averaged": {
            "mode": a.mode,
            "weights": a.weights if a.mode == "last" else "best",
            "sources": [label for label, _ in sources],
            "kept": kept,
            "source_scores": {k: v["score"] for k, v in scores.items()},
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    parser = create_parser("run.sh average", "Average checkpoints (the last k of a run, or a soup of runs) into one.")
    return run(parse_config(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
