"""The two failures the CLI tells apart: bad input (exit 2) and a runtime failure (exit 1)."""

from edgeft.constants import EXIT_BAD_INPUT, EXIT_RUNTIME


class EdgeftError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = EXIT_RUNTIME


class UserError(EdgeftError):
    """Bad input: a file, line, key or value the user must fix. The message says how."""

    exit_code = EXIT_BAD_INPUT


class StageFailure(EdgeftError):
    """A stage ran but its result failed a check (parity, merge verification, ...)."""

    exit_code = EXIT_RUNTIME
