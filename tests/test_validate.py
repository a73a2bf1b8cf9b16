"""Submission files: the writer's exact formats, all-or-nothing writes, and the validator."""

import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from infer.submission import (
    SubmissionNameError,
    cap_problems,
    parse_submission,
    set_problems,
    validate_file,
    write_submission,
)
from infer.validate import main
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 26  # ids 0..25: 2 and 10 are both present, so string order and natural order differ


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("test_images")
    for i in range(N_IMAGES):
        Image.new("RGB", (4, 4), (i * 9, 0, 0)).save(folder / f"{i}.png")
    return folder


def shuffled_predictions(seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    ids = list(range(N_IMAGES))
    rng.shuffle(ids)
    return ids, [rng.randrange(20) for _ in ids]


def read_back(path: Path) -> tuple[dict[int, int], list[str]]:
    parsed = parse_submission(path)
    return parsed.predictions, parsed.problems


def problems_of(path: Path, test_dir: Path, num_classes: int | None) -> list[str]:
    return validate_file(path, test_dir, num_classes).problems


def write_file(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def all_files(folder: Path) -> list[str]:
    """Every entry, hidden temps and backups included."""
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------ writer formats


def test_round_trip_csv_and_json_validate(tmp_path, test_dir):
    ids, preds = shuffled_predictions()
    paths = write_submission(tmp_path, "sub", ids, preds, {"model": "test_convnext"})
    assert paths == {"csv": tmp_path / "sub.csv", "json": tmp_path / "sub.json", "meta": tmp_path / "sub.meta.json"}
    expected = dict(zip(ids, preds))
    for key in ("csv", "json"):
        parsed, problems = read_back(paths[key])
        assert problems == [] and parsed == expected
        check = validate_file(paths[key], test_dir, 20)
        assert check.ok and check.n_predictions == check.n_test_images == N_IMAGES
    assert all_files(tmp_path) == ["sub.csv", "sub.json", "sub.meta.json"]  # no temp left behind


def test_csv_is_plain_sorted_naturally_with_unix_newlines(tmp_path):
    ids, preds = shuffled_predictions(1)
    # numpy values (as a model's argmax gives them) must come out as plain integers
    path = write_submission(tmp_path, "np", np.array(ids), np.array(preds, dtype=np.int64), {})["csv"]
    data = path.read_bytes()
    assert b"\r" not in data and data.endswith(b"\n")
    lines = data.decode().split("\n")[:-1]
    assert lines[0] == "image_id,category_id"
    rows = [tuple(map(int, line.split(","))) for line in lines[1:]]
    assert [r[0] for r in rows] == list(range(N_IMAGES))  # 2 before 10, not "10" before "2"
    assert dict(rows) == dict(zip(ids, preds))
    assert all(line.count(",") == 1 and line.replace(",", "").isdigit() for line in lines[1:])


def test_json_is_exactly_the_challenge_form(tmp_path):
    ids, preds = shuffled_predictions(2)
    path = write_submission(tmp_path, "sub", ids, preds, {})["json"]
    entries = json.loads(path.read_text(encoding="utf-8"))
    assert entries == [{"image_id": i, "category_id": dict(zip(ids, preds))[i]} for i in range(N_IMAGES)]
    for entry in entries:
        assert list(entry) == ["image_id", "category_id"]
        assert all(type(v) is int for v in entry.values())
    # one object per line between the brackets
    assert len(path.read_text().splitlines()) == N_IMAGES + 2


def test_meta_keeps_the_callers_keys_and_adds_counts(tmp_path):
    ids, preds = [3, 1, 2, 0], [5, 5, 7, 0]
    meta_in = {
        "checkpoint": tmp_path / "best.safetensors",
        "val_acc": np.float32(0.5),
        "nan": float("nan"),
        "tta": {"hflip": True, "scales": (1.0, 1.15)},
    }
    path = write_submission(tmp_path, "m", ids, preds, meta_in)["meta"]
    meta = json.loads(path.read_text())  # strict JSON: NaN was turned into null
    assert meta["checkpoint"] == str(tmp_path / "best.safetensors")
    assert meta["val_acc"] == 0.5 and meta["nan"] is None
    assert meta["tta"] == {"hflip": True, "scales": [1.0, 1.15]}
    assert meta["n_images"] == 4 and meta["n_classes_predicted"] == 3
    assert meta["class_histogram"] == {"0": 1, "5": 2, "7": 1}
    assert "NaN" not in path.read_text()


@pytest.mark.parametrize(
    "ids, preds, message",
    [
        ([0, 1], [1], "2 image ids but 1 predictions"),
        ([0, 1, 0], [1, 2, 3], "duplicate image ids: 0"),
        ([0, 1.0], [1, 2], "image id #1 is 1.0"),
        ([0, 1], [1, 2.0], "prediction #1 is 2.0"),
        ([0, 1], [True, 2], "prediction #0 is True"),
        (["0", 1], [1, 2], "image id #0 is '0'"),
        ([], [], "no predictions"),
    ],
)
def test_write_rejects_bad_predictions(tmp_path, ids, preds, message):
    with pytest.raises(ValueError, match=message):
        write_submission(tmp_path / "out", "sub", ids, preds, {})
    assert not (tmp_path / "out").exists() or all_files(tmp_path / "out") == []


@pytest.mark.parametrize("name", ["", ".", "..", "../sub", "a/b", "a\\b", ".hidden", "sub.csv", "sub.json", " sub"])
def test_write_rejects_names_that_are_not_plain(tmp_path, name):
    with pytest.raises(SubmissionNameError, match="submission name") as info:
        write_submission(tmp_path / "out", name, [0], [1], {})
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert all_files(tmp_path) == []


def test_write_rejects_meta_that_is_not_json(tmp_path):
    with pytest.raises(ValueError, match=r"meta\.model"):
        write_submission(tmp_path, "sub", [0], [1], {"model": object()})
    assert all_files(tmp_path) == []


# ------------------------------------------------------------------------------- all or nothing


def fail_on_call(monkeypatch, module, attr: str, call: int) -> list:
    """Make ``module.attr`` raise OSError on its ``call``-th use (1-based); later calls work."""
    real = getattr(module, attr)
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise OSError(f"simulated failure of {attr}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, fake)
    return calls


def test_failed_rename_leaves_no_file(tmp_path, monkeypatch):
    calls = fail_on_call(monkeypatch, os, "replace", 2)  # CSV renamed, then the JSON rename fails
    with pytest.raises(OSError, match="simulated"):
        write_submission(tmp_path, "sub", [0, 1], [1, 2], {})
    assert len(calls) >= 2
    assert all_files(tmp_path) == []  # the CSV already in place was taken back, temps removed


def test_failed_rename_leaves_the_older_submission_untouched(tmp_path, monkeypatch):
    old = write_submission(tmp_path, "sub", [0, 1], [1, 2], {"run": "old"})
    before = {p.name: p.read_bytes() for p in old.values()}
    fail_on_call(monkeypatch, os, "replace", 3)  # CSV and JSON replaced, the meta rename fails
    with pytest.raises(OSError, match="simulated"):
        write_submission(tmp_path, "sub", [0, 1], [7, 8], {"run": "new"})
    assert {name: (tmp_path / name).read_bytes() for name in all_files(tmp_path)} == before


def test_failed_temp_write_leaves_the_older_submission_untouched(tmp_path, monkeypatch):
    old = write_submission(tmp_path, "sub", [0, 1], [1, 2], {"run": "old"})
    before = {p.name: p.read_bytes() for p in old.values()}
    fail_on_call(monkeypatch, os, "fsync", 2)  # the second temp file cannot be flushed
    with pytest.raises(OSError, match="simulated"):
        write_submission(tmp_path, "sub", [0, 1], [7, 8], {"run": "new"})
    assert {name: (tmp_path / name).read_bytes() for name in all_files(tmp_path)} == before


def test_a_mixed_set_is_named_by_validate(tmp_path, test_dir, capsys):
    ids, preds = shuffled_predictions()
    a = write_submission(tmp_path / "a", "sub", ids, preds, {})
    b = write_submission(tmp_path / "b", "sub", ids, [(p + 1) % 20 for p in preds], {})
    args = ["--test-dir", str(test_dir), "--num-classes", "20"]
    assert set_problems(a["csv"]) == [] and main([str(a["csv"]), *args]) == 0
    b["csv"].replace(a["csv"])  # the CSV of one run beside the JSON and meta of another, each valid alone
    for kind in ("csv", "json", "meta"):
        assert set_problems(a[kind]) == [
            f"{a['csv']}: not the file sub.meta.json describes (its sha256 differs): the set "
            "sub.csv/.json/.meta.json mixes files of different runs"
        ]
    capsys.readouterr()
    assert main([str(a["json"]), *args]) == 1
    assert "mixes files of different runs" in capsys.readouterr().out


def test_a_submit_of_the_same_name_between_the_renames_is_detected(tmp_path, monkeypatch):
    # Two writers without a shared lock (two machines on a file system without working locks):
    # the other one publishes its whole set between our first and second rename.
    real_replace, calls = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            monkeypatch.setattr(os, "replace", real_replace)
            write_submission(tmp_path, "sub", [0, 1], [5, 6], {"run": "other"})

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=r"sub.csv: not the file sub.meta.json describes .*another command wrote"):
        write_submission(tmp_path, "sub", [0, 1], [1, 2], {"run": "ours"})
    assert set_problems(tmp_path / "sub.json") != []  # and validate says so, for good


def test_success_replaces_every_file_of_the_older_submission(tmp_path):
    write_submission(tmp_path, "sub", [0, 1, 2], [1, 2, 3], {"run": "old"})
    paths = write_submission(tmp_path, "sub", [0, 1], [7, 8], {"run": "new"})
    assert all_files(tmp_path) == ["sub.csv", "sub.json", "sub.meta.json"]
    for key in ("csv", "json"):
        assert read_back(paths[key]) == ({0: 7, 1: 8}, [])
    assert json.loads(paths["meta"].read_text())["run"] == "new"


# ------------------------------------------------------------------------------ parse problems


HEADER = "image_id,category_id\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("id,label\n0,1\n", "x.csv:1: header must be 'image_id,category_id', found 'id,label'"),
        ("category_id,image_id\n0,1\n", "x.csv:1: header must be"),
        ("0,1\n1,2\n", "x.csv:1: missing header"),
        (HEADER + "0,1\n1,2,3\n", "x.csv:3: expected 2 columns (image_id,category_id), found 3"),
        (HEADER + "0\n", "x.csv:2: expected 2 columns (image_id,category_id), found 1"),
        (HEADER + "3.0,1\n", "x.csv:2: image_id '3.0' is not an integer"),
        (HEADER + "0,abc\n", "x.csv:2: category_id 'abc' is not an integer"),
        (HEADER + "0,\n", "x.csv:2: category_id '' is not an integer"),
        (HEADER + "0, 1\n", "x.csv:2: category_id ' 1' is not an integer"),
        (HEADER + '"0",1\n', "x.csv:2: image_id '\"0\"' is not an integer"),
        (HEADER + "0,1\n1,2\n0,3\n", "x.csv:4: duplicate image_id 0 (first at line 2)"),
        (HEADER + "0,1\n\n1,2\n", "x.csv:3: blank line"),
        ("", "x.csv:1: empty file"),
    ],
)
def test_csv_problems_name_the_line(tmp_path, text, problem):
    _, problems = read_back(write_file(tmp_path / "x.csv", text))
    assert any(p.startswith(f"{tmp_path}{os.sep}{problem}") for p in problems), problems


