"""Errors that reach the user as one clear message instead of a stack trace.

Every error a user can cause (a config key, a dataset row, a missing file) derives from
`TuneforgeError`; the CLI prints its message and exits with status 2.
"""


class TuneforgeError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it."""


class DataError(TuneforgeError):
    """A dataset cannot be loaded or one of its rows is malformed."""


class ModelError(TuneforgeError):
    """A model, tokenizer or adapter cannot be loaded as configured."""


class NotSupportedYet(TuneforgeError):
    """The configuration asks for something this version does not implement."""
