"""What enters the journal: the intake half of ``Streamer``.

A path the watcher (or a rescan) reports is journalled as a ``put`` if it is a file,
as a ``delete`` if it is gone; links and special files are never sent (remembered for
``status``), names the store cannot hold are remembered for close, and a file with
several names (hard links) has its other names looked at too.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, LocalFileError, WorkFolderReplacedError
from agent.folder.entries import LocalEntry
from agent.folder.ignore import IgnoreRules
from agent.folder.journal import Change, Journal
from agent.folder.sender import StoredFile
from agent.folder.snapshot import FileStat, scan
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import printable, unsupported_reason

if TYPE_CHECKING:
    from agent.folder.watcher import Watcher

__all__ = ["Intake", "describe_unsupported", "special_kind"]

log = get_logger(__name__)


def special_kind(st: os.stat_result | FileStat) -> str:
    """What a folder entry that is neither a regular file nor a folder is, in words."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if getattr(st, "st_reparse_tag", 0):  # pragma: no cover - Windows
        return "junction or reparse point"
    return "not a regular file"


def describe_unsupported(unsupported: dict[str, str]) -> str:
    """Close's refusal: which local files the store cannot hold, and the two ways on."""
    shown = [f"{printable(rel)} ({why})" for rel, why in sorted(unsupported.items())[:10]]
    more = f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
    return (
        f"{len(unsupported)} local files have names the store cannot hold: "
        f"{'; '.join(shown)}{more}. Nothing was committed and the lock is kept. Rename them "
        "(no backslash, control character or invalid UTF-8), or close with --skip-unsupported "
        "(library: close(skip_unsupported=True)) to commit without them; they are then kept "
        "beside the working folder, never deleted."
    )


