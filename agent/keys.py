"""Names and the key layout in the bucket (DESIGN.md "Key layout"), pure functions only.

::

    {projekt_id}/{stage}/{path}                  committed working copy
    {projekt_id}/{stage}.lock.json               the stage lock
    {projekt_id}/{stage}.manifest.json           committed manifest
    {projekt_id}/{stage}.commit.json             commit intent (while a commit is applied)
    {projekt_id}/.sessions/{session_id}/{path}   changes streamed during a session

The store applies the configured prefix; these keys are relative to it.
Every relative path is checked here before it becomes a key or a local path.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import InvalidNameError

__all__ = [
    "StageKeys",
    "WorkFolder",
    "local_path_for",
    "validate_name",
    "validate_rel_path",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_WINDOWS_RESERVED = {
    "CON", "PRN", "AUX", "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}  # fmt: skip


def validate_name(kind: str, value: str) -> str:
    """Check a projekt_id, stage, user or session id: one safe path segment.

    Allowed: letters, digits, ``_``, ``-``, ``.``; starting with a letter or digit;
    at most 128 characters; not ``..``; not a Windows device name.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise InvalidNameError(
            f"{kind} {value!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no '/', '\\', '..' or spaces)"
        )
    if value.split(".", maxsplit=1)[0].upper() in _WINDOWS_RESERVED:
        raise InvalidNameError(f"{kind} {value!r} is a reserved device name on Windows")
    return value


def validate_rel_path(rel: str, *, key: str | None = None) -> str:
    """Check a working-copy relative path (POSIX separators) and return it normalized.

    Refused: empty, absolute, drive letters, backslashes, NUL and control characters,
    ``.`` or ``..`` segments, empty segments. ``key`` names the remote key in the message.
    """
    where = f"key {key!r}" if key is not None else f"path {rel!r}"
    problem = None
    if not rel:
        problem = "it is empty"
    elif "\x00" in rel or any(unicodedata.category(c) == "Cc" for c in rel):
        problem = "it contains NUL or control characters"
    elif "\\" in rel:
        problem = "it contains a backslash"
    elif rel.startswith("/"):
        problem = "it is absolute"
    elif _DRIVE.match(rel):
        problem = "it starts with a drive letter"
    else:
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = "it has an empty, '.' or '..' segment"
    if problem:
        raise InvalidNameError(
            f"{where} would map outside the working folder ({problem}); it is refused and "
            "nothing was written for it. Rename or remove that object in the store."
        )
    return rel


class WorkFolder:
    """Maps working-copy paths into one root, refusing any that would land outside.

    Each parent folder is resolved once (symlinks followed) and remembered, so
    mapping a thousand files in one folder costs one ``resolve``, not a thousand.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._resolved_root: Path | None = None
        self._safe_parents: set[Path] = set()

    def _inside(self, candidate: Path, rel: str, key: str | None) -> None:
        if self._resolved_root is None:
            self._resolved_root = self.root.resolve()
        try:
            candidate.resolve().relative_to(self._resolved_root)
        except ValueError as exc:
            raise InvalidNameError(
                f"{'key ' + repr(key) if key else 'path ' + repr(rel)} resolves outside the "
                f"working folder {self.root} (a symlink?); refused"
            ) from exc

    def path(self, rel: str, *, key: str | None = None) -> Path:
        """The local path of ``rel``, or ``InvalidNameError`` if it would escape the root."""
        validate_rel_path(rel, key=key)
        target = self.root.joinpath(*PurePosixPath(rel).parts)
        parent = target.parent
        if parent not in self._safe_parents:
            self._inside(parent, rel, key)
            self._safe_parents.add(parent)
        if target.is_symlink():
            self._inside(target, rel, key)
        return target


def local_path_for(root: Path, rel: str, *, key: str | None = None) -> Path:
    """The local path of ``rel`` inside ``root``, or ``InvalidNameError`` if it would escape."""
    return WorkFolder(root).path(rel, key=key)


@dataclass(frozen=True)
class StageKeys:
    """The keys of one project stage."""

    projekt_id: str
    stage: str

    def __post_init__(self) -> None:
        validate_name("projekt_id", self.projekt_id)
        validate_name("stage", self.stage)

    @property
    def lock(self) -> str:
        """``{projekt_id}/{stage}.lock.json``."""
        return f"{self.projekt_id}/{self.stage}.lock.json"

    @property
    def manifest(self) -> str:
        """``{projekt_id}/{stage}.manifest.json``."""
        return f"{self.projekt_id}/{self.stage}.manifest.json"

    @property
    def intent(self) -> str:
        """``{projekt_id}/{stage}.commit.json``: the commit intent (roll-forward record)."""
        return f"{self.projekt_id}/{self.stage}.commit.json"

    @property
    def committed_prefix(self) -> str:
        """``{projekt_id}/{stage}/``."""
        return f"{self.projekt_id}/{self.stage}/"

    def committed(self, rel: str) -> str:
        """The committed key of a working-copy path."""
        return self.committed_prefix + validate_rel_path(rel)

    def staging_prefix(self, session_id: str) -> str:
        """``{projekt_id}/.sessions/{session_id}/``."""
        validate_name("session_id", session_id)
        return f"{self.projekt_id}/.sessions/{session_id}/"

    def staged(self, session_id: str, rel: str) -> str:
        """The staging key of a working-copy path in one session."""
        return self.staging_prefix(session_id) + validate_rel_path(rel)

    def rel_from_committed(self, key: str) -> str:
        """The working-copy path of a committed key (validated)."""
        if not key.startswith(self.committed_prefix):
            raise InvalidNameError(f"key {key!r} is not under {self.committed_prefix!r}")
        return validate_rel_path(key[len(self.committed_prefix) :], key=key)
