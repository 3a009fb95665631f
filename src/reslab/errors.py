"""The one exception type for a user's mistake.

The command line prints a ``ReslabError`` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class ReslabError(Exception):
    """Bad input from the user: a name, flag, file or value, with what would work instead."""
