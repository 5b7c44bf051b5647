"""Errors a user can cause.

Library code raises :class:`DeblurcliError` (or a subclass) with a message written for the user:
one line that says what went wrong and, where possible, what to do. The CLI prints that line and
exits with status 1. Usage mistakes (bad flag values) are reported by the CLI with status 2.
"""


class DeblurcliError(Exception):
    """A runtime error caused by the user's input or environment (exit status 1)."""


class ImageReadError(DeblurcliError):
    """An image file is missing, unreadable or of an unsupported kind."""


class ImageWriteError(DeblurcliError):
    """An image cannot be written in the format asked for (e.g. larger than the format holds)."""


class WeightsError(DeblurcliError):
    """Model weights are missing, corrupt or do not match their configuration."""


class DatasetError(DeblurcliError):
    """A dataset folder is missing, empty or inconsistent."""
