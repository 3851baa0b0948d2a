"""One exception type per kind of user mistake.

Each carries a message that names the file, field or value that was wrong, so
the CLI can print it without a traceback. Anything else that escapes is a bug.
"""


class DuetError(Exception):
    """Base of every error a user can cause and fix."""


class DataError(DuetError):
    """A data file is missing, unreadable or malformed (the message names file and line)."""


class ConfigError(DuetError):
    """A configuration value is invalid (the message names the field)."""


class CheckpointError(DuetError):
    """A checkpoint file is missing, corrupt or does not match the requested model."""
