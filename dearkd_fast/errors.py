"""The one error tree of the project.

    DearKDError                    everything the library raises on purpose
    ├── InputError (ValueError)    the user can fix it: a flag, a folder, a file, a shape -> exit 2, one line
    │   ├── DataError              a data folder, image list or built-in set
    │   ├── CheckpointError        a teacher.pt / student.pt / checkpoint.pt that is unreadable or does not fit
    │   └── BackendError           a kernel backend that cannot run here or on these tensors
    └── RunError (RuntimeError)    a failure at run time (diverged loss, empty loader) -> exit 1

The command-line tools sort by this tree only: InputError exits 2 with its message; anything else
is a run-time failure (exit 1: one line, the traceback in the run folder's `error.log`).
InputError and RunError also derive from ValueError and RuntimeError, so code that catches the
built-in kinds keeps working.
"""
from __future__ import annotations

__all__ = ["DearKDError", "InputError", "DataError", "CheckpointError", "BackendError", "RunError", "Terminated"]


class DearKDError(Exception):
    """Base of every error dearkd_fast raises on purpose."""


class InputError(DearKDError, ValueError):
    """Bad input the user can fix (flag, folder, file, shape): a one-line message, exit 2."""


class DataError(InputError):
    """Bad input data: missing folder, empty class, nothing decodable, a bad built-in set."""


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable, or does not fit the run."""


class BackendError(InputError):
    """A kernel backend was asked for that cannot run here or on these tensors."""


class RunError(DearKDError, RuntimeError):
    """A failure at run time that no input caused directly (diverged loss, empty loader): exit 1."""


class Terminated(KeyboardInterrupt):
    """Not an error: SIGTERM, raised in the main thread by the command-line tools so that a run unwinds
    as on Ctrl-C (loader workers shut down, no file torn) and exits 143."""


class Stopped(KeyboardInterrupt):
    """A run asked to stop (SIGINT or SIGTERM) that checkpointed at the next step boundary first."""

    def __init__(self, signum: int, where: str):
        super().__init__(where)
        self.signum, self.where = signum, where
