"""The one exception type for a user's mistake.

The command line prints a ``ReslabError`` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class ReslabError(Exception):
    """Bad input from the user: a name, flag, file or value, with what would work instead."""


class Interrupted(Exception):
    """A run stopped on request (SIGINT / SIGTERM) after saving; carries the exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
