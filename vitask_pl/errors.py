"""Errors that describe a user's mistake rather than a bug.

The CLI prints these as one line and exits non-zero; anything else keeps its traceback, because it is ours.
They subclass the builtin a caller would expect (``ValueError``, ``FileNotFoundError``) so library users can
catch them the usual way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Marker: the message says what to change; no traceback needed."""


class ConfigError(UserError, ValueError):
    """A knob has a value that cannot work."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs is not there; the message names what produces it."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise print "[Errno None] ..."
        return str(self.args[0]) if self.args else ""


class OfflineError(UserError, ConnectionError):
    """Something needs the network while ``HF_HUB_OFFLINE``/no internet forbids it."""


def suggest(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match, else an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
