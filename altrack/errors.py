"""Exceptions that the CLI turns into one-line messages instead of tracebacks."""


class AltrackError(Exception):
    """Base for every error a user can cause and fix."""


class ConfigError(AltrackError, ValueError):
    """A setting is out of range or unknown; raised before anything is written."""


class DataError(AltrackError):
    """A dataset file is missing, corrupt, or cannot be downloaded."""


class TrainingDiverged(AltrackError):
    """The training loss became NaN or infinite; the run is reported as failed, never as a result."""
