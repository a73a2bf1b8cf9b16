"""Who writes where: one lock per output, and the files each stage owns.

**Locks.** A stage that writes an output (``train`` a run folder, ``submit`` a submission's three
files, ``export`` a model file, ``evaluate`` a report folder) holds ``.<output name>.lock`` beside
it for as long as it runs; a second command for the same output refuses in one line naming the
holder (stage, PID, host, start time). The file records the holder, and the holder keeps a kernel
lock (``flock``) on it:

* On one machine, exactly one holder at a time: the file is published whole by ``link()``
  (atomic, fails if it exists), already locked by its creator. A holder that ended without
  releasing it (SIGKILL, the out-of-memory killer, a power cut) has lost its kernel lock with its
  life, so the next command takes the lock over and says whose it was; the PID in the file is
  never trusted alone (PIDs are reused).
* Across machines sharing a file system (NFS): ``link()`` is atomic there too, so two commands
  started together on two machines still cannot both create the lock. But whether the holder
  still runs cannot be told from another machine (``flock`` over NFS depends on the server and
  mount options), so a lock recorded by another host is never taken over automatically: the
  message names the host, the PID and the file to delete once that run is known to be gone.
* A lock file is never followed or written through: it is opened without following a symbolic
  link, and one that is not a regular file of this user with no other name (a planted link to
  another file) is refused in one line, never truncated.

**Ownership.** :func:`check_outputs` refuses, before any work, a target file that belongs to
another stage. Each stage declares its own files: a record beside them (a JSON object with
:func:`record_owner`: the meta file of a submission, the budget report of an export, the report of
an evaluation, a checkpoint's ``<stem>.json``) or names it claims in a folder (:func:`claim_names`:
``best`` and ``last`` of a run folder before they are written). Files are grouped by stem, so a
new kind of file beside an export or a checkpoint is covered without a rule of its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.errors import UserError
from core.io import atomic_write_text, create_temp_beside, parse_json, read_json

HOST = socket.gethostname()
_ATTEMPTS = 20  # rounds of create / inspect while another command creates or releases the lock
_held_fds: set[int] = set()


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description; if it outlived
    # a killed parent it would keep the kernel lock. It closes its copy at once instead.
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as recorded in the lock file."""

    stage: str
    pid: int
    host: str
    started: str
    process_start: str = ""  # /proc/<pid>/stat start time: tells a reused PID from the holder

    def describe(self) -> str:
        return f"{self.stage} (pid {self.pid} on {self.host}, started {self.started})"


def lock_path_of(output: Path) -> Path:
    """The lock file of ``output``: hidden, beside it (so it exists before the output does), in the
    folder the output really lies in: every spelling of one output (a symbolic link to it or to a
    folder above it, ``..``, a relative path) meets one lock, and so one directory entry of one
    folder (the same device and inode, whichever path reaches it)."""
    real = Path(os.path.realpath(output))  # resolves a link even where it points to nothing yet
    return real.parent / f".{real.name}.lock"


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks after boot); "" when it is gone or has ended.

    A process that has exited but is not yet reaped (a zombie, state Z; or X) still has its
    /proc entry and start time, but holds no lock any more: it counts as ended, or a command
    started right after a stopped run would be refused until the run's parent reaps it.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return "" if fields[0] in ("Z", "X") else fields[19]
    except (OSError, IndexError):
        return ""


def _this_holder(stage: str) -> Holder:
    return Holder(stage, os.getpid(), HOST, time.strftime("%Y-%m-%dT%H:%M:%S%z"), _process_start(os.getpid()))


