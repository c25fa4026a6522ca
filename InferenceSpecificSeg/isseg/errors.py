"""Errors the worker reports to its caller, each with its own exit code and event kind.

The message of every error says what happened and what the user can do about it.
The exit codes are part of the worker protocol (docs/worker-protocol.md).
"""

from .protocol import EXIT_BAD_INPUT, EXIT_BAD_MODEL, EXIT_DISK, EXIT_INTERNAL, EXIT_OUT_OF_MEMORY


class IssegError(Exception):
    """Base of every error with a user-facing message."""

    exit_code = EXIT_INTERNAL
    kind = "internal"


class BadInputError(IssegError):
    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class BadModelError(IssegError):
    exit_code = EXIT_BAD_MODEL
    kind = "bad_model"


class OutOfMemoryError(IssegError):
    exit_code = EXIT_OUT_OF_MEMORY
    kind = "out_of_memory"


class DiskError(IssegError):
    exit_code = EXIT_DISK
    kind = "disk"


class OutputFolderError(IssegError):
    """The output folder is in use by another run, or holds an earlier run's results (without --overwrite)."""

    exit_code = EXIT_DISK
    kind = "output_folder"


class Cancelled(Exception):
    """Raised inside the pipeline when the user asked to stop; not an error (the run ends with its
    partial result and protocol.EXIT_CANCELLED)."""
