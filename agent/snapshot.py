"""Pure-ish snapshots of a folder: ``path -> (size, mtime_ns)`` and their difference.

Used by the reconciliation scan (the safety net for missed watch events), by
``close``'s quick scan and by ``open`` when it reuses a cached copy. Symlinks,
ignored names and our own temp files are skipped.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.ignore import IgnoreRules

__all__ = ["FileStat", "diff", "scan"]


@dataclass(frozen=True)
class FileStat:
    """Size and modification time of one file."""

    size: int
    mtime_ns: int


def scan(root: Path, rules: IgnoreRules, subtree: str = "") -> dict[str, FileStat]:
    """Every regular file below ``root/subtree``, keyed by POSIX path relative to ``root``."""
    out: dict[str, FileStat] = {}
    start = root.joinpath(*subtree.split("/")) if subtree else root
    stack = [(start, subtree)]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            if rules.is_ignored(rel):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), rel))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = FileStat(st.st_size, st.st_mtime_ns)
    return out


def diff(old: dict[str, FileStat], new: dict[str, FileStat]) -> tuple[set[str], set[str]]:
    """``(changed_or_added, removed)`` between two snapshots."""
    changed = {rel for rel, st in new.items() if old.get(rel) != st}
    return changed, set(old) - set(new)
