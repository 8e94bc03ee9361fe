"""The user-input errors every command turns into one `prog: error: ...` line with exit code 2.

Each message names what was wrong, the file or option it came from, and what was expected.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value or key; the message names the key and what was expected."""


class DataError(ValueError):
    """Bad dataset input; the message names the path and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) read or used; the message names the file and the problem."""


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file and what was expected."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FeatureFileError)
