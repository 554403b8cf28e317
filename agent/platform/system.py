"""Which operating system this is: the one fact every platform module branches on."""

from __future__ import annotations

import sys

__all__ = ["IS_WINDOWS"]

IS_WINDOWS = sys.platform == "win32"
