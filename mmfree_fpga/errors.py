"""Errors that reach the user as one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded."""
