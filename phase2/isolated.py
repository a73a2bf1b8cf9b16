"""Run a command whose code we do not trust (a submission's ``model.py``) so that nothing of it
outlives the call, and so that what it prints cannot pass for our result.

* It runs in a session of its own; when it ends, or at the time limit, its whole process group
  and session are killed, and so is every process it started that left them: this process is
  made a "child subreaper" for the call (``prctl(PR_SET_CHILD_SUBREAPER)``), so an orphaned
  daemon (double fork, ``setsid``) is re-parented here, found and killed.
* Its stdout and stderr go to one unnamed temporary file, of which only the last few KB are
  read back (a command printing 100 MB costs no memory here); nothing waits for the file to be
  closed, so a background process that keeps it open stalls nothing.
* Results travel on another unnamed temporary file whose descriptor only the command's own
  reporting code is told about (``--result-fd=N``, read and removed from ``sys.argv`` before any
  untrusted code runs): one JSON object per line. Printing ``RESULT ...`` on stdout or ending the
  process with exit code 0 reports nothing. (Code running inside that same process could still
  find the descriptor in ``/proc/self/fd``: the channel stops accidents and cheap fakes, not a
  submission written to attack the checker, which no in-process channel can.)
* It runs in a box (:mod:`phase2.box`) where the kernel allows one: Linux user, mount, PID and
  network namespaces through util-linux ``unshare``, tried once per process. In the box every
  mount is read-only but a private tmpfs on ``/dev/shm`` (its working folder; it vanishes with the
  box), ``/proc`` shows the box's own processes only, there is no network, and when the box's
  first process ends or is killed the kernel kills every process in it. Without a box it runs
  in a private temporary folder that this process removes, and :attr:`Box.line` names the risk.
* Either way it gets SIGKILL when this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``, set
  by ``box.py --parent`` before anything else runs), and its environment keeps no keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

OUTPUT_TAIL_BYTES = 8192
RESULT_LIMIT_BYTES = 64 << 20
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
# What the command keeps of our environment (no API keys or tokens for code we do not trust).
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
BOX_SCRIPT = Path(__file__).resolve().with_name("box.py")
UNSHARE_FLAGS = ("--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "--mount-proc")
BOX_WORKDIR = "/dev/shm/work"  # inside the box: on its private tmpfs (phase2.box.PRIVATE)
NO_BOX_RISK = (
    "model.py can write wherever this user can, reach the network and read other processes' /proc, "
    "and a SIGKILLed checker leaves its temp folder; "
    "it keeps no keys in its environment, dies with the checker and is stopped at the time limit"
)


@dataclass(frozen=True)
class Box:
    """How the command is boxed: ``prefix`` (empty: no box) and one line saying what is used."""

    prefix: tuple[str, ...]
    line: str


def _python(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-I", str(script), *args]


@functools.lru_cache(maxsize=1)
def find_box() -> Box:
    """The namespaces box where a trial run of it works here, else none and the risk in one line."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return Box((), f"none (no util-linux `unshare` on PATH): {NO_BOX_RISK}")
    prefix = (unshare, *UNSHARE_FLAGS, "--kill-child=SIGKILL")
    nothing = [sys.executable, "-I", "-c", ""]
    trial = [*prefix, *_python(BOX_SCRIPT, "--inside", "--tmp-size", str(1 << 20), "--"), *nothing]
    try:
        done = subprocess.run(trial, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Box((), f"none (unshare: {type(exc).__name__}): {NO_BOX_RISK}")
    if done.returncode != 0:
        why = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return Box((), f"none (no user namespaces here: {why[:160]}): {NO_BOX_RISK}")
    return Box(
        prefix,
        "Linux namespaces (unshare: user, mount, pid, net): read-only file system but its own tmpfs, "
        "no network, no other process visible, all in it killed when it ends or the checker dies",
    )


@dataclass
class Finished:
    """How an isolated command ended and what it reported."""

    returncode: int | None  # None: stopped at the time limit
    timed_out: bool
    output_tail: str
    results: dict = field(default_factory=dict)  # the JSON lines it reported, merged in order
    garbled: bool = False  # its result channel held something other than JSON lines
    stopped: int = 0  # processes it left running that were killed
    box: str = ""  # what it ran in (:attr:`Box.line`)


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _processes(zombies: bool = False) -> dict[int, list[str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and (zombies or fields[0] != "Z"):
                found[int(entry)] = fields
    return found


def _children(ppid: int, zombies: bool = False) -> set[int]:
    return {pid for pid, f in _processes(zombies).items() if int(f[1]) == ppid}


def _subreaper(flag: int) -> int | None:
    """Set this process's child-subreaper flag; returns the previous one (None where unsupported)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
            return None
        libc.prctl(_PR_SET_CHILD_SUBREAPER, flag, 0, 0, 0)
        return previous.value
    except (OSError, AttributeError):
        return None


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_everything(proc: subprocess.Popen, ours_before: set[int], boxed: bool) -> int:
    """Kill ``proc``, its group and session and every process it left behind; returns how many of
    those others were still running when it ended (or reached the time limit). Boxed, ``proc`` is
    ``unshare``, and its child (the box's first process, the command itself) is not counted."""
    me = os.getpid()
    ours_before = ours_before | (_children(proc.pid) if boxed else set())

    def strays() -> set[int]:
        return {
            pid
            for pid, f in _processes().items()
            if pid not in ours_before
            and pid not in (me, proc.pid)
            and (proc.pid in (int(f[2]), int(f[3])) or int(f[1]) == me)  # its group, its session, orphans
        }

    left = strays()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    for _ in range(50):  # a killed process's children are re-parented here: a few rounds catch them all
        found = strays()
        if not found:
            break
        left |= found
        for pid in found:
            _kill(pid)
        time.sleep(0.02)
    for pid in _children(me, zombies=True) - ours_before:  # those re-parented here are ours to reap
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return len(left)


def _tail(fh) -> str:
    size = os.fstat(fh.fileno()).st_size
    fh.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return fh.read().decode("utf-8", "replace")


def _read_results(fh) -> tuple[dict, bool]:
    fh.seek(0)
    data = fh.read(RESULT_LIMIT_BYTES + 1)
    merged, garbled = {}, len(data) > RESULT_LIMIT_BYTES
    for line in data[:RESULT_LIMIT_BYTES].decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            garbled = True
            continue
        if isinstance(item, dict):
            merged.update(item)
        else:
            garbled = True
    return merged, garbled


def run_isolated(
    argv_for: Callable[[str], Sequence[str]], timeout: float, tmp_size: int, pass_fds: Sequence[int] = ()
) -> Finished:
    """Run the command ``argv_for(workdir)`` (its reporting code takes ``--result-fd=N``, appended
    here) isolated as the module docstring says; at most ``timeout`` seconds. ``workdir``: its own
    empty folder (in the box, on a tmpfs of ``tmp_size`` bytes); ``pass_fds``: descriptors it inherits."""
    box = find_box()
    with contextlib.ExitStack() as stack:
        if box.prefix:
            workdir, cwd = BOX_WORKDIR, "/"
            inner = [*box.prefix, *_python(BOX_SCRIPT, "--inside", "--tmp-size", str(tmp_size), "--")]
        else:
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="phase2_check_"))
            workdir, inner = os.path.join(cwd, "work"), []
        done = _run(
            [*_python(BOX_SCRIPT, "--parent", str(os.getpid()), "--"), *inner, *argv_for(workdir)],
            timeout,
            cwd,
            pass_fds,
            bool(box.prefix),
        )
    done.box = box.line
    return done


def _run(argv: list[str], timeout: float, cwd: str, pass_fds: Sequence[int], boxed: bool) -> Finished:
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as results:
        ours_before = _children(os.getpid())
        previous = _subreaper(1)
        try:
            proc = subprocess.Popen(
                [*argv, f"--result-fd={results.fileno()}"],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(results.fileno(), *pass_fds),
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                stopped = _stop_everything(proc, ours_before, boxed)
        finally:
            if previous is not None:
                _subreaper(previous)
        merged, garbled = _read_results(results)
        return Finished(None if timed_out else proc.returncode, timed_out, _tail(output), merged, garbled, stopped)
