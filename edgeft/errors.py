"""The two failures the CLI tells apart: bad input (exit 2) and a runtime failure (exit 1)."""

import reprlib

from edgeft.constants import EXIT_BAD_INPUT, EXIT_RUNTIME

# bounded in work as well as length: a 400-byte YAML alias bomb must not become an 80 MB message
_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
for _name, _limit in (("maxlevel", 2), ("maxtuple", 4), ("maxlist", 4), ("maxarray", 4), ("maxdict", 4),
                      ("maxset", 4), ("maxfrozenset", 4), ("maxdeque", 4), ("maxstring", 60), ("maxlong", 40),
                      ("maxother", 60)):
    setattr(_SHORT, _name, _limit)


def short(value) -> str:
    """repr(value) cut to about 60 characters (and nested containers to a few items), for error messages."""
    return _SHORT.repr(value)


class EdgeftError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = EXIT_RUNTIME


class UserError(EdgeftError):
    """Bad input: a file, line, key or value the user must fix. The message says how."""

    exit_code = EXIT_BAD_INPUT


class StageFailure(EdgeftError):
    """A stage ran but its result failed a check (parity, merge verification, ...)."""

    exit_code = EXIT_RUNTIME
