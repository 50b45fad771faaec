"""User-facing errors.

A :class:`StbenchError` is a mistake the user can fix (a path, a file, an option). The CLI prints its
message on one line and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class StbenchError(Exception):
    """A user mistake: the message names the file or option and the fix."""


class DataError(StbenchError):
    """A data file is missing or malformed."""


class ConfigError(StbenchError):
    """A configuration key, value or file is wrong."""


class PluginError(StbenchError):
    """A plugin failed to load, or two plugins registered the same name."""
