"""The one exception type users see for their own mistakes."""


class LowbitError(ValueError):
    """Bad input from the user: a wrong shape, a bad setting, a missing or corrupt file.

    A ValueError subclass, so callers that already catch ValueError keep working; the CLI turns it
    into one line on stderr and a non-zero exit.
    """
