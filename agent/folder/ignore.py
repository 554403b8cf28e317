"""Which files the agent never sends: editor lock/temp files and our own temp names.

Patterns are fnmatch-style (``*``, ``?``, ``[seq]``), matched without regard to
case (Windows and macOS folders are case-insensitive, and an editor's ``~$X.DOCX``
is as much a lock file as ``~$x.docx``):

* a pattern without ``/`` matches a single name: the file's own name or the
  name of any folder above it (``cache`` hides ``cache/deep/file.bin``), so the
  watcher and the folder scan, which skips ignored folders, agree;
* a pattern with ``/`` matches the whole relative path or the path of a folder
  above it (``build/*.log``, ``docs/old``); a leading ``/`` is allowed and means
  the same (patterns are always relative to the working folder root). As in
  fnmatch, ``*`` also matches ``/``.

Our own temp names (``.pdagent.<name>.<random>.tmp``, written beside the target
by downloads and renamed over it when complete) are always ignored, whatever
the configured patterns say. The default patterns (``agent.config.DEFAULT_IGNORE``)
also cover other tools' temp files: office and editor lock files, git's
``tmp_pack_*``/``tmp_idx_*``/``tmp_obj_*`` and ``*.lock`` inside a repository,
rsync's ``.<name>.XXXXXX`` and ``.rsync-partial/``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

__all__ = ["TEMP_PREFIX", "TEMP_SUFFIX", "IgnoreRules", "is_temporary", "temp_name_for"]

TEMP_PREFIX = ".pdagent."
TEMP_SUFFIX = ".tmp"
# Longer names (in UTF-8 bytes) are hashed, like syncthing's tempname.go: NAME_MAX is
# 255 bytes and Windows paths are still often capped at 260 characters, so the temp
# name must not be much longer than the target's.
_MAX_NAME_BYTES = 64


class IgnoreRules:
    """Compiled ignore patterns; ``is_ignored`` is pure and cheap (two regex matches)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        cleaned = [p.replace("\\", "/").strip() for p in patterns]
        cleaned = [p for p in cleaned if p.strip("/")]
        self.patterns = tuple(patterns)
        self._name_re = self._compile([p for p in cleaned if "/" not in p.rstrip("/")])
        self._path_re = self._compile([p.strip("/") for p in cleaned if "/" in p.rstrip("/")])

    @staticmethod
    def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
        if not patterns:
            return None
        body = "|".join(f"(?:{fnmatch.translate(p.rstrip('/'))})" for p in patterns)
        return re.compile(body, re.IGNORECASE)

    def is_ignored(self, rel_path: str) -> bool:
        """True if ``rel_path`` (POSIX separators, relative to the root) is never sent.

        That is: its name is one of our temp names, its name or a folder name above it
        matches a name pattern, or it or a folder above it matches a path pattern.
        """
        parts = rel_path.split("/")
        if is_temporary(parts[-1]):
            return True
        if self._name_re is not None and any(self._name_re.match(p) for p in parts):
            return True
        if self._path_re is None:
            return False
        return any(
            self._path_re.match("/".join(parts[:depth])) for depth in range(len(parts), 0, -1)
        )

    def is_ignored_entry(self, rel_path: str, name: str) -> bool:
        """``is_ignored`` for an entry ``name`` of a folder a walk found not ignored.

        Its folders above were judged already: only its own name and its whole path are.
        A walk of 10,000 files spent a sixth of its time judging every folder again.
        """
        if is_temporary(name):
            return True
        if self._name_re is not None and self._name_re.match(name):
            return True
        return self._path_re is not None and self._path_re.match(rel_path) is not None


def temp_name_for(target: Path) -> Path:
    """A fresh, recognisable temp path beside ``target``: ``.pdagent.<name>.<random>.tmp``.

    A name longer than 64 UTF-8 bytes is replaced by a hash of it, so the temp
    name stays short (the random part keeps two concurrent writers apart).
    """
    name = target.name
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16)
        name = digest.hexdigest()
    return target.with_name(f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """True for a file name made by ``temp_name_for`` (a name, not a path)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)
