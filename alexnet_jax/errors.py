"""The one exception type for mistakes a user can fix (config, data, workdir)."""


class UsageError(ValueError):
    """A problem in the config, the data or the workdir; the message says how to fix it.

    launch.py prints these as one message without a traceback; anything else is a bug.
    """
