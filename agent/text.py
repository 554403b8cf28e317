"""Text from outside (the bucket, session records) made safe to print on a terminal.

A lock's ``user`` or ``machine``, a key or a path comes from whoever can write to
the bucket. Printed raw, an escape sequence in it could clear the screen, move
the cursor or forge an ``error:`` line. ``printable`` shows every control
character (C0, DEL, C1, and the bidirectional overrides) as a visible escape.
"""

from __future__ import annotations

import re

__all__ = ["printable", "printable_lines"]

# C0 (but tab and newline are handled by the caller's choice), DEL, C1, and the
# Unicode bidi controls that reorder what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NEWLINES = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character (newlines too) shown escaped."""
    return _CONTROL.sub(_escape, str(value))


def printable_lines(text: str) -> str:
    """Like ``printable`` but keeps newlines and tabs (a message of several lines)."""
    return _CONTROL_KEEP_NEWLINES.sub(_escape, text)
