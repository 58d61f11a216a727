"""The one error type users see.

Anything raised as `PersonaxisError` is a mistake in the input (a path, a vector, a spec), not a bug: the CLI prints its
message on one line and exits with code 2, without a traceback.
"""


class PersonaxisError(Exception):
    """A user-facing error with a one-line message."""
