"""Errors a user can fix. Their message says what is wrong and how to fix it.

The command line prints a `UserError` as one line and exits with status 2; anything
else is a bug and gets a traceback (status 1). In a multi-rank job the failing rank
aborts the whole MPI job so that no rank is left waiting in a collective.
"""


class UserError(Exception):
    """A mistake in the input (config, data, command line) that the user can fix.

    `all_ranks` says whether every rank raises the same error at the same point (config
    and dataset validation do); then only rank 0 prints it, so a 64-rank job gives one
    message, not 64. Errors found by one rank alone (a bad sample it read) set it False.
    """

    all_ranks: bool = True


class ConfigError(UserError, ValueError):
    """A config key or value is wrong."""


class DataError(UserError):
    """A dataset is missing, malformed, or holds values that cannot be trained on."""


class SampleError(DataError):
    """One rank found a bad sample while reading; other ranks may not have seen it."""

    all_ranks = False


def require(ok: bool, key: str, value: object, fix: str) -> None:
    """A config value check: ConfigError "KEY = VALUE: FIX" unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {fix}")
