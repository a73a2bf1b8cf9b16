"""A Phase-I-like test set's folder (``./run.sh make-testset``): its manifest, the score by kind,
and the reader/writer lock that keeps a set whole while it is read.

``manifest.json`` says, for every ``N.png`` of the folder, what was done to it: its ``kind``
(``clean``, ``corruption``, ``transfer`` or ``stacked``) and the ordered ``steps`` (a corruption,
an attack crafted on a surrogate, or both). ``submit`` and ``ablate`` read it to break a score
down by kind, and refuse a model that is one of the surrogates (its transfer images would be
white-box ones). Readers (submit, evaluate, ablate) hold the set's ``.readers.lock`` shared and
make-testset holds it exclusively while it replaces the set, so nobody reads the manifest of one
set and the images of the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from core.errors import UserError
from core.io import read_json
from core.outputs import holder_of, holding, same_file, try_flock

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


# --- readers and the writer of a test set -------------------------------------------------

ATTEMPTS = 20  # rounds of open / lock while make-testset replaces the folder under a reader
READERS_LOCK = ".readers.lock"  # inside a folder make-testset writes (published with it)


def sharing_lock_path(folder: Path) -> Path:
    """The reader/writer lock of a folder ``make-testset`` writes: hidden, inside it, so it comes and
    goes with the set (each set carries its own, created empty by the writer)."""
    return Path(folder) / READERS_LOCK


def _open_sharing_lock(path: Path, flags: int) -> int | None:
    """The lock file at ``path`` (never through a link), or None where there is none."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UserError(f"cannot open the lock {path} ({exc.strerror or exc}): not a lock file of this pipeline")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"the lock {path} is not a regular file: not a lock file of this pipeline; remove it")
    return fd


def _writer_of(folder: Path) -> str:
    """Who holds the output lock of ``folder`` (the make-testset writing it), as a message names it."""
    holder = holder_of(folder)
    return f"make-testset, {holder}" if holder else "make-testset"


@contextlib.contextmanager
def hold_folder_for_writing(folder: Path, key: str):
    """Exclude every reader of ``folder`` (:func:`hold_folders_for_reading`) for the block; the
    writer must give the folder it publishes an empty :data:`READERS_LOCK`.

    Raises:
        UserError: a command reads the folder now (refused before any work, rather than replacing
            a set under its reader).
    """
    fd = _open_sharing_lock(sharing_lock_path(folder), os.O_RDWR)
    if fd is not None and not try_flock(fd, fcntl.LOCK_EX):
        os.close(fd)
        raise UserError(
            f"{key}: {folder} is being read by another command (submit, evaluate or ablate on this machine); "
            "it is replaced only while nothing reads it: retry when that command ends"
        )
    with holding([fd] if fd is not None else []):
        yield


def _lock_for_reading(folder: Path, key: str) -> int | None:
    path = sharing_lock_path(folder)
    for _ in range(ATTEMPTS):
        fd = _open_sharing_lock(path, os.O_RDONLY)
        if fd is None:
            return None
        if not try_flock(fd, fcntl.LOCK_SH):
            os.close(fd)
            raise UserError(f"{key}: {folder} is being replaced by {_writer_of(folder)}: retry when it ends")
        if same_file(path, fd):
            return fd
        os.close(fd)  # a new set took the folder's place between our open and our lock: lock that one
    raise UserError(f"{key}: {folder} keeps being replaced; retry in a moment")


@contextlib.contextmanager
def hold_folders_for_reading(paths: Sequence[Path | None], key: str):
    """Keep ``make-testset`` from replacing, for the block, the folders that are or hold ``paths``.

    A folder ``make-testset`` wrote holds its :func:`sharing_lock_path`: readers hold it shared,
    the writer exclusively, so a reader sees one whole set (never the manifest of one and the
    images of the next). A folder without one was not written by ``make-testset``.

    Raises:
        UserError: ``make-testset`` is replacing one of them now (one line naming it).
    """
    folders = dict.fromkeys(f for p in paths if p is not None for f in (Path(p), Path(p).parent))
    fds: list[int] = []
    try:
        for folder in folders:
            fd = _lock_for_reading(folder, key)
            if fd is not None:
                fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    with holding(fds):
        yield