class Intake:
    """The intake of ``Streamer`` (a mixin: it shares the streamer's tables and locks)."""

    if TYPE_CHECKING:  # the streamer's, set in ``Streamer.__init__``
        root: Path
        base: Mapping[str, StoredFile]
        journal: Journal
        rules: IgnoreRules
        _folder: WorkFolder
        _known: dict[str, LocalEntry]
        _known_lock: threading.Lock
        _unsupported: dict[str, str]
        _linked: dict[int, set[str]]
        _others: dict[str, str]
        _wake: threading.Event
        _watcher: Watcher | None
        _trusted_at: int | None

        def _held_back(self, paths: Iterable[str] = (), subtree: str | None = None) -> bool: ...

        def _report(self, message: str) -> None: ...

    def on_dirty(
        self,
        paths: set[str],
        scanned: Mapping[str, FileStat] | None = None,
        *,
        other_names: bool = True,
    ) -> None:
        """Journal each path as a put (a file) or a delete (gone); wake the uploader.

        A file whose stat tuple is the one of the content the store holds is skipped
        (``LocalEntry.matches``); any other file is journalled and the uploader hashes
        it, sending it only if the hash differs from what the store holds. Links and
        special files are never files here: one that replaced a tracked file is a delete.
        ``scanned``: stats a ``scan`` just took (its walk never follows a link), used
        as they are instead of a second ``lstat`` of each path. ``other_names``: a changed
        file with several names (hard links) has its other known names looked at too.
        """
        if not self._held_back(paths):
            self._intake(paths, scanned, other_names=other_names)

    def _intake(
        self, paths: set[str], scanned: Mapping[str, FileStat] | None, *, other_names: bool
    ) -> None:
        items: list[Change] = []
        linked: set[int] = set()
        for rel in sorted(paths):
            if self.rules.is_ignored(rel):
                continue
            if (reason := unsupported_reason(rel)) is not None:
                self._note_unsupported(rel, reason)
                continue
            st: os.stat_result | FileStat | None = scanned.get(rel) if scanned else None
            try:
                if st is None:
                    st = self._folder.path(rel).lstat()
            except WorkFolderReplacedError as exc:  # nothing there is the session's: no delete
                self._report(str(exc))
                return
            except LocalFileError as exc:  # a folder on the way is a link: not followed
                log.warning("not_synchronised", path=rel, reason=str(exc))
            except AgentError:
                log.warning("path_refused", path=rel)
                continue
            except OSError:
                pass
            self._note_other(rel, st)
            if st is not None and stat.S_ISREG(st.st_mode):
                if self._note_links(rel, st):
                    linked.add(st.st_ino)
                with self._known_lock:
                    known = self._known.get(rel)
                if known is not None and known.matches(st):
                    continue
                items.append((rel, "put", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            elif self._is_tracked(rel):
                items.append((rel, "delete", None, None, None, None))
        self._journal(items, linked if other_names else set(), paths)

    def _journal(self, items: list[Change], linked: set[int], paths: set[str]) -> None:
        """Record ``items``; then look at the other names of a changed file with several."""
        if not items:
            return
        self.journal.record_many(items)
        self._wake.set()
        others = self._names_of(linked, {item[0] for item in items}) - paths
        if others:
            self.on_dirty(others, other_names=False)  # at once: they get no event of their own

    def _note_other(self, rel: str, st: os.stat_result | FileStat | None) -> None:
        """Remember (and log once) a link or special file at ``rel``; forget it otherwise."""
        kind = None
        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            kind = special_kind(st)
        with self._known_lock:
            before = self._others.pop(rel, None) if kind is None else self._others.get(rel)
            if kind is not None:
                self._others[rel] = kind
        if kind is not None and kind != before:
            committed = rel in self.base
            log.warning(
                "not_synchronised",
                path=printable(rel),
                reason=f"a {kind}: never followed nor sent"
                + ("; close deletes the committed file of that name" if committed else ""),
            )

    def not_synchronised(self) -> list[dict[str, object]]:
        """The links and special files in the folder: path, what it is, and whether close
        deletes the committed file of that name (the link replaced it)."""
        with self._known_lock:
            others = dict(self._others)
        return [
            {"path": printable(rel), "reason": kind, "deletes_committed": rel in self.base}
            for rel, kind in sorted(others.items())
        ]

    def others(self) -> dict[str, str]:
        """The links and special files in the folder: path -> what it is."""
        with self._known_lock:
            return dict(self._others)

    def _note_links(self, rel: str, st: os.stat_result | FileStat) -> bool:
        """Remember ``rel`` under its inode if the file has several names; True if so."""
        with self._known_lock:
            if st.st_nlink > 1:
                self._linked.setdefault(st.st_ino, set()).add(rel)
                return True
            names = self._linked.get(st.st_ino)
            if names is not None:
                names.discard(rel)
                if not names:
                    del self._linked[st.st_ino]
            return False

    def _names_of(self, inodes: set[int], among: set[str]) -> set[str]:
        """Every known name of the ``inodes`` that had a change among ``among``."""
        with self._known_lock:
            return {
                name
                for ino in inodes
                if among & (names := self._linked.get(ino, set()))
                for name in names
            }

    def check_linked(self) -> None:
        """Check every name of the files with several names against what the store holds.

        A write through a name outside the working folder makes no event inside it; this
        (every second, from the uploader loop) finds it. A stat per such name.
        """
        with self._known_lock:
            names = {name for names in self._linked.values() for name in names}
            known = {name: self._known.get(name) for name in names}
        dirty = set()
        for rel in names:
            try:
                st = self._folder.path(rel).lstat()
            except (OSError, AgentError):
                dirty.add(rel)  # gone (or now a link): on_dirty decides
                continue
            entry = known[rel]
            if entry is None or not entry.matches(st) or st.st_nlink < 2:
                dirty.add(rel)
        if dirty:
            self.on_dirty(dirty)

    def _is_tracked(self, rel: str) -> bool:
        with self._known_lock:
            if rel in self._known:
                return True
        return rel in self.base or self.journal.staged_entry(rel) is not None

    def rescan(self, subtree: str = "") -> None:
        """Compare a subtree with what the store holds; journal the differences."""
        if self._held_back(subtree=subtree):
            return
        watcher = self._watcher
        losses = watcher.losses if watcher is not None and not subtree else None
        others: list[str] = []
        current = scan(
            self.root, self.rules, subtree, others=others, identity=self._folder.identity
        )
        prefix = f"{subtree}/" if subtree else ""
        with self._known_lock:
            known = {
                k: v
                for k, v in self._known.items()
                if not prefix or k.startswith(prefix) or k == subtree
            }
        dirty = {
            rel for rel, st in current.items() if (k := known.get(rel)) is None or not k.matches(st)
        }
        dirty |= set(known) - set(current)
        with self._known_lock:
            dirty |= {r for r in self._unsupported if r.startswith(prefix) or r == subtree}
            dirty |= {r for r in others if self._others.get(r) is None}
            dirty |= {r for r in self._others if r.startswith(prefix) or r == subtree} - set(others)
        if dirty:
            log.info("rescan_found_changes", subtree=subtree, paths=len(dirty))
            self.on_dirty(dirty, current)
        if losses is not None:  # the whole folder compared while watched: trusted from here
            self._trusted_at = losses

    def _note_unsupported(self, rel: str, reason: str) -> None:
        """A name the store cannot hold: remembered (for status and close) while it exists."""
        try:
            st = self.root.joinpath(*rel.split("/")).lstat()
        except OSError:
            st = None
        with self._known_lock:
            if st is None or stat.S_ISDIR(st.st_mode):
                self._unsupported.pop(rel, None)
                return
            is_new = rel not in self._unsupported
            self._unsupported[rel] = reason
        if is_new:
            log.warning("name_not_supported", path=printable(rel), reason=reason)

    def unsupported(self) -> dict[str, str]:
        """Local files whose names the store cannot hold (never sent, never deleted): reasons."""
        with self._known_lock:
            return dict(self._unsupported)

    def check_storable(self, *, skip: bool) -> dict[str, str]:
        """The unsupported names; unless ``skip``, any at all is a ``LocalFileError`` (close)."""
        unsupported = self.unsupported()
        if unsupported and not skip:
            raise LocalFileError(describe_unsupported(unsupported))
        return unsupported
