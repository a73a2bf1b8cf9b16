"""Submission files: write them (all or nothing), read them back, and check them.

``write_submission`` produces three files in ``out_dir``:

* ``<name>.csv``: header ``image_id,category_id``, one row per test image sorted by id,
  plain integers, ``\\n`` line endings, no quoting (the leaderboard CSV of the product card);
* ``<name>.json``: the challenge's exact form, a JSON array
  ``[{"image_id": 0, "category_id": 18}, ...]`` (one object per line, sorted by id), as the
  public Phase I solutions wrote ``t1_p1_result.json``;
* ``<name>.meta.json``: the caller's meta dict plus counts (``n_images``, ``class_histogram``)
  and the sha256 of its two twins (``files``): the three files are one unit, and a set mixed from
  two runs (two submits of one name racing, a file copied from elsewhere) is detected by
  :func:`set_problems` wherever a set is read (``validate``, and right after writing).

``parse_submission`` / ``validate_file`` are strict, because a file the leaderboard rejects
costs a day's submission slot. The rules, checked for files we did not write as well:

* the file is UTF-8; a UTF-8 byte-order mark (Excel adds one on "save as CSV") is **reported as
  a problem** (some CSV readers then see a header ``\\ufeffimage_id``), but the rest of the file
  is still parsed so that every other problem shows up in the same run;
* CSV: the exact header ``image_id,category_id``; ``\\n`` or ``\\r\\n`` line endings; exactly two
  unquoted fields per row, each matching ``-?[0-9]+`` (``3.0``, ``+3``, `` 3`` and ``""`` are
  not integers); no blank lines (one final newline is fine, and so is none);
* JSON: an array of objects with exactly the keys ``image_id`` and ``category_id``, both JSON
  integers (not ``true``, ``3.0`` or ``"3"``), no repeated keys;
* every image_id once; every test image predicted; no id outside the test folder; labels in
  ``[0, num_classes)`` (negative labels are always reported).

Problems name their place: ``FILE:LINE: ...`` for CSV, ``FILE: entry N: ...`` for JSON, where
N is the 0-based index in the array (our own writer puts entry N on line N + 2).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import numbers
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.errors import UserError
from core.io import atomic_write_files, read_json, to_json_safe
from core.labels import list_test_images
from core.outputs import record_owner
from infer.config import submission_name_problem

FIELDS = ("image_id", "category_id")
CSV_HEADER = ",".join(FIELDS)
MAX_PROBLEMS = 20  # listing cap: a wrong file can have 20,000 broken rows
_SHOW_IDS = 5  # ids quoted in a summary message
_INT_RE = re.compile(r"-?[0-9]+")


class SubmissionNameError(UserError, ValueError):
    """A submission name that is not a plain file name (it comes from the user's config)."""


# ----------------------------------------------------------------------------------- writing


def write_submission(
    out_dir: Path,
    name: str,
    image_ids: Sequence[int],
    predictions: Sequence[int],
    meta: dict,
    test_dir: Path | None = None,
    num_classes: int | None = None,
    test_ids: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.json`` and ``<name>.meta.json`` into ``out_dir``.

    Each file goes to a temp file beside its target first; only when all three are written and
    flushed (and, given ``test_dir``, the CSV and JSON validated under their temporary names)
    are they renamed into place. If anything fails, the temps are removed and files of an older
    submission with the same name are put back, so the folder holds either the whole valid new
    submission or exactly what it held before. The caller has checked that the name is not
    another stage's (:func:`core.outputs.check_outputs`, before predicting).

    Args:
        out_dir: Folder for the files (created if needed).
        name: Plain file name without extension, e.g. ``"convnext_gcm"``.
        image_ids: One id per test image (any order; the files are sorted by id).
        predictions: The predicted class of each image, aligned with ``image_ids``.
        meta: JSON-able settings to record (config, checkpoints, TTA, GCM, time...).
            ``Path`` and numpy values are converted; NaN/inf become ``null``.
        test_dir: The test folder the files must cover (see :func:`validate_file`).
        num_classes: Labels must lie in ``[0, num_classes)``.
        test_ids: ``test_dir``'s image ids, when the caller has listed it already.

    Returns:
        ``{"csv": path, "json": path, "meta": path}``.

    Raises:
        ValueError: Mismatched lengths, no predictions, duplicate ids, non-integer values, or
            a ``meta`` value that cannot be written as JSON.
        SubmissionNameError: ``name`` is not a plain file name (also a ValueError).
        UserError: the files fail validation against ``test_dir``; nothing was replaced.
    """
    require_submission_name(name)
    rows = _sorted_rows(image_ids, predictions)
    paths = submission_paths(Path(out_dir) / name)
    texts = render_files(rows, meta, paths)  # everything serialised first: a bad value writes nothing

    def check(temps: dict[Path, Path]) -> None:
        for kind in ("csv", "json") if test_dir is not None else ():
            found = validate_file(temps[paths[kind]], test_dir, num_classes, paths[kind], test_ids).problems
            if found:
                raise UserError(f"{paths[kind]}: failed validation, nothing written: {cap_problems(found)[0]}")

    atomic_write_files(texts, check)
    mixed = set_problems(paths["csv"])
    if mixed:  # only possible if something wrote the same name meanwhile (it holds no lock: see core.outputs)
        raise UserError(f"{mixed[0]}; another command wrote this submission at the same time: run submit again")
    return paths


def render_files(rows: list[tuple[int, int]], meta: dict, paths: dict[str, Path]) -> dict[Path, str]:
    """The three files' texts: the CSV and JSON twins, and the meta file with their counts and hashes."""
    histogram = Counter(label for _, label in rows)
    twins = {"csv": format_csv(rows), "json": format_json(rows)}
    full_meta = to_json_safe(dict(meta), "meta")
    full_meta.update(
        {
            "n_images": len(rows),
            "n_classes_predicted": len(histogram),
            "class_histogram": {str(label): histogram[label] for label in sorted(histogram)},
            "files": {kind: {"name": paths[kind].name, "sha256": _sha256(text)} for kind, text in twins.items()},
            **record_owner("submit", "submission"),
        }
    )
    return {
        paths["csv"]: twins["csv"],
        paths["json"]: twins["json"],
        paths["meta"]: json.dumps(full_meta, indent=2, allow_nan=False) + "\n",
    }


def submission_paths(stem: Path) -> dict[str, Path]:
    """The three files of the submission ``stem`` (``submit.stem``, ``out_dir / name``):
    ``{"csv": ..., "json": ..., "meta": ...}``."""
    suffixes = {"csv": ".csv", "json": ".json", "meta": ".meta.json"}
    return {kind: Path(f"{stem}{suffix}") for kind, suffix in suffixes.items()}


def set_problems(path: Path) -> list[str]:
    """Whether ``path`` (any file of a submission) and its two twins are the set the meta file
    describes: the sha256 of each twin's bytes against the meta's ``files``. Empty when they agree,
    when there is no meta file, or when the meta predates these records."""
    path = Path(path)
    stem = path.name[: -len(".meta.json")] if path.name.endswith(".meta.json") else path.name.rsplit(".", 1)[0]
    paths = submission_paths(path.parent / stem)
    try:
        meta = read_json(paths["meta"])
    except (OSError, ValueError):
        return []
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return []
    problems = []
    for kind in ("csv", "json"):
        recorded = files.get(kind, {}).get("sha256") if isinstance(files.get(kind), dict) else None
        try:
            actual = _sha256(paths[kind].read_bytes())
        except OSError:
            continue  # a missing twin is not a mixed set; reading the file itself reports it
        if recorded and actual != recorded:
            problems.append(
                f"{paths[kind]}: not the file {paths['meta'].name} describes (its sha256 differs): the set "
                f"{stem}.csv/.json/.meta.json mixes files of different runs"
            )
    return problems


def _sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def require_submission_name(name: str) -> None:
    """Raise :class:`SubmissionNameError` unless ``name`` is a plain file name without extension."""
    problem = submission_name_problem(name)
    if problem:
        raise SubmissionNameError(f"submission name {name!r} {problem}")


def format_csv(rows: Sequence[tuple[int, int]]) -> str:
    """The leaderboard CSV text of ``(image_id, category_id)`` rows."""
    return "".join([f"{CSV_HEADER}\n"] + [f"{i},{c}\n" for i, c in rows])


def format_json(rows: Sequence[tuple[int, int]]) -> str:
    """The challenge's JSON array, one ``{"image_id": i, "category_id": c}`` per line."""
    body = ",\n".join(f'{{"image_id": {i}, "category_id": {c}}}' for i, c in rows)
    return f"[\n{body}\n]\n" if rows else "[]\n"


def _sorted_rows(image_ids: Sequence[int], predictions: Sequence[int]) -> list[tuple[int, int]]:
    if len(image_ids) != len(predictions):
        raise ValueError(f"{len(image_ids)} image ids but {len(predictions)} predictions")
    if not len(image_ids):
        raise ValueError("no predictions to write")
    ids = [_as_int(v, "image id", k) for k, v in enumerate(image_ids)]
    labels = [_as_int(v, "prediction", k) for k, v in enumerate(predictions)]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate image ids: {_quote_ids(duplicates)}")
    return sorted(zip(ids, labels))


def _as_int(value: Any, what: str, index: int) -> int:
    # numpy integers are numbers.Integral; bools, floats (even 3.0) and strings are not accepted.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"{what} #{index} is {value!r} ({type(value).__name__}), not an integer")


# ----------------------------------------------------------------------------------- reading


@dataclass
class ParsedSubmission:
    """What a submission file says, and where each prediction came from."""

    predictions: dict[int, int] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)  # id -> "FILE:LINE" / "FILE: entry N"
    problems: list[str] = field(default_factory=list)
    readable: bool = True  # False: no table could be read at all (missing file, bad JSON...)

    _short: dict[int, str] = field(default_factory=dict, repr=False)  # id -> "line 3" / "entry 2"

    def add(self, loc: str, short: str, image_id: int, label: int) -> None:
        """Record one prediction; a repeated id is a problem and keeps its first value."""
        if image_id in self.predictions:
            self.problems.append(f"{loc}: duplicate image_id {image_id} (first at {self._short[image_id]})")
            return
        self.predictions[image_id] = label
        self.where[image_id] = loc
        self._short[image_id] = short


def parse_submission(path: Path, as_path: Path | None = None) -> ParsedSubmission:
    """Parse a ``.csv`` or ``.json`` submission (its extension picks the format): each prediction,
    its location, and the problems. Rows with a problem are left out of the predictions (a
    duplicate keeps its first value); ``problems`` is empty for a well-formed file.

    ``as_path``: read ``path`` as if it were this file (its extension picks the format and
    messages name it), e.g. a temporary file about to be renamed to ``as_path``.
    """
    path = Path(path)
    shown = Path(as_path) if as_path is not None else path
    where = str(shown)
    suffix = shown.suffix.lower()
    if suffix not in (".csv", ".json"):
        return _unreadable(
            f"{where}: unknown submission type {shown.suffix or '(no extension)'!r}; expected a .csv or .json file"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _unreadable(f"{where}: file not found")
    except IsADirectoryError:
        return _unreadable(f"{where}: is a folder, not a file")
    except OSError as exc:
        return _unreadable(f"{where}: cannot read: {exc.strerror or exc}")
    parsed = ParsedSubmission()
    text = _decode(data, where, suffix == ".csv", parsed.problems)
    if text is None:
        parsed.readable = False
        return parsed
    if suffix == ".csv":
        _parse_csv(text, where, parsed)
    else:
        _parse_json(text, where, parsed)
    return parsed


def _unreadable(problem: str) -> ParsedSubmission:
    return ParsedSubmission(problems=[problem], readable=False)


def _decode(data: bytes, where: str, is_csv: bool, problems: list[str]) -> str | None:
    offset = 0
    if data.startswith(codecs.BOM_UTF8):
        problems.append(
            f"{where}{':1' if is_csv else ''}: starts with a UTF-8 byte-order mark (BOM, e.g. "
            "from Excel); save it as plain UTF-8 without BOM"
        )
        offset = len(codecs.BOM_UTF8)
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = offset + exc.start
        line = data.count(b"\n", 0, pos) + 1
        hint = " (looks like UTF-16)" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else ""
        problems.append(f"{where}:{line}: not UTF-8 text (byte 0x{data[pos]:02x} at offset {pos}){hint}")
        return None


def _parse_int(text: str) -> int | None:
    if not _INT_RE.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than Python's int() allows
        return None


def _parse_csv(text: str, where: str, parsed: ParsedSubmission) -> None:
    # Split on "\n" only: str.splitlines() would also split on \x0b, \x1c, \u2028... and shift
    # the line numbers away from what an editor shows.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last row; it does not start an empty one
    if not lines:
        parsed.problems.append(f"{where}:1: empty file (expected the header {CSV_HEADER!r})")
        return
    for number, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        loc = f"{where}:{number}"
        fields = line.split(",")
        if number == 1:
            if line == CSV_HEADER:
                continue
            if len(fields) != 2 or any(_parse_int(f) is None for f in fields):
                parsed.problems.append(f"{loc}: header must be {CSV_HEADER!r}, found {line!r}")
                continue
            # Headerless file: say so once, and still read this row as data.
            parsed.problems.append(f"{loc}: missing header {CSV_HEADER!r} (the first line is a data row)")
        if not line.strip():
            parsed.problems.append(f"{loc}: blank line")
            continue
        if len(fields) != 2:
            parsed.problems.append(f"{loc}: expected 2 columns ({CSV_HEADER}), found {len(fields)}: {line!r}")
            continue
        values = [_parse_int(f) for f in fields]
        for name, text_value, value in zip(FIELDS, fields, values):
            if value is None:
                parsed.problems.append(f"{loc}: {name} {text_value!r} is not an integer")
        if None not in values:
            parsed.add(loc, f"line {number}", values[0], values[1])


def _parse_json(text: str, where: str, parsed: ParsedSubmission) -> None:
    try:
        data = json.loads(text, object_pairs_hook=_JsonObject.from_pairs)
    except json.JSONDecodeError as exc:
        parsed.problems.append(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
        parsed.readable = False
        return
    except (ValueError, RecursionError) as exc:  # e.g. an integer with more than 4300 digits
        parsed.problems.append(f"{where}: invalid JSON: {exc}")
        parsed.readable = False
        return
    if not isinstance(data, list):
        hint = " (this is the meta file; check the .json or .csv twin)" if where.endswith(".meta.json") else ""
        parsed.problems.append(
            f'{where}: expected a JSON array of {{"image_id": ..., "category_id": ...}} '
            f"objects, found {_json_type(data)}{hint}"
        )
        parsed.readable = False
        return
    for index, entry in enumerate(data):
        loc = f"{where}: entry {index}"
        if not isinstance(entry, dict):
            parsed.problems.append(f"{loc}: expected an object, found {_json_type(entry)} {_json_repr(entry)}")
            continue
        ok = True
        if entry.repeated:
            parsed.problems.append(f"{loc}: repeated key(s) {', '.join(map(repr, entry.repeated))}")
            ok = False  # json keeps the last value; which one was meant is anyone's guess
        missing = [k for k in FIELDS if k not in entry]
        extra = [k for k in entry if k not in FIELDS]
        if missing:
            parsed.problems.append(f"{loc}: missing key(s) {', '.join(map(repr, missing))}")
        if extra:
            parsed.problems.append(
                f"{loc}: unexpected key(s) {', '.join(map(repr, extra))} (allowed: {', '.join(FIELDS)})"
            )
        for key in FIELDS:
            value = entry.get(key)
            if key in entry and type(value) is not int:  # excludes bool, a subclass of int
                parsed.problems.append(
                    f"{loc}: {key} must be an integer, found {_json_type(value)} {_json_repr(value)}"
                )
                ok = False
        # An entry with valid values but an extra key still counts as a prediction, so the
        # image is not also reported as missing.
        if ok and not missing:
            parsed.add(loc, f"entry {index}", entry["image_id"], entry["category_id"])


class _JsonObject(dict):
    """A JSON object that remembers keys given more than once (plain ``json`` keeps the last)."""

    repeated: list[str]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> "_JsonObject":
        obj = cls()
        obj.repeated = []
        for key, value in pairs:
            if key in obj and key not in obj.repeated:
                obj.repeated.append(key)
            obj[key] = value
        return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _json_repr(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------- checking


@dataclass
class FileValidation:
    """The outcome of :func:`validate_file`."""

    problems: list[str]
    n_predictions: int
    n_test_images: int

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_file(
    path: Path,
    test_dir: Path,
    num_classes: int | None,
    as_path: Path | None = None,
    test_ids: Sequence[int] | None = None,
) -> FileValidation:
    """Check a submission file against the test folder; every problem, uncapped.

    Summaries (missing and extra ids) come first, then per-line problems in file order.
    ``as_path`` as in :func:`parse_submission`; ``test_ids``: the folder's ids when the caller
    has listed it already.

    Raises:
        UserError: ``test_dir`` is not a usable test folder, or ``num_classes`` < 1 (bad
            usage, as opposed to a bad submission).
    """
    test_dir = Path(test_dir)
    if num_classes is not None and num_classes < 1:
        raise UserError(f"number of classes must be at least 1, got {num_classes}")
    if test_ids is None:
        require_test_dir(test_dir)
        test_ids = [image_id for _, image_id in list_test_images(test_dir)]
    parsed = parse_submission(Path(path), as_path)
    if not parsed.readable:
        # Listing every test image as missing would only bury the real problem.
        return FileValidation(parsed.problems, 0, len(test_ids))

    where = str(as_path if as_path is not None else path)
    summary: list[str] = []
    known = set(test_ids)
    missing = [i for i in test_ids if i not in parsed.predictions]
    if missing:
        summary.append(
            f"{where}: {len(missing)} of {len(test_ids)} test images have no valid prediction "
            f"(image_id {_quote_ids(missing)})"
        )
    extra = [i for i in parsed.predictions if i not in known]
    if extra:
        shown = ", ".join(f"{i} at {parsed.where[i]}" for i in extra[:_SHOW_IDS])
        more = f", ... {len(extra) - _SHOW_IDS} more" if len(extra) > _SHOW_IDS else ""
        summary.append(f"{where}: {len(extra)} image_id(s) not in the test folder {test_dir} ({shown}{more})")

    labels: list[str] = []
    for image_id, label in parsed.predictions.items():
        if label < 0:
            labels.append(f"{parsed.where[image_id]}: category_id {label} is negative")
        elif num_classes is not None and label >= num_classes:
            labels.append(f"{parsed.where[image_id]}: category_id {label} is outside [0, {num_classes})")
    return FileValidation(summary + parsed.problems + labels, len(parsed.predictions), len(test_ids))


def require_test_dir(test_dir: Path) -> None:
    """A usable test folder, or a UserError naming it (by its absolute path)."""
    if not Path(test_dir).is_dir():
        what = "not a folder" if Path(test_dir).exists() else "not found"
        raise UserError(f"test folder {Path(test_dir).absolute()}: {what}")


def cap_problems(problems: list[str], limit: int | None = MAX_PROBLEMS) -> list[str]:
    """The first ``limit`` problems and a ``... and N more problems`` line."""
    if limit is None or len(problems) <= limit:
        return list(problems)
    return problems[:limit] + [f"... and {len(problems) - limit} more problems"]


def _quote_ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOW_IDS])
    return shown + (f", ... {len(ids) - _SHOW_IDS} more" if len(ids) > _SHOW_IDS else "")
