"""The one exception type for user-facing errors.

Anything raised as ``CalmError`` is a problem with the user's input (a path, a
flag, a file) and is printed by the command line as one line, with exit code 2.
Anything else is a bug and keeps its traceback.
"""


class CalmError(Exception):
    """A user-facing error: bad input, never a bug."""
