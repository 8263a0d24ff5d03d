"""Errors that map to the exit codes of the shared contract (DESIGN.md)."""


class UserError(Exception):
    """Bad input (config, data, arguments): exit 2 with a one-line message, no traceback."""

    exit_code = 2


class PlanDoesNotFit(Exception):
    """The plan does not fit the hardware: exit 3; the message says by how much and what would."""

    exit_code = 3
