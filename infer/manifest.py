"""The per-image manifest of a Phase-I-like test set (``./run.sh make-testset``), and the score by kind.

``manifest.json`` says, for every ``N.png`` of the folder, what was done to it: its ``kind``
(``clean``, ``corruption``, ``transfer`` or ``stacked``) and the ordered ``steps`` (a corruption,
an attack crafted on a surrogate, or both). ``submit`` and ``ablate`` read it to break a score
down by kind, and refuse a model that is one of the surrogates (its transfer images would be
white-box ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from core.errors import UserError
from core.io import read_json

KINDS = ("clean", "corruption", "transfer", "stacked")
MANIFEST_NAME = "manifest.json"


def read_manifest(path: Path) -> dict:
    """The manifest at ``path``, checked: ``images`` is a list of ``{"id": int, "kind": KIND, ...}``.

    Raises:
        UserError: a missing or malformed file (one line naming it and the first bad entry).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: test manifest not found (data.test_manifest)")
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON manifest ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: a test manifest needs an 'images' list")
    first: dict[int, int] = {}
    for i, entry in enumerate(images):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), int) and entry.get("kind") in KINDS):
            raise UserError(f"{path}: images[{i}] needs an integer 'id' and a 'kind' in {', '.join(KINDS)}")
        if entry["id"] in first:
            raise UserError(f"{path}: images[{i}] repeats the id {entry['id']} of images[{first[entry['id']]}]")
        if "label" in entry and (not isinstance(entry["label"], int) or isinstance(entry["label"], bool)):
            raise UserError(f"{path}: images[{i}] has a 'label' that is not an integer")
        first[entry["id"]] = i
    return data


def check_manifest_matches(
    manifest: dict, path: Path, ids: Iterable[int], folder: Path, labels: Mapping[int, int] | None = None
) -> None:
    """Refuse a manifest that does not describe exactly the images of ``folder`` (``ids``) and,
    when given, their hidden ``labels``: a score by kind on such a pair would be wrong.

    Raises:
        UserError: one line naming the first entry or image that differs.
    """
    present = set(ids)
    described = {entry["id"] for entry in manifest["images"]}
    hint = "the manifest and the folder are not one make-testset set"
    for i, entry in enumerate(manifest["images"]):
        if entry["id"] not in present:
            raise UserError(f"{path}: images[{i}] describes image {entry['id']}, which {folder} does not hold ({hint})")
        if labels is not None and "label" in entry and labels.get(entry["id"]) != entry["label"]:
            raise UserError(
                f"{path}: images[{i}] (image {entry['id']}) has label {entry['label']}, the hidden labels say "
                f"{labels.get(entry['id'])} ({hint})"
            )
    extra = sorted(present - described)
    if extra:
        raise UserError(
            f"{path}: image {extra[0]} of {folder} is not in the manifest ({len(extra)} image(s) not in it; {hint})"
        )


def kinds_by_id(manifest: dict) -> dict[int, str]:
    return {entry["id"]: entry["kind"] for entry in manifest["images"]}


def surrogate_hashes(manifest: dict) -> set[str]:
    """The sha256 of every checkpoint the manifest's transfer attacks were crafted on."""
    return {s["sha256"] for s in manifest.get("surrogates", []) if isinstance(s, dict) and s.get("sha256")}


def check_not_surrogate(manifest: dict, hashes: Sequence[str | None], where: str) -> None:
    """Refuse a model whose weights crafted the test set's transfer images: for it they are white-box."""
    used = surrogate_hashes(manifest) & {h for h in hashes if h}
    if used:
        raise UserError(
            f"{where}: a member of the model is a surrogate the test set's transfer attacks were crafted on "
            f"(sha256 {sorted(used)[0][:12]}...); its score would not be a transfer score"
        )


def breakdown(correct: Mapping[int, float], kinds: Mapping[int, str]) -> dict[str, dict]:
    """Accuracy (%) and count per kind and over all images that have a kind.

    Args:
        correct: Image id -> correctness (1/0, or the mean over draws of a randomized model).
        kinds: Image id -> kind, from :func:`kinds_by_id`.
    """
    out: dict[str, dict] = {}
    for kind in (*KINDS, "all"):
        values = [float(c) for i, c in correct.items() if i in kinds and (kind == "all" or kinds[i] == kind)]
        if values:
            out[kind] = {"n": len(values), "acc": 100.0 * sum(values) / len(values)}
    return out


def format_breakdown(parts: Mapping[str, dict]) -> str:
    """``all 71.0% (300): clean 90.0% (75), corruption ...`` on one line."""
    rest = ", ".join(f"{k} {v['acc']:.1f}% ({v['n']})" for k, v in parts.items() if k != "all")
    head = parts.get("all")
    return (f"all {head['acc']:.1f}% ({head['n']}): " if head else "") + rest
