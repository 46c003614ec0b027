"""Exceptions. Every message names the problem and the fix."""


class RsavqError(Exception):
    """Base class of rsavq's errors."""


class UsageError(RsavqError):
    """Bad input from the user (a name, a path, a setting); the CLI exits with code 2."""


class DataError(UsageError):
    """A data source that cannot be found, read or used."""


class ModelNotFoundError(UsageError):
    """A `--model` value that resolves to nothing; the message lists what was tried."""
