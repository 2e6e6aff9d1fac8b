"""Exceptions with messages meant for the user of the `wmse` command."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""
