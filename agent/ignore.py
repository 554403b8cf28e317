"""Which files the agent never sends: editor lock/temp files and our own temp names.

Patterns are fnmatch-style. A pattern without ``/`` matches the file name; one
with ``/`` matches the whole relative path. Matching ignores case (Windows).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["TEMP_PREFIX", "IgnoreRules", "is_temporary", "temp_name_for"]

TEMP_PREFIX = ".pdagent."
_MAX_NAME = 100


class IgnoreRules:
    """Compiled ignore patterns."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        names = [p for p in patterns if "/" not in p]
        paths = [p for p in patterns if "/" in p]
        self._name_re = self._compile(names)
        self._path_re = self._compile(paths)

    @staticmethod
    def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
        if not patterns:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.IGNORECASE)

    def is_ignored(self, rel_path: str) -> bool:
        """True if ``rel_path`` (POSIX separators) or any of its folders is ignored."""
        parts = rel_path.split("/")
        if self._name_re is not None and any(self._name_re.match(p) for p in parts):
            return True
        if is_temporary(parts[-1]):
            return True
        return self._path_re is not None and bool(self._path_re.match(rel_path))


def temp_name_for(target: Path) -> Path:
    """A recognisable temp name beside ``target`` (hashed when the name is long)."""
    name = target.name
    if len(name) > _MAX_NAME:
        name = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()
    return target.with_name(f"{TEMP_PREFIX}{name}.{os.urandom(4).hex()}.tmp")


def is_temporary(name: str) -> bool:
    """True for names made by ``temp_name_for``."""
    return name.startswith(TEMP_PREFIX) and name.endswith(".tmp")
