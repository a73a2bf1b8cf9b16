"""The command-line shape shared by every stage: ``[--config FILE] [--debug] [key=value ...]``.

Bad input (:class:`UserError`) becomes one ``error: ...`` line and exit code 2; the traceback
is shown only with ``--debug``. SIGTERM ends a stage like Ctrl-C does (``finally`` blocks run,
so no temporary file is left behind). A process the launcher started leaves the stop line to the
launcher and ends when the launcher dies (:func:`die_with_parent`).
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

# Set by launch for the processes it starts: its own PID.
LAUNCHER_ENV = "ROBUST_PIPELINE_LAUNCHER"
# Set by run.sh: the folder the user ran it from (run.sh itself works from the repository).
CWD_ENV = "ROBUST_PIPELINE_CWD"


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


def stop_signal(exc: BaseException) -> int | None:
    """The stop signal (SIGINT or SIGTERM) that ``exc`` is, or was raised while handling (a loader
    worker found dead, a collective whose peer had stopped): then it is the stop, not a crash.
    None: not a stop."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            interrupted = signal.SIGINT in _stopping or (not _stopping and isinstance(exc, KeyboardInterrupt))
            return signal.SIGINT if interrupted else signal.SIGTERM
        seen.add(id(exc))
        exc = exc.__context__
    return None


def launched() -> bool:
    """Whether this process was started by the launcher (which explains how it ended)."""
    return os.environ.get(LAUNCHER_ENV, str(os.getpid())) != str(os.getpid())


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(launcher: int) -> None:
    """Ask the kernel for SIGTERM when this process's parent dies, even by SIGKILL, which no handler
    sees (Linux; elsewhere nothing happens). Every process the launcher starts asks it, so a
    SIGKILLed launcher takes its run with it, which stops cleanly, instead of an orphan holding the
    run's lock. If the ``launcher`` PID has already died, SIGTERM comes at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        os.kill(launcher, 0)
    except (OSError, AttributeError) as exc:
        if isinstance(exc, ProcessLookupError):  # it died before the call: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)


def end_process_group() -> None:
    """End this process's part of a multi-process run (accelerate's process group), as a finished
    run does in ``end_training``. After a stage or a refusal every rank exits together; a group left for the
    interpreter's exit to tear down sometimes aborts a rank ("terminate called without an active
    exception", SIGABRT) instead of the refusal's exit code 2. Not after a crash or a stop: peers
    may still wait in a collective, and the launcher ends them."""
    state = sys.modules.get("accelerate.state")  # never imported: no group to end
    if state is not None and state.PartialState._shared_state:
        state.PartialState().destroy_process_group()  # a no-op where no group was started


def run_cli(fn: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``: a UserError becomes one line on stderr and exit code 2, Ctrl-C 130, SIGTERM 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ROBUST_PIPELINE_DEBUG") == "1"
    _stopping.clear()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_redeliver_stop, previous_hook)
    if launched():
        die_with_parent(int(os.environ[LAUNCHER_ENV]))
    code = 1
    try:
        fn(argv)
        end_process_group()  # every rank got here: none waits in a collective
        code = 0
    except BaseException as exc:
        stop = stop_signal(exc)  # also an error raised by the clean-up the stop started
        if debug and (stop or isinstance(exc, UserError)):
            traceback.print_exception(exc)
        if stop:
            code = 128 + stop
            if not launched():  # else the launcher's line says it
                print("interrupted" if stop == signal.SIGINT else "terminated", file=sys.stderr)
        elif isinstance(exc, UserError):
            if is_main_rank() or debug:
                print(f"error: {cap_message(str(exc))}", file=sys.stderr, flush=True)
            end_process_group()
            code = UserError.exit_code
        else:
            raise  # a crash: its traceback follows
    finally:
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