def test_csv_keeps_good_rows_around_bad_ones(tmp_path):
    path = write_file(tmp_path / "x.csv", HEADER + "0,1\n1,x\n2,3\n0,9\n")
    parsed, problems = read_back(path)
    assert parsed == {0: 1, 2: 3}  # the duplicate keeps the first value
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:3", f"{path}:5"]


def test_csv_accepts_crlf_and_a_missing_final_newline(tmp_path):
    for name, text in (("crlf.csv", "image_id,category_id\r\n0,1\r\n10,2\r\n"), ("nofinal.csv", HEADER + "0,1\n10,2")):
        assert read_back(write_file(tmp_path / name, text)) == ({0: 1, 10: 2}, [])


def test_csv_bom_is_reported_but_the_rows_are_still_read(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "0,1\n").encode())
    parsed, problems = read_back(path)
    assert parsed == {0: 1}
    assert len(problems) == 1 and problems[0].startswith(f"{path}:1: ") and "byte-order mark" in problems[0]


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + b"0,1\n1,\xe9\n")
    parsed, problems = read_back(path)
    assert parsed == {} and len(problems) == 1
    assert problems[0].startswith(f"{path}:3: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            '[{"image_id": 0, "category_id": 1},\n {"image_id": 1 "category_id": 2}]',
            "invalid JSON at line 2 column 17: Expecting ','",
        ),
        ('{"0": 1}', "expected a JSON array of"),
        ('[{"image_id": 0, "category_id": 1}, [1, 2]]', "entry 1: expected an object, found array"),
        ('[{"image_id": 0}]', "entry 0: missing key(s) 'category_id'"),
        ('[{"image_id": 0, "category_id": 1, "score": 0.9}]', "entry 0: unexpected key(s) 'score'"),
        (
            '[{"image_id": 0, "category_id": 1}, {"image_id": 1, "category_id": 2.0}]',
            "entry 1: category_id must be an integer, found number 2.0",
        ),
        ('[{"image_id": "0", "category_id": 1}]', 'entry 0: image_id must be an integer, found string "0"'),
        ('[{"image_id": true, "category_id": 1}]', "entry 0: image_id must be an integer, found boolean true"),
        ('[{"image_id": null, "category_id": 1}]', "entry 0: image_id must be an integer, found null"),
        (
            '[{"image_id": 0, "category_id": 1}, {"image_id": 0, "category_id": 2}]',
            "entry 1: duplicate image_id 0 (first at entry 0)",
        ),
        ('[{"image_id": 0, "category_id": 1, "category_id": 2}]', "entry 0: repeated key(s) 'category_id'"),
    ],
)
def test_json_problems_name_the_entry(tmp_path, text, problem):
    path = write_file(tmp_path / "x.json", text)
    _, problems = read_back(path)
    assert f"{path}: {problem}" in "\n".join(problems), problems


