"""Who writes where (core.outputs): one holder per output, dead holders taken over, other hosts
never guessed at, and no stage writing over another stage's files."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.checkpoint import export_model
from core.config import load_config
from core.errors import UserError
from core.model import create_classifier
from core.outputs import HOST, OutputLock, acquire, check_outputs, claim_names, lock_path_of, record_owner
from infer.submission import write_submission
from tests.conftest import ROOT, run_module, shrink

# A process that takes the lock of argv[1], starts a child that lives on (as a DataLoader worker
# would), prints the child's PID and is then killed outright, as SIGKILL or the OOM killer do.
KILLED_HOLDER = """
import os, signal, sys, time
from pathlib import Path
from core.outputs import acquire
lock = acquire(Path(sys.argv[1]), "train", "name")
child = os.fork()
if child == 0:
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # let the parent's pipe close when the parent dies
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# A process that holds the lock of argv[1] until its stdin closes.
LIVE_HOLDER = """
import sys
from pathlib import Path
from core.outputs import acquire
with acquire(Path(sys.argv[1]), "evaluate", "eval.out_dir"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env, text=True, **kwargs)


def test_a_second_command_for_the_same_output_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "runs" / "demo"
    holder = _python(LIVE_HOLDER, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            acquire(out, "train", "name")
        message = str(refused.value)
        assert message.startswith(f"{out}: in use by evaluate (pid {holder.pid} on {HOST}, started ")
        assert message.endswith(": wait for it to end or stop it, or use another name")
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with acquire(out, "train", "name"):  # released with its holder: free again
        assert json.loads(lock_path_of(out).read_text())["pid"] == os.getpid()
    assert not lock_path_of(out).exists() and not (tmp_path / "runs").exists()  # nothing left behind


def test_a_killed_holder_is_taken_over_even_while_a_child_it_forked_lives(tmp_path, capsys):
    out = tmp_path / "submissions" / "demo"
    proc = _python(KILLED_HOLDER, str(out), stdout=subprocess.PIPE)
    child = int(proc.communicate(timeout=120)[0])
    try:
        assert proc.returncode == -signal.SIGKILL
        assert json.loads(lock_path_of(out).read_text())["pid"] == proc.pid  # the kill left it behind
        with acquire(out, "submit", "submit.file_name") as lock:
            assert lock.taken_over is not None and lock.taken_over.pid == proc.pid
            assert json.loads(lock_path_of(out).read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
    note = capsys.readouterr().err
    assert f"was locked by train (pid {proc.pid} on {HOST}" in note and "lock taken over" in note


# A holder that ends without releasing its lock; its parent (the test) has not reaped it yet.
EXITED_HOLDER = """
import os, sys
from pathlib import Path
from core.outputs import acquire
lock = acquire(Path(sys.argv[1]), "train", "name")
print("held", flush=True)
os._exit(0)
"""


def test_a_holder_that_has_ended_but_is_not_yet_reaped_is_taken_over(tmp_path):
    # A stopped run's process stays a zombie until its parent reaps it, with its PID and start time
    # still in /proc: a resume started at that moment was refused as "in use" by a process that no
    # longer runs (test_launch's SIGINT test met it now and then).
    out = tmp_path / "runs" / "demo"
    proc = _python(EXITED_HOLDER, str(out), stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held"
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.time() + 60
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.time() < deadline:
            time.sleep(0.01)
        assert stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # ended, not reaped
        with acquire(out, "train", "name") as lock:
            assert lock.taken_over is not None and lock.taken_over.pid == proc.pid
    finally:
        proc.communicate(timeout=60)


def test_a_lock_of_another_machine_is_never_taken_over(tmp_path):
    """What a shared file system cannot guarantee: whether a run on another host still goes on.
    Such a lock stops every command here, with the way out, until it is removed by hand."""
    out = tmp_path / "runs" / "demo"
    out.parent.mkdir(parents=True)
    record = {"stage": "train", "pid": 4242, "host": "other-machine", "started": "2026-01-01", "process_start": "9"}
    lock_path_of(out).write_text(json.dumps(record))
    for _ in range(2):
        with pytest.raises(UserError, match=r"locked by train \(pid 4242 on other-machine, .*another machine"):
            acquire(out, "train", "name")
    with pytest.raises(UserError, match=rf"once it is known to be gone, delete {lock_path_of(out)}"):
        acquire(out, "train", "name")
    lock_path_of(out).unlink()
    with acquire(out, "train", "name"):
        pass


@pytest.mark.parametrize("stale", [False, True], ids=["free", "dead holder"])
def test_commands_started_at_the_same_moment_get_one_lock(tmp_path, stale):
    # Eight threads (each its own open file, so the kernel locks conflict as between processes)
    # race for one output, ten times over; with `stale`, they all find a dead holder's lock first.
    for round_ in range(10):
        out = tmp_path / f"out{round_}"
        if stale:
            out.parent.mkdir(exist_ok=True)
            dead = {"stage": "train", "pid": 1, "host": HOST, "started": "-", "process_start": "no such start"}
            lock_path_of(out).write_text(json.dumps(dead))
        barrier = threading.Barrier(8)
        results: list = []

        def race() -> None:
            barrier.wait()
            try:
                results.append(acquire(out, "submit", "submit.file_name"))
            except UserError as exc:
                results.append(exc)

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = [r for r in results if isinstance(r, OutputLock)]
        assert len(held) == 1, results
        assert all("in use by submit" in str(r) for r in results if not isinstance(r, OutputLock))
        held[0].release()


def test_no_stage_writes_over_another_stages_files(tmp_path):
    cfg = load_config(None, ["model.name=test_convnext", "data.num_classes=4", "data.image_size=32"])
    run = tmp_path / "runs" / "demo"
    export_model(
        create_classifier(cfg.model, 4), run / "best", {"arch": "test_convnext", "num_classes": 4, "image_size": 32}
    )
    claim_names(run, "train", "model checkpoint", ["best", "last"])  # what train does first in its run folder
    subs = tmp_path / "subs"
    write_submission(subs, "sub", [0, 1], [1, 2], {})
    (run / "defended.budget.json").write_text(json.dumps(record_owner("export", "exported model")))

    refused = {
        # a submission named after a checkpoint, in its run folder (even `last`, not written yet)
        ("submit", run / "best.json"): "the model checkpoint 'best'",
        ("submit", run / "last.csv"): "the model checkpoint 'last'",
        # an export over a model or a submission, an evaluation report over a submission
        ("export", run / "best.pt2"): "the model checkpoint 'best'",
        ("export", subs / "sub.json"): "the submission 'sub'",
        ("evaluate", subs / "sub.json"): "the submission 'sub'",
        # a submission over an export's files, including kinds this rule has never heard of
        ("submit", run / "defended.onnx"): "the exported model 'defended'",
    }
    for (stage, path), owner in refused.items():
        with pytest.raises(UserError, match=rf"^key: {stage} would write {path}, which belongs to {owner}"):
            check_outputs([path], stage, "key")
    check_outputs([subs / "sub.csv", subs / "sub.meta.json", subs / "best.csv"], "submit", "key")  # its own
    check_outputs([run / "defended.pt2", run / "eval" / "eval.json"], "export", "key")


@pytest.mark.slow
def test_a_second_training_of_one_name_is_refused_and_a_killed_one_is_taken_over(tiny_data, tmp_path):
    out = tmp_path / "runs"
    long_run = shrink(["train.epochs=50", "train.checkpoint_every=2"], tiny_data, out)
    first = subprocess.Popen(
        [sys.executable, "-m", "train.main", *long_run],
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not any((out / "demo" / "checkpoints").glob("e*[0-9]")) and first.poll() is None:
            assert time.time() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.2)
        second = run_module("train.main", *shrink(["train.epochs=1", "resume=auto"], tiny_data, out), timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: {out / 'demo'}: in use by train (pid {first.pid} on {HOST}, started ")
        assert line.endswith(": wait for it to end or stop it, or use another name")
    finally:
        first.kill()  # SIGKILL: the lock file stays, its kernel lock goes with the process
        first.wait()
    resumed = run_module("train.main", *shrink(["train.epochs=1", "resume=auto"], tiny_data, out), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"was locked by train (pid {first.pid} on {HOST}" in resumed.stderr and "resumed from" in resumed.stdout
    assert not lock_path_of(out / "demo").exists()


@pytest.mark.slow
def test_a_multi_process_run_stops_on_a_held_lock_in_one_line_and_every_rank_stops(tiny_data, tmp_path):
    out = tmp_path / "runs"
    overrides = shrink([], tiny_data, out)
    with acquire(out / "demo", "evaluate", "eval.out_dir"):
        # through the launcher: refused before any process starts, in one line
        proc = run_module("launch", "train.main", "--num_processes", "2", *overrides, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {out / 'demo'}: in use by evaluate (pid ")
        # a lock taken after that look (or accelerate started by hand): the main process is refused,
        # every rank learns it and stops; none waits at a barrier for the others
        accelerate = ["accelerate.commands.launch", "--multi_gpu"]
        ranks = run_module(*accelerate, "--num_processes", "2", "-m", "train.main", *overrides, timeout=300)
    assert ranks.returncode != 0
    errors = [line for line in ranks.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"in use by evaluate (pid {os.getpid()} on {HOST}" in errors[0], ranks.stderr[-3000:]
    # Every rank ended with the refusal (exit 2), or was stopped by the launcher (SIGTERM, -15) once
    # another had: which one the launcher sees first is timing. A rank waiting at a barrier would
    # have hung until the timeout instead.
    codes = re.findall(r"exitcode  : (-?\d+)", ranks.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, ranks.stderr[-3000:]


REFUSING_RANK = """
import atexit
import torch.distributed as dist
from accelerate import PartialState
from core.cli import run_cli
from core.errors import UserError

