"""The one exception type for user-facing errors.

Anything raised as ``CalmError`` is a problem with the user's input (a path, a
flag, a file) and is printed by the command line as one line, with exit code 2.
Anything else is a bug and keeps its traceback.
"""


class CalmError(Exception):
    """A user-facing error: bad input, never a bug."""


class Stopped(CalmError):
    """A run stopped early by SIGINT/SIGTERM after saving its checkpoint.

    The command line exits with the shell's code for the signal (130, 143), so a
    pipeline or a script does not go on as if the run had finished.
    """

    CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self, message: str, signal_name: str | None):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = self.CODES.get(signal_name or "", 143)


def stop_if_stopped(result) -> int:
    """0 for a training result that ran to its end; raise `Stopped` for one cut short."""
    if result.stopped_by:
        raise Stopped("", result.stopped_by)  # the loop has printed where and how to resume
    return 0
