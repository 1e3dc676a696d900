"""User-facing errors: one line, a named cause, a distinct exit code."""

from __future__ import annotations

import difflib
import sys


class UserError(Exception):
    """A mistake in the user's input (config, file, argument): reported in one line."""

    exit_code: int = 2


class ConfigError(UserError):
    """An unknown, mistyped or inconsistent configuration key."""


class CorpusError(UserError):
    """A corpus source or cache that cannot be read as promised."""


class ResumeError(UserError):
    """A run directory whose checkpoint cannot be resumed with this config."""


def print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
