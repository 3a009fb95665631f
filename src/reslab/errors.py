"""The one exception type for a user's mistake, and the checks of number flags that raise it.

The command line prints a ``ReslabError`` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""

import math


class ReslabError(Exception):
    """Bad input from the user: a name, flag, file or value, with what would work instead."""


class Interrupted(Exception):
    """A run stopped on request (SIGINT / SIGTERM) after saving; carries the exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_whole(name: str, value: int, least: int = 1) -> None:
    """A count flag: ``--name`` must be a whole number >= ``least``."""
    if not isinstance(value, int) or value < least:
        raise ReslabError(f"--{name} must be a whole number >= {least}, got {value}")


def finite_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A real-valued flag: ``--name`` must be finite and > 0 (>= 0 with ``allow_zero``)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ReslabError(f"--{name} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ReslabError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
