"""The prediction a user could write by hand instead of ``./run.sh submit``: the yardstick of the
``commands`` bench rows. No project code: a timm model, safetensors weights, a PIL loop over the
test PNGs, argmax, CSV.

    python bench/minimal_predict.py runs/demo/best data/demo/test out.csv
    python bench/minimal_predict.py runs/demo/best      # the imports and the model build only
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file


def main(stem: str, test_dir: str = "", out_csv: str = "") -> None:
    info = json.loads(Path(f"{stem}.json").read_text())
    model = timm.create_model(info["arch"], num_classes=info["num_classes"]).eval()
    weights = load_file(f"{stem}.safetensors")
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")})
    if not test_dir:
        return
    mean = torch.tensor(info["mean"] or [0.0, 0.0, 0.0]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"] or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    paths = sorted(Path(test_dir).glob("*.png"), key=lambda p: int(p.stem))
    rows = [("image_id", "category_id")]
    with torch.inference_mode():
        for i in range(0, len(paths), 64):
            batch = paths[i : i + 64]
            images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in batch]
            logits = model((torch.stack(images).float() / 255 - mean) / std)
            rows += [(p.stem, int(c)) for p, c in zip(batch, logits.argmax(1))]
    with open(out_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
