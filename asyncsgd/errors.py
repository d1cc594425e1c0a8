"""Every error a user can see, in one place (a leaf module: it imports nothing of the package).

Each carries a one-line message naming what is wrong. The CLI maps them to exit codes: usage and
configuration problems exit 2, data and runtime problems exit 1 (see `asyncsgd.cli`).
"""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A configuration problem; the message is one line and names the field (exit 2)."""


class OutputExists(ConfigError):
    """The output directory already holds a finished run."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable or does not fit the run."""


class DataError(Exception):
    """A dataset cannot be found, read or verified (exit 1)."""


class DatasetNotFound(DataError, FileNotFoundError):
    """No copy of the dataset was found and none could be downloaded."""


class DataFormatError(DataError, ValueError):
    """A dataset file is missing, truncated or not in the expected format."""


class ChecksumError(DataError, ValueError):
    """A downloaded file does not have the published SHA-256."""


class WorkerError(RuntimeError):
    """A worker thread raised; the message names the worker and what it was doing."""


class StallError(RuntimeError):
    """The watchdog saw no progress for too long; the message names the stuck workers."""


class DivergedError(RuntimeError):
    """A training loss came out NaN or infinite: the run has diverged.

    `step` is the 1-based training step whose loss was non-finite, `seq` its batch number; `train()`
    adds the stages whose parameters are non-finite and what to try, and attaches the written summary
    as `summary`.
    """

    def __init__(self, message: str, step: int = 0, seq: int = -1):
        super().__init__(message)
        self.step = step
        self.seq = seq
        self.summary: Optional[dict] = None


NonFiniteLoss = DivergedError  # the name earlier versions used

# Exit codes of the command line for each kind of error.
USAGE_ERRORS = (ConfigError,)
RUNTIME_ERRORS = (DataError, WorkerError, StallError, DivergedError)
