"""Errors that are the user's to fix (a config value, a path, an input, a damaged file). The command line reports
them in one line on stderr with exit code 2; any other exception keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Raised with a message that says what is wrong and what to do; no traceback is shown for it."""


class WorkdirError(UserError):
    """The workdir is a file, cannot be created or cannot be written."""


class DamagedCheckpointError(UserError):
    """A checkpoint's files cannot be read back; the message names the step folder and how to resume before it."""


class MissingInputError(UserError, FileNotFoundError):
    """What a stage reads is not there (an earlier stage has not run, or a path is wrong)."""


class BadInputError(UserError, ValueError):
    """A file or dataset the user provided cannot be used as it is (wrong shape, no usable records)."""