def _read_holder(fd: int) -> Holder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = parse_json(os.read(fd, 4096))
        return Holder(
            str(data["stage"]), int(data["pid"]), str(data["host"]), str(data["started"]), str(data["process_start"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty (a creator between create and write on a file system without link) or foreign


def _write_holder(fd: int, holder: Holder) -> None:
    data = json.dumps(vars(holder)).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _still_running(holder: Holder) -> bool:
    """Whether the recorded process runs on this host (same PID *and* start time)."""
    return holder.host == HOST and bool(holder.process_start) and _process_start(holder.pid) == holder.process_start


def same_file(path: Path, fd: int) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not replaced since it was opened)."""
    try:
        st, own = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


# What mkstemp adds between the prefix and the suffix of create_temp_beside's names.
_TEMP_PART = r"[a-z0-9_]{8}"
# A temp file of a lock this old and not held is a leftover of a creator killed between its
# create and its rename (a live creator holds the kernel lock of its temp file within microseconds).
_STALE_TEMP_SECONDS = 10.0


def _lock_temps(path: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TEMP_PART}\.tmp")
    try:
        return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []


def _remove_dead_temps(path: Path, same_as: os.stat_result | None = None) -> None:
    """Remove the temp files of lock ``path`` that killed creators left (see ``_STALE_TEMP_SECONDS``);
    with ``same_as``, only the one that is another name of that file (a creator killed between its
    ``link()`` and the unlink of its temp name)."""
    for temp in _lock_temps(path):
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if same_as is not None and (st.st_dev, st.st_ino) != (same_as.st_dev, same_as.st_ino):
                continue
            if same_as is None and (time.time() - st.st_mtime < _STALE_TEMP_SECONDS or not try_flock(fd)):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                temp.unlink(missing_ok=True)
        except OSError:
            continue
        finally:
            os.close(fd)


def _new_file_uid(folder: Path) -> int:
    """The owner a file this process creates in ``folder`` gets (another uid where an NFS server maps root)."""
    try:
        fd, tmp = create_temp_beside(folder / ".uid-probe")
    except OSError:
        return os.geteuid()
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)
        os.unlink(tmp)


def _open_existing(path: Path, flags: int) -> int | None:
    """Open the lock file at ``path`` without following a link; None if there is none.

    Raises:
        UserError: ``path`` is a symbolic link, not a regular file, another user's, or a file with
            other names (a hard link to some file): not a lock this pipeline wrote.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"the lock {path} is a symbolic link, not a lock file of this pipeline: not following it; remove it"
            ) from None
        if exc.errno == errno.EISDIR:
            raise UserError(f"the lock {path} is a folder, not a lock file of this pipeline; remove it") from None
        raise
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid not in (os.geteuid(), _new_file_uid(path.parent)):
            problem = f"belongs to another user (uid {st.st_uid})"
        elif st.st_nlink > 1:
            _remove_dead_temps(path, same_as=st)  # a creator killed between link() and the unlink of its temp
            if os.fstat(fd).st_nlink > 1:
                problem = f"has {st.st_nlink - 1} other name(s) (a hard link to another file)"
        if problem:
            raise UserError(f"the lock {path} {problem}: not a lock file of this pipeline; not writing to it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_flock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    """Take the kernel lock (``mode``: exclusive or shared) without waiting; False if another open
    file holds a conflicting one."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True  # no kernel locks on this file system: the link() exclusivity still holds
        raise
    return True


class OutputLock:
    """A held lock on one output; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, output: Path, path: Path, fd: int, taken_over: Holder | None, made: Path | None = None) -> None:
        self.output, self.path, self.fd, self.taken_over = output, path, fd, taken_over
        self.made = made  # the topmost folder the lock created (removed again if left empty)
        _held_fds.add(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if same_file(self.path, self.fd):  # still ours (we hold the kernel lock): remove it
                self.path.unlink()
        _held_fds.discard(self.fd)
        os.close(self.fd)
        self.fd = -1
        folder = self.path.parent
        while self.made is not None and folder.is_relative_to(self.made):
            try:
                folder.rmdir()  # only if empty: a failed first command leaves no empty folder behind
            except OSError:
                break
            folder = folder.parent

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_create(path: Path, holder: Holder) -> int | None:
    """Publish a new lock file holding ``holder``, already locked; its fd, or None if one exists."""
    fd, tmp = create_temp_beside(path)
    try:
        _write_holder(fd, holder)
        try_flock(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if os.stat(tmp).st_nlink != 2:  # NFS: a retried link() may report EEXIST although it worked
                os.close(fd)
                return None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            os.close(fd)
            return _create_without_link(path, holder)
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _create_without_link(path: Path, holder: Holder) -> int | None:
    """For file systems without hard links: exclusive create, then lock, then record. A command
    that finds the file in between may take it over; then our lock fails and we let it be."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    if not try_flock(fd):
        os.close(fd)
        return None
    _write_holder(fd, holder)
    return fd


def _try_take_over(path: Path, holder: Holder, key: str) -> tuple[int, Holder | None] | None:
    """Take the existing lock file if its holder has ended; None to try again (it changed meanwhile).

    Raises:
        UserError: the holder still runs, or it ran on another host (which cannot be checked).
    """
    busy_hint = f"wait for it to end or stop it, or use another {key}"
    fd = _open_existing(path, os.O_RDWR)
    if fd is None:
        return None  # released meanwhile
    try:
        if not try_flock(fd):
            previous = _read_holder(fd)
            if previous is None or (previous.host == HOST and not _still_running(previous)):
                return None  # another command is taking over from a dead holder: look again
            raise UserError(f"in use by {previous.describe()}: {busy_hint}")
        if not same_file(path, fd):
            return None  # released and removed between our open and our lock
        previous = _read_holder(fd)
        if previous is not None and previous.host != HOST:
            raise UserError(
                f"locked by {previous.describe()}, another machine ({path}); this machine cannot tell whether "
                f"that run still goes on: {busy_hint}, or, once it is known to be gone, delete {path}"
            )
        if previous is not None and _still_running(previous):
            raise UserError(f"in use by {previous.describe()}: {busy_hint}")
        _write_holder(fd, holder)
        result, fd = (fd, previous), -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def acquire(output: Path, stage: str, key: str) -> OutputLock:
    """Hold the lock of ``output`` for ``stage``, taking over one whose holder ended on this host.

    Raises:
        UserError: ``"<output>: in use by <stage> (pid P on HOST, started T): wait for it to end or
            stop it, or use another <key>"`` (``key``: the config key that names ``output``), or the
            other-host message (see the module docstring).
    """
    output = Path(output)
    path = lock_path_of(output)
    holder = _this_holder(stage)
    made = next((p for p in reversed(path.parents) if not p.exists()), None)
    for _ in range(_ATTEMPTS):
        try:
            fd = _try_create(path, holder)
            if fd is not None:
                _remove_dead_temps(path)
                return OutputLock(output, path, fd, None, made)
            taken = _try_take_over(path, holder, key)
        except UserError as exc:
            raise UserError(f"{output}: {exc}") from None
        except OSError as exc:
            raise UserError(f"{output}: cannot create the lock {path} ({exc.strerror or exc})") from None
        if taken is not None:
            fd, previous = taken
            _remove_dead_temps(path)
            lock = OutputLock(output, path, fd, previous or Holder("unknown", 0, HOST, "?"), made)
            print(
                f"note: {output} was locked by {lock.taken_over.describe()}, which ended without releasing it "
                "(killed?); lock taken over",
                file=sys.stderr,
            )
            return lock
        time.sleep(0.05)
    try:
        fd = _open_existing(path, os.O_RDONLY)
    except (OSError, UserError):
        fd = None
    last = None
    if fd is not None:
        try:
            last = _read_holder(fd)
        finally:
            os.close(fd)
    if last is not None and last.host == HOST and not _still_running(last):
        raise UserError(
            f"{output}: the lock {path} of {last.describe()} is still held although that process has ended: "
            f"a process it started holds it (`fuser {path}` names it); stop that one"
        )
    raise UserError(f"{output}: the lock {path} keeps changing hands; retry in a moment")


@contextlib.contextmanager
def hold_output(output: Path, stage: str, key: str, accelerator=None):
    """``with hold_output(path, stage, key):`` the lock of ``output`` for the block (see :func:`acquire`).

    With an ``accelerator`` of several processes (one run), only the main process takes the lock
    and every process learns the outcome (so all of them stop on a refusal, none waits at a
    barrier). Yields the :class:`OutputLock` on the main process, ``None`` elsewhere.
    """
    lock, refusal = None, None
    main = accelerator is None or accelerator.is_main_process
    if main:
        try:
            lock = acquire(output, stage, key)
        except UserError as exc:
            refusal = exc
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([str(refusal) if refusal is not None else None])[0]
        if message is not None and refusal is None:
            refusal = UserError(message)
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


# --- who holds a lock ---------------------------------------------------------------------------


def holder_of(output: Path) -> str | None:
    """Who holds the output lock of ``output`` now, as a message names them (None: nobody we can tell)."""
    try:
        fd = _open_existing(lock_path_of(output), os.O_RDONLY)
    except (OSError, UserError):
        return None
    if fd is None:
        return None
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    return holder.describe() if holder is not None else None


@contextlib.contextmanager
def holding(fds: list[int]):
    """Keep the kernel locks on ``fds`` for the block (a forked child closes its copies at once), then close them."""
    _held_fds.update(fds)
    try:
        yield
    finally:
        for fd in fds:
            _held_fds.discard(fd)
            os.close(fd)


# --- ownership ------------------------------------------------------------------------------

# The key of a stage's record (a JSON object it writes beside its files) that says whose they are:
# ``{"written_by": {"stage": "submit", "what": "submission"}}`` (see :func:`record_owner`).
RECORD_KEY = "written_by"
CLAIMS_NAME = ".claims.json"  # a folder's names a stage keeps for itself before writing them


def record_owner(stage: str, what: str) -> dict:
    """What a stage puts in the record of its files so :func:`check_outputs` knows them as its own."""
    return {RECORD_KEY: {"stage": stage, "what": what}}


def claim_names(folder: Path, stage: str, what: str, names: Sequence[str]) -> None:
    """Keep ``names`` (file stems) of ``folder`` for ``stage`` before it writes them (``train``: ``best``
    and ``last`` of its run folder, from its first step), so no other stage's file takes them."""
    atomic_write_text(Path(folder) / CLAIMS_NAME, json.dumps({**record_owner(stage, what), "names": list(names)}))


def _stems(name: str) -> list[str]:
    """``a.b.meta.json`` -> ``["a", "a.b", "a.b.meta"]``: every name the file may be grouped under."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))] or [name]


def _json_object(path: Path) -> dict | None:
    try:
        if path.stat().st_size > 1 << 24:
            return None
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _owner_in(record: dict | None) -> tuple[str, str] | None:
    owner = (record or {}).get(RECORD_KEY)
    if isinstance(owner, dict) and isinstance(owner.get("stage"), str) and isinstance(owner.get("what"), str):
        return owner["stage"], owner["what"]
    return None


def owner_of(path: Path) -> tuple[str, str] | None:
    """``(stage, what)`` when ``path`` (existing or not) belongs to a stage's group of files, else None.

    A group is every file of one stem (``sub.csv``, ``sub.json``, ``sub.meta.json``), and a stage says
    it owns one by a record among them (``<stem>.json`` or ``<stem>.<kind>.json`` holding
    :func:`record_owner`) or by claiming the stem in its folder (:func:`claim_names`). Nothing here
    knows a stage's formats: a new stage declares its files the same way.
    """
    path = Path(path)
    folder = path.parent
    claims = _json_object(folder / CLAIMS_NAME) if (folder / CLAIMS_NAME).is_file() else None
    for stem in _stems(path.name):
        claimed = _owner_in(claims)
        if claimed and stem in (claims or {}).get("names", []):
            return claimed[0], f"the {claimed[1]} '{stem}' of {folder}"
        try:
            records = [folder / f"{stem}.json", *sorted(folder.glob(f"{glob.escape(stem)}.*.json"))]
        except OSError:
            records = []
        for record in records:
            owner = _owner_in(_json_object(record)) if record.is_file() else None
            if owner:
                return owner[0], f"the {owner[1]} '{stem}' of {folder}"
    if path.suffix == ".safetensors":
        return "another command", f"a model's weights in {folder}"
    return None


def check_outputs(paths: Sequence[Path], stage: str, key: str) -> None:
    """Refuse, in one line naming ``key``, to write any of ``paths`` over another stage's files.

    Call it before any long work: nothing has been computed or written when it refuses.
    """
    for path in paths:
        owner = owner_of(Path(path))
        if owner is not None and owner[0] != stage:
            raise UserError(
                f"{key}: {stage} would write {path}, which belongs to {owner[1]} (written by {owner[0]}); "
                f"no command writes over another one's files: choose another {key}"
            )
