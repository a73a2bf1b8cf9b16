"""The one exception type the command line turns into a clean one-line error."""

from __future__ import annotations

import reprlib

# What an error message may echo of a value the user gave: a hostile config can hold a list of a
# billion items behind a few YAML aliases, and printing it whole would take gigabytes.
MAX_ECHO = 120
MAX_MESSAGE = 2000  # and no message line longer than this (core.cli.run_cli cuts it)


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, path).

    The CLI prints ``error: <message>`` on one line and exits with code 2; the message must
    name the file, key or line at fault. A traceback is shown only with ``--debug``.
    """

    exit_code = 2


def _create_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 6, 6, 4
    short.maxstring, short.maxother, short.maxlong = MAX_ECHO, MAX_ECHO, 40
    return short


_SHORT = _create_repr()


def echo(value: object) -> str:
    """``repr(value)`` for an error message, cut to about ``MAX_ECHO`` characters without building
    the whole repr (nested lists are shown to two levels, six items each)."""
    text = _SHORT.repr(value)
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


def cap_message(text: str) -> str:
    """``text`` cut to ``MAX_MESSAGE`` characters, saying how much was left out."""
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
