"""A local cache of committed working copies that survives ``close``.

After a successful close the working folder is *moved* (not copied) to
``<cache>/<projekt_id>/<stage>/files`` together with a snapshot of what each
file is (size, mtime, ctime, inode and the sha256 that was committed). The next
``open`` of that stage moves it back and downloads only what the manifest says
changed, so re-opening an unchanged copy transfers nothing. Bounded by
``transfer.cache_max_bytes`` (least recently used stage copies go first);
deleting the cache folder is always safe.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from pydantic_core import from_json

from agent.folder.entries import LocalEntry, file_sha256, is_unchanged
from agent.folder.ignore import IgnoreRules
from agent.log import get_logger
from agent.names import is_plain, unsupported_reason, validate_name

__all__ = ["StageCache", "set_aside_unsynced"]

log = get_logger(__name__)


class StageCache:
    """Moves whole stage copies in and out of the cache folder."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        enabled: bool = True,
        rules: IgnoreRules | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self.rules = rules if rules is not None else IgnoreRules(())

    def _entry(self, projekt_id: str, stage: str) -> Path:
        return self.root / validate_name("projekt_id", projekt_id) / validate_name("stage", stage)

    def take(
        self,
        projekt_id: str,
        stage: str,
        dest: Path,
        *,
        set_aside: bool = True,
        known: Mapping[str, tuple[int, str | None]] | None = None,
    ) -> dict[str, LocalEntry]:
        """Move a cached copy to ``dest`` (which must not exist); return its snapshot.

        Returns an empty snapshot (and leaves ``dest`` absent) when nothing is cached.
        A link, special file or unstorable name found in the cached copy (a cache
        written before issue 8) is set aside beside ``dest`` first, never put in place;
        ``set_aside=False``: the caller walks ``dest`` right after and sets them aside
        itself (``set_aside``), so the copy is walked once, not twice. ``known``: the
        manifest's ``path -> (size, sha256)``; an entry with the same sha256 shares that
        string (one copy of each hash held, not two: 11 MiB at 100,000 files).
        """
        entry = self._entry(projekt_id, stage)
        files = entry / "files"
        if not self.enabled or not files.is_dir():
            return {}
        try:
            snapshot = _read_snapshot(entry / "snapshot.json", known or {})
            dest.parent.mkdir(parents=True, exist_ok=True)
            if set_aside:
                set_aside_unsynced(
                    files, snapshot, _aside_for(dest), self.rules, check_content=False
                )
            _move(files, dest)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("cache_entry_unusable", projekt_id=projekt_id, stage=stage, error=str(exc))
            shutil.rmtree(entry, ignore_errors=True)
            return {}
        shutil.rmtree(entry, ignore_errors=True)
        log.info("cache_hit", projekt_id=projekt_id, stage=stage, files=len(snapshot))
        return snapshot

    def put(
        self,
        projekt_id: str,
        stage: str,
        folder: Path,
        snapshot: dict[str, LocalEntry],
        *,
        unsynced: list[str] | None = None,
    ) -> list[str]:
        """Move ``folder`` into the cache with its snapshot, then prune to the size bound.

        What the store does not hold is never cached nor deleted: links, special files,
        names the store cannot hold, and files not in ``snapshot`` (or changed since)
        are first moved to ``<folder>.kept-<time>`` beside it, and their paths
        returned. When the cache is disabled (or the move fails) the rest is removed.
        ``unsynced``: those paths, if the caller has just walked the folder and compared
        every file with ``snapshot`` (close does): moved without walking it again.
        """
        aside = _aside_for(folder)
        if unsynced is None:
            kept = set_aside_unsynced(folder, snapshot, aside, self.rules, check_content=True)
        else:
            kept = _move_aside(folder, unsynced, aside)
        if not self.enabled:
            shutil.rmtree(folder, ignore_errors=True)
            return kept
        entry = self._entry(projekt_id, stage)
        try:
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir(parents=True)
            now = time.time_ns()
            with (entry / "snapshot.json").open("wb") as out:  # in pieces, not 16 MB at once
                out.write(b'{"cached_at_ns":%d,"files":' % now)
                out.writelines(LocalEntry.many_to_json_chunks(snapshot))
                out.write(b"}")
            # What ``prune`` needs, so it does not parse every snapshot (16 MB at 100,000 files).
            total = sum(e.size for e in snapshot.values())
            (entry / "size.json").write_text(json.dumps({"cached_at_ns": now, "bytes": total}))
            _move(folder, entry / "files")
        except OSError as exc:
            log.warning("cache_put_failed", projekt_id=projekt_id, stage=stage, error=str(exc))
            shutil.rmtree(entry, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            return kept
        self.prune()
        return kept

    def set_aside(self, folder: Path, rels: list[str]) -> list[str]:
        """Move ``rels`` (links, special files, unstorable names a walk of ``folder`` found)
        to ``<folder>.kept-<time>`` beside it; the paths moved."""
        return _move_aside(folder, rels, _aside_for(folder)) if rels else []

    def keep_unsynced(self, folder: Path) -> list[str]:
        """Before a folder is thrown away (abort, discard): set aside what the store cannot hold.

        Links, special files and names the store cannot hold go to ``<folder>.kept-<time>``.
        """
        if not folder.is_dir() or folder.is_symlink():
            return []
        return set_aside_unsynced(folder, {}, _aside_for(folder), self.rules, check_content=False)

    def prune(self) -> None:
        """Drop least recently cached stage copies until the cache fits ``max_bytes``."""
        if not self.root.is_dir():
            return
        entries: list[tuple[int, int, Path]] = []
        for snap in self.root.glob("*/*/snapshot.json"):
            try:
                entries.append((*_cached_size(snap), snap.parent))
            except (OSError, ValueError, TypeError, IndexError, KeyError):
                shutil.rmtree(snap.parent, ignore_errors=True)
        used = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if used <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            used -= size
            log.info("cache_evicted", path=str(path), bytes=size)


def _cached_size(snap: Path) -> tuple[int, int]:
    """``(cached_at_ns, bytes)`` of a cache entry: from ``size.json``, or (an entry an
    older agent wrote) summed from the snapshot."""
    try:
        raw = json.loads((snap.parent / "size.json").read_bytes())
        return int(raw["cached_at_ns"]), int(raw["bytes"])
    except FileNotFoundError:
        raw = from_json(snap.read_bytes())
        return int(raw["cached_at_ns"]), sum(int(v[0]) for v in raw["files"].values())


def _read_snapshot(
    path: Path, known: Mapping[str, tuple[int, str | None]]
) -> dict[str, LocalEntry]:
    """The ``files`` of a ``snapshot.json``; the parsed lists are freed one by one as their
    entries are made, so the whole parse and the whole snapshot are never held at once."""
    raw = from_json(path.read_bytes())["files"]
    if not isinstance(raw, dict):
        raise TypeError("snapshot files is not an object")
    rels = list(raw)
    snapshot: dict[str, LocalEntry] = {}
    for rel in rels:
        value = raw.pop(rel)
        wanted = known.get(rel)
        if wanted is not None and isinstance(value, list) and len(value) > 2:
            sha = wanted[1]
            if sha is not None and sha == value[2]:
                value[2] = sha
        snapshot[rel] = LocalEntry.from_list(value)
    return snapshot


def _aside_for(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}")


def set_aside_unsynced(
    folder: Path,
    snapshot: dict[str, LocalEntry],
    aside: Path,
    rules: IgnoreRules,
    *,
    check_content: bool,
) -> list[str]:
    """Move what the store does not hold out of ``folder`` into ``aside``; the moved paths.

    Walked with ``lstat`` (links are moved as links, never followed): links,
    special files, names the store cannot hold, and (``check_content``) regular
    files that are not in ``snapshot`` or changed since it was taken. Ignored names
    (editor lock files) are not judged: they stay. ``aside`` is made only if needed.
    """
    unsynced: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(folder / rel_dir if rel_dir else folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if rules.is_ignored_entry(rel, entry.name):
                continue  # never sent, so never judged: stays with the copy
            unstorable = unsupported_reason(rel) is not None
            if is_plain(st) and stat.S_ISDIR(st.st_mode) and not unstorable:
                stack.append(rel)
                continue
            if is_plain(st) and stat.S_ISREG(st.st_mode) and not unstorable:
                if not check_content:
                    continue
                known = snapshot.get(rel)
                if is_unchanged(known, st, partial(_hash_entry, entry)):
                    continue
            unsynced.append(rel)
    return _move_aside(folder, unsynced, aside)


def _move_aside(folder: Path, rels: list[str], aside: Path) -> list[str]:
    """Move each of ``rels`` (a link is moved as a link) from ``folder`` into ``aside``."""
    moved: list[str] = []
    for rel in rels:
        target = aside.joinpath(*rel.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.joinpath(*rel.split("/")).rename(target)
        except OSError as exc:
            log.error("set_aside_failed", path=rel, error=str(exc))
            continue
        moved.append(rel)
    if moved:
        log.warning("kept_aside", folder=str(aside), paths=sorted(moved))
    return sorted(moved)


def _hash_entry(entry: os.DirEntry[str]) -> str:
    """The sha256 of a scanned file, its path built only when it must be read."""
    return file_sha256(Path(entry.path))


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError:
        shutil.move(str(src), str(dst))
