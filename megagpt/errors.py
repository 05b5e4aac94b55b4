"""Errors a user can cause, as opposed to bugs in megagpt.

Entry points catch ``UserError`` and print its message as one sentence instead of a traceback;
the message names the offending thing (a config key, a file) and how to fix it.
"""


class UserError(Exception):
    """Something the user can fix: a config value, a data file, a checkpoint, the launch environment."""


class ConfigError(UserError):
    """A config key, type or value that is not allowed."""


class DataError(UserError):
    """A missing, truncated or malformed dataset file."""