def refuse(argv):
    PartialState()  # joins the launcher's process group, as a stage's Accelerator does
    raise UserError("refused")

atexit.register(lambda: print(f"group at exit: {dist.is_initialized()}", flush=True))
raise SystemExit(run_cli(refuse))
"""


def test_a_refused_rank_ends_its_process_group_before_the_interpreter_exits(tmp_path):
    # A group left to the interpreter's exit sometimes aborts the rank (SIGABRT, "terminate called
    # without an active exception": gloo's threads meet a half torn-down interpreter, pytorch#190489),
    # so the refusal's exit code 2 is lost. That race is rare; whether the group is still up at exit is not.
    script = tmp_path / "refuse.py"
    script.write_text(REFUSING_RANK)
    proc = run_module("torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), timeout=300)
    assert proc.returncode != 0 and proc.stdout.count("group at exit: False") == 2, proc.stdout + proc.stderr[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]


def test_evaluate_refuses_a_report_over_a_submission_before_any_attack(tmp_path):
    from robust import evaluate

    subs = tmp_path / "subs"
    paths = write_submission(subs, "eval", [0, 1], [1, 2], {})  # a submission that happens to be named `eval`
    before = {p.name: p.read_bytes() for p in paths.values()}
    cfg = load_config(None, [f"eval.out_dir={subs}", f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(
        UserError, match=rf"^eval.out_dir: evaluate would write {subs}/eval.md, which belongs to the sub"
    ):
        evaluate.run(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in paths.values()} == before


@pytest.mark.parametrize("plant", ["symlink", "hard link", "another user's", "folder"])
def test_a_planted_lock_is_never_followed_or_written_through(tmp_path, plant):
    """Issue 29, item 2: a `.X.lock` planted as a link made any command truncate and write the file
    it pointed to. Whatever sits there that this pipeline did not write is refused, untouched."""
    out = tmp_path / "submissions" / "demo"
    out.parent.mkdir(parents=True)
    victim = tmp_path / "precious.txt"
    dead = {"stage": "train", "pid": 1, "host": HOST, "started": "-", "process_start": "no such start"}
    victim.write_text(json.dumps(dead) if plant == "another user's" else "precious\n")
    lock = lock_path_of(out)
    if plant == "symlink":
        lock.symlink_to(victim)
    elif plant == "hard link":
        os.link(victim, lock)
    elif plant == "folder":
        lock.mkdir()
    else:
        os.link(victim, lock)
        victim.unlink()  # one name only: the lock itself, a dead holder's, but not this user's
        os.chown(lock, 12345, 12345)
    before = lock.read_bytes() if not lock.is_dir() else b""
    for _ in range(2):
        with pytest.raises(UserError) as refused:
            acquire(out, "submit", "submit.file_name")
        message = str(refused.value)
        assert message.startswith(f"{out}: ") and "\n" not in message
        assert "not a lock file of this pipeline" in message, message
    assert (lock.read_bytes() if not lock.is_dir() else b"") == before
    if plant != "another user's":
        assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.parent.iterdir()) == [lock.name]  # no temp file left either


def test_lock_temp_files_of_killed_creators_are_removed(tmp_path):
    """Issue 29, item 12: a creator killed between creating its temp file and renaming it left
    `..X.lock.<random>.tmp` for good. The next holder removes those no live creator holds."""
    out = tmp_path / "runs" / "demo"
    out.parent.mkdir(parents=True)
    dead = out.parent / f".{lock_path_of(out).name}.ab12cd34.tmp"
    live = out.parent / f".{lock_path_of(out).name}.ef56gh78.tmp"
    young = out.parent / f".{lock_path_of(out).name}.young000.tmp"
    for temp in (dead, live, young):
        temp.write_text("{}")
    for temp in (dead, live):
        os.utime(temp, (time.time() - 60, time.time() - 60))
    held = os.open(live, os.O_RDWR)  # a creator still at work holds the kernel lock of its temp
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with acquire(out, "train", "name"):
            assert not dead.exists()
            assert live.exists() and young.exists()
    finally:
        os.close(held)


def test_a_folder_reached_by_a_symbolic_link_meets_its_holders_lock(tmp_path):
    # issue 35, 13: the lock was keyed on the path spelled, so `name=alias` (runs/alias -> runs/demo)
    # trained into a folder another run held.
    out = tmp_path / "runs" / "demo"
    out.mkdir(parents=True)
    os.symlink("demo", tmp_path / "runs" / "alias")
    os.symlink(tmp_path / "runs", tmp_path / "linked")
    os.symlink("later", tmp_path / "runs" / "soon")  # a link to a folder not made yet
    holder = _python(LIVE_HOLDER, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        for spelling in ("runs/alias", "linked/demo", "linked/alias", "runs/../runs/demo"):
            with pytest.raises(UserError, match=rf"^{tmp_path / spelling}: in use by evaluate \(pid {holder.pid} "):
                acquire(tmp_path / spelling, "train", "name")
    finally:
        holder.communicate("", timeout=60)
    with acquire(tmp_path / "runs" / "soon", "train", "name"):
        assert (tmp_path / "runs" / ".later.lock").is_file()
        with pytest.raises(UserError, match="in use by train"):
            acquire(tmp_path / "runs" / "later", "train", "name")
