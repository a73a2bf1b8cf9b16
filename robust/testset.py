"""``./run.sh make-testset``: a Phase-I-like test set, the local twin of the challenge's Track I test.

The organizers' test images (1st-place write-up) were clean images, black-box attacks of any
type and strength and common corruptions, sometimes stacked on one image. This stage builds
that mix from held-out labelled images (the test folder with its hidden labels, else the
validation split: :func:`robust.eval_images.load_eval_images`):

* ``clean``: the image as it is;
* ``corruption``: one ImageNet-C corruption (``testset.corruptions``) at a random severity;
* ``transfer``: an attack crafted on a surrogate checkpoint (never the submitted model), its
  kind, norm, budget and steps drawn from ``testset.attack`` (:func:`attacks.craft_attack`);
* ``stacked``: an attack and a corruption, alternately attack-then-corruption and
  corruption-then-attack (the attack crafted on the corrupted image).

The fractions of the four kinds are exact up to rounding (largest remainder). Every draw comes
from ``testset.seed`` and the image's index, so the same command writes the same bytes (on the
same torch build and thread count). Output, written into a temporary folder renamed into place:
``<out_dir>/test/N.png``, ``<out_dir>/test_labels.txt`` (hidden labels, ``N.png LABEL``) and
``<out_dir>/manifest.json`` (per image: kind, source, the ordered steps with their settings).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from attacks import craft_attack, draw_attack
from core.checkpoint import read_checkpoint_info, resolve_checkpoint_files
from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config, ConfigError, config_to_dict
from core.devices import default_device
from core.errors import UserError
from core.imagenet_c import corrupt, corruption_seed
from core.io import publishing, settle_leftovers
from core.outputs import hold_output
from infer.defended import load_members, resize_to, resolve_member_paths
from infer.testset_folder import KINDS, MANIFEST_NAME, hold_folder_for_writing, sharing_lock_path
from robust.config import TestsetConfig
from robust.eval_images import load_eval_images

LABELS_NAME = "test_labels.txt"
IMAGES_DIR = "test"


# --- sources ---------------------------------------------------------------------------------


def load_source(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str, list[str]]:
    """The held-out labelled images as uint8 (N, 3, S, S) at ``data.image_size``, labels, source, keys."""
    t = cfg.testset
    view = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, subset=t.subset, seed=t.seed))
    x, y, source, keys = load_eval_images(view, cfg.data.image_size)
    return (x * 255).round().to(torch.uint8), y, source, keys


class Surrogate(nn.Module):
    """A surrogate checkpoint fed any image size (resized to its own), float images in [0, 1]."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model, self.image_size = model, int(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize_to(x, self.image_size))


def _sha256_of(path: str) -> str | None:
    weights, info_path = resolve_checkpoint_files(path)
    return read_checkpoint_info(info_path).get("sha256") if info_path.is_file() else None


def load_surrogates(cfg: Config) -> tuple[list[Surrogate], list[dict]]:
    """The ``testset.surrogates`` models and their records; none may be the submitted model.

    The submitted model is the one ``submit`` would load for this config (``submit.checkpoints``,
    else ``runs/<name>/best``), compared by the sha256 of its weights.
    """
    t = cfg.testset
    if not t.surrogates:
        if t.transfer + t.stacked > 0:
            raise ConfigError(
                "config key 'testset.surrogates' needs at least one checkpoint for the transfer and stacked "
                "images (or testset.transfer=0 testset.stacked=0)"
            )
        return [], []
    submitted = set()
    for path in resolve_member_paths(cfg):
        try:
            submitted.add(_sha256_of(path))
        except UserError:
            continue  # no submitted model yet: nothing to collide with
    members, infos = load_members(t.surrogates, cfg.data.num_classes)
    records = []
    for i, (path, info) in enumerate(zip(t.surrogates, infos)):
        if info.get("sha256") in submitted - {None}:
            raise ConfigError(
                f"config key 'testset.surrogates[{i}]': {path} is the submitted model (submit.checkpoints or "
                f"runs/{cfg.name}/best); transfer attacks need another checkpoint"
            )
        records.append({"path": str(path), "sha256": info.get("sha256"), "arch": info["arch"]})
    device = default_device()  # the attacks are crafted where the surrogates run: the GPU when there is one
    models = [Surrogate(m, info["image_size"]).eval().to(device) for m, info in zip(members, infos)]
    return models, records


