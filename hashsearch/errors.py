"""Errors that mean bad input rather than a bug.

The CLI prints a HashsearchError as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""


class HashsearchError(Exception):
    """A user-facing error with a one-line message."""