def test_json_bom_and_bad_values_leave_the_good_entries(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'[{"image_id": 2, "category_id": 1}, {"image_id": 10, "category_id": 1.5}]')
    parsed, problems = read_back(path)
    assert parsed == {2: 1}
    assert len(problems) == 2 and "byte-order mark" in problems[0] and "entry 1" in problems[1]


def test_unknown_extension_and_missing_file(tmp_path):
    assert read_back(write_file(tmp_path / "x.txt", HEADER))[1] == [
        f"{tmp_path / 'x.txt'}: unknown submission type '.txt'; expected a .csv or .json file"
    ]
    assert read_back(tmp_path / "nope.csv") == ({}, [f"{tmp_path / 'nope.csv'}: file not found"])


# ------------------------------------------------------------------------ checks against the test set


def csv_text(rows) -> str:
    return HEADER + "".join(f"{i},{c}\n" for i, c in rows)


def test_missing_and_extra_ids_are_summarised(tmp_path, test_dir):
    rows = [(i, 0) for i in range(N_IMAGES) if i not in (3, 10, 25)] + [(99, 0), (-1, 0)]
    path = write_file(tmp_path / "s.csv", csv_text(rows))
    problems = problems_of(path, test_dir, 20)
    assert problems == [
        f"{path}: 3 of {N_IMAGES} test images have no valid prediction (image_id 3, 10, 25)",
        # rows[k] is on line k + 2 (after the header): 99 and -1 are the last two rows
        f"{path}: 2 image_id(s) not in the test folder {test_dir} "
        f"(99 at {path}:{len(rows)}, -1 at {path}:{len(rows) + 1})",
    ]


