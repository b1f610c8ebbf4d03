"""Errors that reach the user as one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class DesignError(ValueError):
    """A gateware parameter the design cannot take (lanes, sizes beyond a build's maxima, a program
    or an image that does not fit): raised by the library (``hw/``) as a ValueError; the CLI
    reports it like a :class:`UserError` (one line, exit code 2)."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded."""
