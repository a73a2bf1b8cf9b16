"""The command-line shape shared by every stage: ``[--config FILE] [--debug] [key=value ...]``.

Bad input (:class:`UserError`) becomes one ``error: ...`` line and exit code 2; the traceback
is shown only with ``--debug``. SIGTERM ends a stage like Ctrl-C does (``finally`` blocks run,
so no temporary file is left behind). Under ``launch`` each process reports how it ended
into a status folder, so the launcher can tell a clean error from a process that was killed.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from core.config import Config, load_config
from core.errors import UserError, cap_message

# Set by launch: the folder where each process reports how it ended (`accelerate launch`
# maps every failure to exit code 1).
STATUS_ENV = "ROBUST_PIPELINE_STATUS_DIR"
# Set by run.sh: the folder the user ran it from (run.sh itself works from the repository).
CWD_ENV = "ROBUST_PIPELINE_CWD"
# The status a stage reports once its output folder holds a state it can continue from (the
# launcher's stop line then offers resume=auto, else says there is nothing to resume).
RESUMABLE_STATUS = "resumable"


class Terminated(BaseException):
    """SIGTERM arrived (a supervisor, `timeout`, a job scheduler or launch stopping the run)."""


def user_path(path: str | Path | None) -> Path | None:
    """A path typed on the command line, relative to the folder the user ran the command from."""
    if path is None or str(path) == "":
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else Path(os.environ.get(CWD_ENV) or os.getcwd()) / path


def create_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_config(args: argparse.Namespace) -> Config:
    """The config of ``--config`` and the overrides (see :func:`core.config.load_config`)."""
    return load_config(user_path(args.config), args.overrides)


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def quiet_libraries() -> None:
    """Keep the console to our own lines: progress bars and one-line results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("timm", "accelerate", "PIL", "matplotlib", "urllib3", "wandb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def rank() -> int:
    return int(os.environ.get("RANK") or 0)


def report_status(name: str, text: str) -> None:
    """Write ``<status folder>/<name>-<rank>`` when running under launch."""
    folder = os.environ.get(STATUS_ENV)
    if folder:
        Path(folder, f"{name}-{rank()}").write_text(text, encoding="utf-8")


# The stop signal this process received (SIGTERM or SIGINT); empty while it runs.
_stopping: list[int] = []


def _stop(signum, frame) -> None:
    """The first SIGTERM/SIGINT ends the stage with an exception (``finally`` blocks run); later ones
    are ignored so that they cannot break into that clean-up (the launcher kills a process that has
    not ended a grace period later)."""
    if _stopping:
        return
    _stopping.append(signum)
    quiet_worker_deaths()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def quiet_worker_deaths() -> None:
    """Stop torch's SIGCHLD handler from reporting data-loader workers that the same stop signal ended.

    A stop signal sent to the process group (the launcher's, a job scheduler's) ends the workers too;
    torch's handler then raises "DataLoader worker (pid N) is killed by signal: Terminated" at any
    point of the stage's clean-up, even inside a ``__del__`` (printed as "Exception ignored in").
    A no-op handler rather than SIG_DFL: a SIGCHLD already pending would otherwise be printed as
    "Signal 17 ignored due to race condition".
    """
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)


def _redeliver_stop(previous_hook: Callable, args) -> None:
    """``sys.unraisablehook``: a stop raised inside a ``__del__`` or a callback, where Python drops
    exceptions, is delivered again (from a thread, so it lands once that code has returned)."""
    if _stopping and isinstance(args.exc_value, (KeyboardInterrupt, Terminated)):
        signum = _stopping.pop()
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    previous_hook(args)


def caused_by_stop(exc: BaseException) -> bool:
    """Whether ``exc`` is a stop signal or was raised while one was being handled (a loader worker
    found dead, a collective whose peer had stopped): then it is the stop, not a crash."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False


def _report_stop(exc: BaseException, debug: bool) -> tuple[int, str]:
    """Exit code and reason of a stopped stage; its line is the launcher's where there is one."""
    if debug:
        traceback.print_exception(exc)
    interrupted = signal.SIGINT in _stopping or (not _stopping and isinstance(exc, KeyboardInterrupt))
    code, reason = (130, "interrupted") if interrupted else (143, "terminated")
    if not os.environ.get(STATUS_ENV):
        print(reason, file=sys.stderr)
    return code, reason


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel for SIGTERM when this process's parent dies, even by SIGKILL, which no handler
    sees (Linux; elsewhere nothing happens). Under ``launch`` the process it starts (the stage, or
    ``accelerate launch``) and every stage process ask it, so a SIGKILLed launcher takes its run with
    it, which stops cleanly, instead of an orphan holding the run's lock. ``parent``: the PID the
    caller was started by; if it has already died, SIGTERM comes at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it died before the call: no signal would come
        os.kill(os.getpid(), signal.SIGTERM)


def run_cli(fn: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``: a UserError becomes one line on stderr and exit code 2, Ctrl-C 130, SIGTERM 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ROBUST_PIPELINE_DEBUG") == "1"
    report_status("started", str(os.getpid()))
    _stopping.clear()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_redeliver_stop, previous_hook)
    if os.environ.get(STATUS_ENV):
        die_with_parent()  # under launch: a launcher killed outright takes the run with it (see there)
    code, reason = 1, "crashed"
    try:
        fn(argv)
        code, reason = 0, "done"
    except BaseException as exc:
        if caused_by_stop(exc):  # also an error raised by the clean-up the stop started
            code, reason = _report_stop(exc, debug)
        elif isinstance(exc, UserError):
            if debug:
                traceback.print_exc()
            if is_main_rank() or debug:
                print(f"error: {cap_message(str(exc))}", file=sys.stderr, flush=True)
            code, reason = UserError.exit_code, "error"
        else:
            raise  # a crash: its traceback follows
    finally:  # also on a crash (the traceback follows): the launcher then knows it was not killed
        report_status("ended", f"{code} {reason}")
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = previous_hook
    return code


class CheckerParser(argparse.ArgumentParser):
    """argparse for the checking commands (validate, check-submission): a usage mistake raises
    UserError, so it shares the CLI's one-line form and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; {' '.join(self.format_usage().split())}")


def run_checker(fn: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """:func:`run_cli` for a command whose ``fn`` returns its own status (0 passed, 1 a check failed)."""
    status = 0

    def _run(args: Sequence[str]) -> None:
        nonlocal status
        status = fn(args)

    return run_cli(_run, argv) or status
