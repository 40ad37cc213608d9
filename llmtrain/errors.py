"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config value, missing file, unknown name).

    The CLI prints ``str(error)`` as a single line and exits with code 2.
    ``key`` names the config key or file at fault so the message can lead with it.
    """

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):
        # Rebuildable after pickling, so an error raised in a worker process reaches the parent.
        return (type(self), (self.key, self.message))


class ConfigError(UserError):
    """A config key has a wrong type, a value outside its set, or is unknown."""


class DataError(UserError):
    """A data file is missing, empty, malformed or does not match its metadata."""


class UnreachableError(DataError):
    """A remote source (the Hugging Face hub) could not be read; the same command may work later,
    so a partial data preparation is kept for it."""


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, fails its hash, or holds content that is refused
    (anything that could run code when loaded). ``resume=auto`` sets such a checkpoint aside."""


class ResourceError(UserError):
    """The machine cannot hold the requested run (memory, devices)."""


def choices(values) -> str:
    """Format accepted values for an error message: 'one of: a, b, c'."""
    return "one of: " + ", ".join(str(v) for v in values)
