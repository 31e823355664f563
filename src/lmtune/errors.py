"""Errors that reach the user as one clear message and an exit code."""


class UserError(Exception):
    """Bad config or bad input: exit code 2, nothing written, nothing deleted."""

    exit_code = 2


class RunFailed(Exception):
    """A failure while running: exit code 1."""

    exit_code = 1


class Stopped(Exception):
    """Stopped by SIGINT or SIGTERM after writing a resumable checkpoint: exit code 130."""

    exit_code = 130
