"""Exceptions that the CLI turns into one-line messages instead of tracebacks."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first message line (or its type), for one-line errors."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    if len(line) <= limit:
        return line
    head = line[:limit] if line[limit] == " " else line[:limit].rsplit(" ", 1)[0]  # whole words, marked cut
    return head.rstrip() + " …"


class AltrackError(Exception):
    """Base for every error a user can cause and fix."""


class ConfigError(AltrackError, ValueError):
    """A setting is out of range or unknown; raised before anything is written."""


class DataError(AltrackError):
    """A dataset file is missing, corrupt, or cannot be downloaded."""


class TrainingDiverged(AltrackError):
    """The training loss became NaN or infinite; the run is reported as failed, never as a result."""