# --- the plan --------------------------------------------------------------------------------


def assign_kinds(n: int, t: TestsetConfig, seed: int) -> list[str]:
    """The kind of each of ``n`` images: counts by largest remainder of ``n x fraction``, then shuffled."""
    fractions = [getattr(t, k) for k in KINDS]
    exact = [f * n for f in fractions]
    counts = [int(v) for v in exact]
    by_remainder = sorted(range(len(KINDS)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    kinds = [kind for kind, c in zip(KINDS, counts) for _ in range(c)]
    return [kinds[i] for i in np.random.default_rng(seed).permutation(n)]


def draw_corruption(rng: np.random.Generator, t: TestsetConfig, key: str) -> dict:
    name, severity = str(rng.choice(t.corruptions)), int(rng.choice(t.severities))
    seed = corruption_seed(key, name, severity, t.seed)
    return {"op": "corruption", "name": name, "severity": severity, "seed": seed}


def plan_images(keys: Sequence[str], t: TestsetConfig, n_surrogates: int) -> list[dict]:
    """Per image: its kind and the ordered steps that make it (drawn from the seed and its index)."""
    plan, stacked = [], 0
    for i, kind in enumerate(assign_kinds(len(keys), t, t.seed)):
        rng = np.random.default_rng([t.seed, i])
        steps = []
        if kind in ("corruption", "stacked"):
            steps.append(draw_corruption(rng, t, keys[i]))
        if kind in ("transfer", "stacked"):
            steps.append(draw_attack(rng, t.attack, n_surrogates))
        if kind == "stacked":
            if stacked % 2 == 0:  # alternate so both orders are always in the set
                steps.reverse()
            stacked += 1
        plan.append({"id": i, "kind": kind, "source": keys[i], "steps": steps})
    return plan


# --- applying it -----------------------------------------------------------------------------


def apply_step(image: torch.Tensor, label: int, step: dict, surrogates: Sequence[nn.Module]) -> torch.Tensor:
    """One step of the manifest on one uint8 (3, H, W) image; returns the uint8 result.

    An attack is crafted on its surrogate in float32 and rounded to uint8 (so a pixel may move
    up to half a level more than eps).
    """
    if step["op"] == "corruption":
        out = corrupt(image.permute(1, 2, 0).numpy(), step["name"], step["severity"], step["seed"])
        return torch.tensor(out).permute(2, 0, 1).contiguous()
    model = surrogates[step["surrogate"]]
    device = next(model.parameters()).device
    x = image.float().div(255.0).unsqueeze(0).to(device)
    generator = torch.Generator().manual_seed(step["seed"])
    adv = craft_attack(
        step["kind"],
        model,
        x,
        torch.tensor([label], device=device),
        step["eps"],
        step["norm"],
        step["steps"],
        generator,
    )
    return (adv[0].cpu() * 255).round().clamp(0, 255).to(torch.uint8)


def apply_steps(
    image: torch.Tensor, label: int, steps: Sequence[dict], surrogates: Sequence[nn.Module]
) -> torch.Tensor:
    """The manifest's ``steps`` applied in order (what :func:`run` wrote for this image)."""
    for step in steps:
        image = apply_step(image, label, step, surrogates)
    return image


# --- writing ---------------------------------------------------------------------------------


def _png_bytes(image: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(folder: Path, images: Sequence[torch.Tensor], plan: Sequence[dict], manifest: dict) -> None:
    """The challenge layout in the empty ``folder``."""
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for entry, image in zip(plan, images):
        (folder / IMAGES_DIR / entry["file"]).write_bytes(_png_bytes(image))
    labels = "".join(f"{e['file']} {e['label']}\n" for e in plan)
    (folder / LABELS_NAME).write_text(labels, encoding="utf-8")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    sharing_lock_path(folder).touch()  # what readers of this set hold while they read it


def check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out}: already exists (testset.overwrite=true replaces it, or set testset.out_dir)")
    if not (out / MANIFEST_NAME).is_file():
        raise UserError(f"{out}: exists and is not a make-testset folder (no {MANIFEST_NAME}); not replacing it")


# --- the stage -------------------------------------------------------------------------------


def run(cfg: Config, progress: bool = True, config_arg: str | None = None) -> dict:
    """Build the test set of ``cfg.testset``; returns the counts per kind, the folder and the seconds."""
    start = time.perf_counter()
    t = cfg.testset
    out = Path(t.out_dir)
    # Every decision about `out` is taken holding its lock (two runs started together both saw no
    # folder before), and with no reader of it (submit, evaluate, ablate) at work.
    with hold_output(out, "make-testset", "testset.out_dir"), hold_folder_for_writing(out, "testset.out_dir"):
        settle_leftovers(out)  # an old set a kill left aside comes back before it is checked
        check_out_dir(out, t.overwrite)
        surrogates, records = load_surrogates(cfg)
        torch.manual_seed(t.seed)
        images_u8, labels, source, keys = load_source(cfg)
        plan = plan_images(keys, t, len(surrogates))
        images = []
        # per image, with tqdm's estimate of the time left: transfer-attacked images take seconds each
        bar = tqdm(total=len(plan), desc="make-testset", unit="img", disable=not progress, leave=False)
        for entry, image, label in zip(plan, images_u8, labels.tolist()):
            entry.update(file=f"{entry['id']}.png", label=int(label))
            images.append(apply_steps(image, int(label), entry["steps"], surrogates))
            bar.update(1)
        bar.close()
        manifest = {
            "source": source,
            "image_size": cfg.data.image_size,
            "num_classes": cfg.data.num_classes,
            # what made the images (where they were written changes none of them)
            "testset": {k: v for k, v in config_to_dict(t).items() if k not in ("out_dir", "overwrite")},
            "surrogates": records,
            "images": plan,
        }
        try:
            with publishing(out) as tmp:
                write_folder(tmp, images, plan, manifest)
        except OSError as exc:
            raise UserError(f"{out}: cannot write the test set ({exc.strerror or exc}); nothing was replaced") from None
    counts = {k: sum(e["kind"] == k for e in plan) for k in KINDS}
    result = {"out_dir": str(out), "n": len(plan), "counts": counts, "seconds": round(time.perf_counter() - start, 1)}
    if progress:
        mix = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"make-testset: {len(plan)} images from the {source} -> {out} ({mix}; {result['seconds']} s)")
        print(f"score a model on it: {score_command(cfg, out, config_arg)}")
    return result


def score_command(cfg: Config, out: Path, config_arg: str | None = None) -> str:
    """The submit command that scores this config's model on the folder ``out``: its own
    submission name, so the real test set's files are never the ones replaced."""
    config = ["--config", config_arg] if config_arg else []
    keys = [
        f"data.root={out}",
        f"data.test_dir={IMAGES_DIR}",
        f"data.test_labels={LABELS_NAME}",
        f"data.test_manifest={MANIFEST_NAME}",
        f"submit.file_name={cfg.submit.name_of(cfg.name)}_{out.name}",
    ]
    return shlex.join(["./run.sh", "submit", *config, *keys])


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser(
        "run.sh make-testset", "A Phase-I-like test set: clean, corrupted, transfer-attacked and stacked images."
    ).parse_args(argv)
    return run(parse_config(args), config_arg=args.config)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
