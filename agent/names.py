"""Names that may become keys and local paths: checked before anything is written.

A projekt_id, stage, user or session id is one safe path segment (``validate_name``);
a working-copy path uses POSIX separators and never leaves the folder
(``validate_rel_path``). Pure functions, no I/O.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable

from agent.errors import InvalidNameError

__all__ = [
    "case_collisions",
    "is_plain",
    "printable",
    "unsupported_reason",
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


def printable(rel: str) -> str:
    """``rel`` safe to print and to put in JSON: undecodable bytes shown as ``\\xNN``."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def case_collisions(rels: Iterable[str]) -> list[list[str]]:
    """Groups of paths that differ only in case (``A.dwg``/``a.dwg``, ``Docs/x``/``docs/x``).

    The store tells them apart; a case-folding file system (Windows, macOS) cannot.
    """
    groups: dict[str, list[str]] = {}
    for rel in rels:
        groups.setdefault(rel.casefold(), []).append(rel)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def unsupported_reason(rel: str) -> str | None:
    """Why the store cannot hold a local path (a name our keys refuse), or None if it can.

    Backslashes, control characters and names that are not valid UTF-8 (kept by
    Python as surrogate escapes) cannot become keys.
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    try:
        validate_rel_path(rel)
    except InvalidNameError as exc:
        text = str(exc)
        return text[text.find("(") + 1 : text.find(")")] if "(" in text else text
    return None


# Unicode category Cc is exactly these: C0 controls, DEL and the C1 controls.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\]")


def _is_clean(rel: str) -> bool:
    """The common case, cheaply: nothing ``validate_rel_path`` refuses (a 100,000-file
    manifest is checked on every parse; building each message up front cost 0.3 s)."""
    if not rel or rel[0] == "/" or _UNSAFE.search(rel) or _DRIVE.match(rel):
        return False
    wrapped = f"/{rel}/"
    return "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped


def validate_rel_path(rel: str, *, key: str | None = None) -> str:
    """Check a working-copy relative path (POSIX separators) and return it normalized.

    Refused: empty, absolute, drive letters, backslashes, NUL and control characters,
    ``.`` or ``..`` segments, empty segments. ``key`` names the remote key in the message.
    """
    if _is_clean(rel):
        return rel
    where = f"key {key!r}" if key is not None else f"path {rel!r}"
    problem = None
    if not rel:
        problem = "it is empty"
    elif _CONTROL.search(rel):
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


def is_plain(st: os.stat_result) -> bool:
    """Not a link and not a reparse point (a junction or OneDrive placeholder on Windows)."""
    return not stat.S_ISLNK(st.st_mode) and not getattr(st, "st_reparse_tag", 0)