def test_labels_out_of_range_name_the_line(tmp_path, test_dir):
    rows = [(i, i % 5) for i in range(N_IMAGES)]
    rows[4] = (4, 5)  # line 6
    rows[7] = (7, -2)  # line 9
    path = write_file(tmp_path / "s.csv", csv_text(rows))
    assert problems_of(path, test_dir, 5) == [
        f"{path}:6: category_id 5 is outside [0, 5)",
        f"{path}:9: category_id -2 is negative",
    ]
    # without a class count only negative labels are wrong
    assert problems_of(path, test_dir, None) == [f"{path}:9: category_id -2 is negative"]
    assert problems_of(path, test_dir, 6) == [f"{path}:9: category_id -2 is negative"]


def test_json_labels_out_of_range_name_the_entry(tmp_path, test_dir):
    entries = [{"image_id": i, "category_id": 0} for i in range(N_IMAGES)]
    entries[12]["category_id"] = 20
    path = write_file(tmp_path / "s.json", json.dumps(entries))
    assert problems_of(path, test_dir, 20) == [f"{path}: entry 12: category_id 20 is outside [0, 20)"]


def test_unreadable_file_is_one_problem_not_a_list_of_missing_images(tmp_path, test_dir):
    assert problems_of(tmp_path / "nope.json", test_dir, 20) == [f"{tmp_path / 'nope.json'}: file not found"]
    bad = write_file(tmp_path / "bad.json", "[{")
    assert len(problems_of(bad, test_dir, 20)) == 1


