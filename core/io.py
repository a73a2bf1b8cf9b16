"""Atomic file writes (an output appears whole or not at all) and strict JSON values."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from core.errors import UserError


class WriteError(UserError, OSError):
    """An output could not be written (disk full, read-only or missing folder, name too long).

    Raised by every atomic write of this module instead of the raw ``OSError``: one line naming
    the file, and a promise the writes keep (no partial file, the earlier one untouched). Still an
    ``OSError`` with the cause's ``errno``/``strerror`` and the file as ``filename``, so callers
    that catch those keep working.
    """

    def __init__(self, path: Path, cause: OSError, outcome: str = "nothing was replaced, an earlier file is kept"):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.message = f"{path}: cannot write ({cause.strerror or cause}); {outcome}"

    def __str__(self) -> str:
        return self.message


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def create_temp_beside(path: Path) -> tuple[int, Path]:
    """Open a hidden temp file in ``path``'s folder (so a rename onto ``path`` is atomic).

    mkstemp creates files 0600; they get the permissions a plain ``open`` would give, since
    the temp file becomes the user's output.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        fd, tmp_path = create_temp_beside(path)
        os.close(fd)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # What the block wrote may be a new file at this path (safetensors writes its own,
        # with 0600): the output gets the permissions a plain open() would give.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as exc:  # the block's own writes included: they all go to the temp file
        raise WriteError(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_files(
    texts: dict[Path, str | bytes],
    check: Callable[[dict[Path, Path]], None] | None = None,
    remove: Sequence[Path] = (),
) -> None:
    """Write several files (text or bytes) as one unit: all of them appear, or none changes.

    ``core.io.atomic_path`` makes one file atomic by renaming its temp file on exit; for three
    files that is not enough (a failing second rename would leave a new CSV next to an old
    JSON), so this writes every temp first and undoes the renames already done on failure.
    Older files are kept as hard links (a copy where links are unsupported) until the end.

    Args:
        texts: Target path -> text (UTF-8, "\n" line ends) or bytes.
        check: Called with ``{target: temp file}`` once every temp file is written, before any
            rename; raising there leaves every target as it was (so files are validated whole,
            under their temporary names, before they replace the old ones).
        remove: Files that must not outlive the unit (an earlier set's members this one has no
            new version of): removed with it, restored if it fails.
    """
    temps: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    installed: list[Path] = []
    removing = [p for p in remove if p not in texts and (p.exists() or p.is_symlink())]
    removed: list[Path] = []
    writing = next(iter(texts), Path("."))  # the file at hand, named if the disk refuses it
    try:
        for writing, text in texts.items():
            temps[writing] = _write_temp(writing, text)
        if check is not None:
            check(dict(temps))
        for writing in [*texts, *removing]:
            if writing.exists():
                backups[writing] = _backup(writing)
        for writing in texts:
            os.replace(temps[writing], writing)
            del temps[writing]
            installed.append(writing)
        for writing in removing:
            writing.unlink()
            removed.append(writing)
        for folder in {t.parent for t in [*texts, *removing]}:
            _fsync_dir(folder)
    except BaseException as exc:
        lost = _undo(installed, removed, backups)
        for note in lost:
            exc.add_note(note)
        if isinstance(exc, OSError):
            raise (WriteError(writing, exc, "; ".join(lost)) if lost else WriteError(writing, exc)) from None
        raise
    finally:
        for tmp in list(temps.values()) + list(backups.values()):
            tmp.unlink(missing_ok=True)


def _undo(installed: list[Path], removed: list[Path], backups: dict[Path, Path]) -> list[str]:
    """Put the files of a failed unit back as they were (``backups`` loses what it restores);
    returns a note for each that could not be (its old copy is kept, and named)."""
    lost = []
    for target in reversed(removed):
        with contextlib.suppress(OSError):
            if target in backups:
                os.replace(backups.pop(target), target)
    for target in reversed(installed):
        try:
            if target in backups:
                os.replace(backups[target], target)
                del backups[target]
            else:
                target.unlink(missing_ok=True)
        except OSError as undo_exc:
            # Keep the backup file: it is now the only copy of the old version.
            kept = backups.pop(target, None)
            lost.append(f"could not restore {target} ({undo_exc}); old copy kept at {kept}")
    return lost


def _write_temp(target: Path, content: str | bytes) -> Path:
    # Same naming as core.io.atomic_path: hidden, beside the target, so rename stays atomic.
    fd, tmp = create_temp_beside(target)
    try:
        how = {"mode": "w", "encoding": "utf-8", "newline": "\n"} if isinstance(content, str) else {"mode": "wb"}
        with os.fdopen(fd, **how) as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _backup(target: Path) -> Path:
    backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.bak")
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


# The random part mkstemp puts in create_temp_beside's names, and the one _backup puts in its own.
_LEFTOVER = r"\.{name}\.(?:[a-z0-9_]{{8}}\.tmp|[0-9a-f]{{8}}\.bak)"


def remove_leftovers(targets: Iterable[Path]) -> list[Path]:
    """Remove the temp and backup files that writes of ``targets`` killed outright (SIGKILL, the
    out-of-memory killer, a power cut) left beside them; returns what was removed.

    Only while holding the lock of these outputs (:mod:`core.outputs`): a live writer of them
    would lose its temp file.
    """
    removed = []
    for target in targets:
        target = Path(target)
        pattern = re.compile(_LEFTOVER.format(name=re.escape(target.name)))
        try:
            entries = list(target.parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            if pattern.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _fsync_dir(folder: Path) -> None:
    # Makes the renames durable; not possible on every platform/file system, and not essential.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse_json(data: str | bytes) -> Any:
    """``json.loads`` for files we did not write: every kind of bad content is a ValueError (json
    raises RecursionError for a document nested deeper than Python's recursion limit)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: Path) -> Any:
    """The JSON document in ``path``: OSError if it cannot be read, ValueError if it is not JSON."""
    return parse_json(Path(path).read_bytes())


def to_json_safe(value: Any, where: str = "value") -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts, or a ValueError naming the key."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None  # strict JSON has no NaN/Infinity
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v, f"{where}[{k}]") for k, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy
        return to_json_safe(value.tolist(), where)
    raise ValueError(f"{where}: {type(value).__name__} value {value!r} cannot be written as JSON")


def check_writable(folder: Path, key: str) -> None:
    """Prove a file can be written into ``folder`` (or, where it does not exist yet, into the
    nearest folder above it that does) before any long work; creates nothing that stays.
    A failure is one line naming the config ``key``."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: cannot write to {folder} ({existing} is not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{key}: cannot write to {folder} ({exc.strerror or exc})") from None


# A folder output's two hidden neighbours while it is written: the new folder, and the old one moved aside.
def _temp_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def _aside_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def settle_leftovers(out: Path) -> None:
    """Clean what a writer of the folder ``out`` killed outright (SIGKILL, a power cut) left beside it:
    its temporary folder is removed; the old folder moved aside is put back where the kill came
    before the new one took its place, else removed.

    Only while holding the lock of ``out`` (:mod:`core.outputs`): a live writer would lose its work.
    """
    real = Path(os.path.realpath(out))
    _remove_tree(_temp_of(real))
    aside = _aside_of(real)
    if aside.is_dir() and not aside.is_symlink():
        if not (real.exists() or real.is_symlink()):
            os.rename(aside, real)
        else:
            _remove_tree(aside)


@contextlib.contextmanager
def publishing(out: Path, main_process: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; put it in ``out``'s place, as one step for
    every reader, only if the block succeeds. The one way a folder output is written.

    Leftovers of a killed writer are settled first (:func:`settle_leftovers`; hold ``out``'s lock).
    An ``out`` already there is moved aside, put back if the new folder cannot take its place, and
    removed only once it has. On any failure (a stop signal included) the temporary folder is
    removed and ``out`` is as it was. An ``out`` that is a symbolic link stays one: the folder it
    names is replaced, and the temporary folder lies beside that folder (one file system).

    Args:
        out: The folder to publish.
        main_process: False in the other processes of a distributed writer: they get the same
            temporary folder to write into (once the main process has made it), and leave making,
            publishing and removing it to the main process.

    Raises:
        OSError: the folder could not be made or published; ``out`` is as it was.
    """
    real = Path(os.path.realpath(out))
    tmp = _temp_of(real)
    if not main_process:
        yield tmp
        return
    settle_leftovers(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, real)
    finally:
        _remove_tree(tmp)


def _swap_in(tmp: Path, out: Path) -> None:
    aside = None
    if out.exists() or out.is_symlink():
        aside = _aside_of(out)
        os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except OSError:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        _remove_tree(aside)


def remove_folder(path: Path) -> None:
    """Remove the folder ``path``, renamed to its temporary name first: a stop mid-delete leaves
    no half folder under its name, only a leftover that :func:`settle_leftovers` removes."""
    doomed = _temp_of(Path(path))
    _remove_tree(doomed)  # left by an earlier kill
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = Path(path)
    _remove_tree(doomed)


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
