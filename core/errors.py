"""The user-input errors every command turns into one `prog: error: ...` line with exit code 2.

Each message names what was wrong, the file or option it came from, and what was expected.
"""
from __future__ import annotations

import os

DEBUG_ENV = "MOCOBENCH_DEBUG"  # set by `mocobench --debug`: user errors raise with their traceback


class ConfigError(ValueError):
    """A bad config value or key; the message names the key and what was expected."""


class DataError(ValueError):
    """Bad dataset input; the message names the path and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) read or used; the message names the file and the problem."""


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file and what was expected."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FeatureFileError)


def one_line(error: BaseException) -> str:
    """The message of a user error as one line. An error re-raised by a DataLoader worker carries the
    worker's whole traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    its last line holds the original message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ":") else last
    return " ".join(text.split())


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