def test_listing_is_capped(tmp_path, test_dir):
    rows = [(i, 50) for i in range(N_IMAGES)]
    path = write_file(tmp_path / "s.csv", csv_text(rows))
    problems = problems_of(path, test_dir, 20)
    capped = cap_problems(problems)  # what `validate` prints by default
    assert len(capped) == 21 and capped[-1] == f"... and {N_IMAGES - 20} more problems"
    assert len(problems) == N_IMAGES and cap_problems(problems, None) == problems


def test_bad_test_folder_is_a_user_error(tmp_path, test_dir):
    good = write_submission(tmp_path / "out", "s", list(range(N_IMAGES)), [0] * N_IMAGES, {})["csv"]
    with pytest.raises(UserError, match="not found"):
        problems_of(good, tmp_path / "missing", 20)
    with pytest.raises(UserError, match="not a folder"):
        problems_of(good, good, 20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        problems_of(good, tmp_path / "empty", 20)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_exit_codes(tmp_path, test_dir, capsys):
    ids, preds = shuffled_predictions()
    paths = write_submission(tmp_path, "sub", ids, preds, {})
    for key in ("csv", "json"):
        assert main([str(paths[key]), "--test-dir", str(test_dir), "--num-classes", "20"]) == 0
        assert capsys.readouterr().out == f"{paths[key]}: OK ({N_IMAGES} predictions for {N_IMAGES} test images)\n"

    broken = write_file(tmp_path / "broken.csv", csv_text([(i, 0) for i in range(N_IMAGES - 1)] + [(0, 3)]))
    assert main([str(broken), "--test-dir", str(test_dir), "--num-classes", "20"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{broken}: 1 of {N_IMAGES} test images have no valid prediction (image_id {N_IMAGES - 1})",
        f"{broken}:{N_IMAGES + 1}: duplicate image_id 0 (first at line 2)",
        f"{broken}: INVALID (2 problems)",
    ]

    assert main([str(paths["csv"]), "--test-dir", str(test_dir), "--num-classes", "2"]) == 1
    n_out_of_range = sum(p >= 2 for p in preds)
    assert n_out_of_range > 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{paths['csv']}: INVALID ({n_out_of_range} problems)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sub.csv"], "give --test-dir DIR, or --config FILE"),
        (["sub.csv", "--test-dir", "{missing}"], "test folder"),
        (["sub.csv", "--test-dir", "{test_dir}", "--num-classes", "x"], "invalid int value"),
        (["sub.csv", "--test-dir", "{test_dir}", "--num-classes", "0"], "at least 1"),
    ],
)
def test_cli_bad_usage_is_exit_2_with_one_line(tmp_path, test_dir, capsys, args, message):
    args = [a.format(missing=tmp_path / "missing", test_dir=test_dir) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_as_a_module(tmp_path, test_dir):
    ids, preds = shuffled_predictions()
    path = write_submission(tmp_path, "sub", ids, preds, {})["json"]
    ok = run_module("infer.validate", str(path), "--test-dir", str(test_dir), "--num-classes", "20", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{path}: OK ({N_IMAGES} predictions for {N_IMAGES} test images)"
    usage = run_module("infer.validate", str(path), timeout=120)
    assert usage.returncode == 2 and usage.stderr.startswith("error: ") and "--test-dir" in usage.stderr


def test_cli_takes_the_class_count_from_the_meta_file_or_the_config(tmp_path, test_dir, capsys):
    ids, preds = shuffled_predictions()  # classes up to 19
    ok = write_submission(tmp_path, "ok", ids, preds, {"config": {"data": {"num_classes": 20}}})
    assert main([str(ok["csv"]), "--test-dir", str(test_dir)]) == 0
    small = write_submission(tmp_path, "small", ids, preds, {"config": {"data": {"num_classes": 2}}})
    assert main([str(small["json"]), "--test-dir", str(test_dir)]) == 1  # out-of-range classes caught
    assert "is outside [0, 2)" in capsys.readouterr().out
    bare = write_file(tmp_path / "bare.csv", csv_text(list(zip(ids, preds))))
    assert main([str(bare), "--test-dir", str(test_dir)]) == 2  # nothing says how many classes: refuse
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "give --num-classes N or --config FILE" in err and "bare.meta.json" in err
    config = write_file(tmp_path / "c.yaml", "data:\n  num_classes: 2\n")
    assert main([str(bare), "--test-dir", str(test_dir), "--config", str(config)]) == 1
    write_file(tmp_path / "bare.meta.json", "[" * 100_000 + "]" * 100_000)  # nested past Python's recursion limit
    assert main([str(bare), "--test-dir", str(test_dir)]) == 2  # unreadable meta: refused in one line, no traceback
    assert "give --num-classes N" in capsys.readouterr().err


def test_new_files_are_validated_before_they_replace_the_old_ones(tmp_path, test_dir):
    ids, preds = shuffled_predictions()
    old = write_submission(tmp_path, "sub", ids, preds, {"run": 1}, test_dir, 20)
    before = {k: p.read_bytes() for k, p in old.items()}
    with pytest.raises(UserError, match=r"sub.csv: failed validation, nothing written: .*category_id 25 is outside"):
        write_submission(tmp_path, "sub", ids, [25] * len(ids), {"run": 2}, test_dir, 20)
    assert {k: p.read_bytes() for k, p in old.items()} == before
    assert all_files(tmp_path) == ["sub.csv", "sub.json", "sub.meta.json"]  # no temporary file left


def test_command_line_paths_are_taken_from_the_users_folder(tmp_path, test_dir):
    ids, preds = shuffled_predictions()
    write_submission(tmp_path / "out", "sub", ids, preds, {"config": {"data": {"num_classes": 20}}})
    os.symlink(test_dir, tmp_path / "images")

    def run_sh(*args: str) -> subprocess.CompletedProcess:  # run.sh from another folder than the repository
        return subprocess.run([str(ROOT / "run.sh"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ok = run_sh("validate", "out/sub.csv", "--test-dir", "images")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK (26 predictions for 26 test images)"), ok.stderr
    missing = run_sh("validate", "out/sub.csv", "--test-dir", "nope")
    assert missing.returncode == 2 and f"test folder {tmp_path / 'nope'}: not found" in missing.stderr


def test_cli_takes_the_test_folder_from_the_config(tmp_path, test_dir, capsys):
    # `validate FILE --config C` used to demand --test-dir although the config names the folder.
    ids, preds = shuffled_predictions()
    bare = write_file(tmp_path / "bare.csv", csv_text(list(zip(ids, preds))))
    config = write_file(
        tmp_path / "c.yaml", f"data:\n  root: {test_dir.parent}\n  test_dir: {test_dir.name}\n  num_classes: 20\n"
    )
    assert main([str(bare), "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"{bare}: OK ({N_IMAGES} predictions for {N_IMAGES} test images)"
    assert main([str(bare)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: validate: which test images? give --test-dir DIR, or --config FILE to use its data.test_dir"
    )
