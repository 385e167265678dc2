"""The one exception type a user is meant to read.

Everything the command line prints as ``error: ...`` (exit 1) and everything the window shows in its
message bar is a :class:`StudioError`. Its message names the file, line or option at fault and says
what to do; it never needs a traceback to be understood.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem caused by the user's input (a file, an option, a model), explained in one message."""

    def __init__(self, message: str, *, hint: str | None = None, window_hint: str | None = None):
        self.message = message
        self.hint = hint
        self.window_hint = window_hint
        """The hint as the window says it, where the command line's names a flag to type (``--fields
        output=COLUMN``) and the window has a control instead; studio.messages.for_window uses it."""
        super().__init__(message if not hint else f"{message} ({hint})")

    def __str__(self) -> str:  # one line, with the hint after the message
        return self.message if not self.hint else f"{self.message}. {self.hint}"


class ConfigError(StudioError):
    """A configuration with one or more problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class Cancelled(Exception):
    """A long operation (tokenising, conversion, export) was cancelled by the user."""
