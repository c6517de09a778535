"""Error types and the exit code each one maps to on the command line."""


class LivepartError(Exception):
    """Base class: the message is one line that names the object and the fix."""

    exit_code = 1


class InvalidInput(LivepartError):
    """Bad input or a failed preflight check. Raised before the first change."""

    exit_code = 2


class WorkerLockHeld(LivepartError):
    """Another worker holds the advisory lock for this table."""

    exit_code = 3


class Interrupted(LivepartError):
    """SIGINT or SIGTERM stopped the worker at a safe point; the run can resume."""

    exit_code = 4


class VerificationFailed(LivepartError):
    """The old and the new table differ and no repair was requested or possible."""

    exit_code = 5


class StateMismatch(LivepartError):
    """The catalog does not match the persisted migration state."""

    exit_code = 6
