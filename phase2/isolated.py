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
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

OUTPUT_TAIL_BYTES = 8192
RESULT_LIMIT_BYTES = 64 << 20
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
# What the command keeps of our environment (no API keys or tokens for code we do not trust).
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Finished:
    """How an isolated command ended and what it reported."""

    returncode: int | None  # None: stopped at the time limit
    timed_out: bool
    output_tail: str
    results: dict = field(default_factory=dict)  # the JSON lines it reported, merged in order
    garbled: bool = False  # its result channel held something other than JSON lines
    stopped: int = 0  # processes it left running that were killed


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


def _stop_everything(proc: subprocess.Popen, ours_before: set[int]) -> int:
    """Kill ``proc``, its group and session and every process it left behind; returns how many of
    those others were still running when it ended (or reached the time limit)."""
    me = os.getpid()

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


def run_isolated(argv: Sequence[str], timeout: float, cwd: Path) -> Finished:
    """Run ``argv`` (its reporting code takes ``--result-fd=N``, appended here) isolated as the
    module docstring says; at most ``timeout`` seconds."""
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
                pass_fds=(results.fileno(),),
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                stopped = _stop_everything(proc, ours_before)
        finally:
            if previous is not None:
                _subreaper(previous)
        merged, garbled = _read_results(results)
        return Finished(None if timed_out else proc.returncode, timed_out, _tail(output), merged, garbled, stopped)
