"""Close's flush and the folder after its commit (used by ``checkin.close``).

Before the commit: send every change (``flush_all``), then hold what the watcher reports
while the commit runs. After it: which files were saved after the commit, from the held
reports when the watcher lost nothing, else by one walk (``folder_after_commit``).
"""

from __future__ import annotations

import os
import stat
import threading
from functools import partial
from typing import TYPE_CHECKING

from agent.errors import AgentError, JournalCorruptError, TransferError, WorkFolderReplacedError
from agent.folder.entries import LocalEntry, file_sha256, is_unchanged
from agent.folder.snapshot import FileStat, scan
from agent.folder.streamer import Held, Streamer
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import unsupported_reason
from agent.session import runtime
from agent.stage.manifest import Manifest
from agent.store.parallel import Progress

if TYPE_CHECKING:
    from agent.session import PlantDesignSession

log = get_logger(__name__)

# How often close looks at what is still to upload (for progress).
_FLUSH_POLL = 0.1
# How long close waits after its commit for the watcher to deliver what it saw (a file
# still being written by then: the folder is walked instead).
_AFTER_COMMIT_FLUSH = 5.0
# How long close waits for the watcher to take in the events of changes made before it
# (``Streamer.caught_up``); if it has not by then, the folder is walked.
_BARRIER_TIMEOUT = 5.0


def folder_after_commit(
    s: PlantDesignSession, streamer: Streamer, manifest: Manifest
) -> tuple[bool, list[str], list[str], bool]:
    """``(replaced, changed_after, unsynced, walked)``: ``replaced`` if the working folder
    is no longer the session's (replaced since the commit): then it is left as it is."""
    try:
        s._work_folder().check_identity()
        return (False, *_changed_since_commit(s, streamer, manifest))
    except WorkFolderReplacedError as exc:
        log.warning("close_left_replaced_folder", path=str(streamer.root), error=str(exc))
        return True, [], [], False


def _changed_since_commit(
    s: PlantDesignSession, streamer: Streamer, manifest: Manifest
) -> tuple[list[str], list[str], bool]:
    """Paths saved after close's final flush (an autosave during a long commit), and what
    the store does not hold (links, special files, names it cannot hold).

    With a watcher that lost nothing, only what it reported during the commit (held by
    ``_final_flush``) is looked at; otherwise the folder is walked once.
    """
    held = _held_after_commit(streamer)
    if held is None:
        return (*_changed_by_walk(s, streamer, manifest), True)
    return (*_changed_among(s, streamer, manifest, held), False)


def _held_after_commit(streamer: Streamer) -> Held | None:
    """What the watcher reported since the hold, if it saw everything (else None: walk)."""
    if not streamer.caught_up(_BARRIER_TIMEOUT):
        return None
    if not streamer.flush_watcher(_AFTER_COMMIT_FLUSH):
        return None
    held = streamer.held()
    if held is None or "" in held.subtrees:
        return None
    return held


def _changed_among(
    s: PlantDesignSession, streamer: Streamer, manifest: Manifest, held: Held
) -> tuple[list[str], list[str]]:
    """``_changed_by_walk``'s answer from the held reports, the links, special files and
    unsupported names the streamer knows, and a walk of each held subtree only."""
    identity = s._work_folder().identity
    folder = WorkFolder(streamer.root, identity)
    candidates = set(held.paths) | set(streamer.others()) | set(streamer.unsupported())
    for subtree in held.subtrees:
        others: list[str] = []
        candidates.update(scan(streamer.root, s.rules, subtree, others=others, identity=identity))
        candidates.update(others)
        prefix = f"{subtree}/"
        candidates.update(rel for rel in manifest.files if rel.startswith(prefix))
    known = streamer.known()
    changed: list[str] = []
    unsynced: list[str] = []
    for rel in sorted(candidates):
        if s.rules.is_ignored(rel):
            continue
        if unsupported_reason(rel) is not None:  # a name the store cannot hold: kept aside
            if os.path.lexists(streamer.root.joinpath(*rel.split("/"))):
                unsynced.append(rel)
            continue
        st = _lstat(folder, rel)
        if st is None or not stat.S_ISREG(st.st_mode):
            if st is not None and not stat.S_ISDIR(st.st_mode):
                unsynced.append(rel)  # a link or special file: never sent, kept aside
            if rel in manifest.files:
                changed.append(rel)  # gone, or replaced since the final flush
            continue
        if _changed(folder, rel, st, manifest, known):
            changed.append(rel)
    return changed, unsynced


def _lstat(folder: WorkFolder, rel: str) -> os.stat_result | None:
    """``lstat`` of ``rel`` in the working folder (never through a link); None if there
    is nothing there (or nothing the folder's rules let us look at)."""
    try:
        return folder.path(rel).lstat()
    except (OSError, AgentError):
        return None


def _changed(
    folder: WorkFolder,
    rel: str,
    st: os.stat_result | FileStat,
    manifest: Manifest,
    known: dict[str, LocalEntry],
) -> bool:
    """The file at ``rel`` is not the committed one (read only when its stat says maybe)."""
    committed = manifest.files.get(rel)
    k = known.get(rel)
    return (
        committed is None
        or k is None
        or k.sha256 != committed.sha256
        or not is_unchanged(k, st, partial(_hash_of, folder, rel))
    )


def _changed_by_walk(
    s: PlantDesignSession, streamer: Streamer, manifest: Manifest
) -> tuple[list[str], list[str]]:
    """``_changed_since_commit`` by one walk of the whole folder."""
    known = streamer.known()
    others: list[str] = []
    current = scan(streamer.root, s.rules, others=others, identity=s._work_folder().identity)
    folder = WorkFolder(streamer.root)
    unstorable = {rel for rel in current if unsupported_reason(rel) is not None}
    changed = [
        rel
        for rel, st in current.items()
        if rel not in unstorable  # reported apart, kept aside by the cache
        and _changed(folder, rel, st, manifest, known)
    ]
    changed += [rel for rel in manifest.files if rel not in current]
    unsynced = others + [rel for rel in current if rel in unstorable]
    return sorted(set(changed)), sorted(unsynced)


def flush_all(s: PlantDesignSession, streamer: Streamer) -> tuple[Streamer, bool]:
    """Send everything; a journal that went bad is rebuilt from the folder (content
    already in ``.objects/`` is checked, not sent again). The streamer to use, and
    whether the folder was walked."""
    try:
        return streamer, _final_flush(s, streamer)
    except JournalCorruptError as exc:
        streamer = runtime.rebuild_journal(s, exc)
        return streamer, _final_flush(s, streamer)


def _final_flush(s: PlantDesignSession, streamer: Streamer) -> bool:
    """Send every change, then hold what the watcher reports while the commit runs.

    A watcher that has run in ``events`` mode and lost nothing since the folder was last
    compared whole has journalled every change: close does not walk the folder (at
    100,000 files a walk is a second). Otherwise the watcher stops and the folder is
    walked, as ever. What is saved during the commit is held (``Streamer.hold``), not
    sent: after the commit it tells which files changed after it.
    """
    walk = not streamer.caught_up(_BARRIER_TIMEOUT)
    if walk:
        streamer.stop_watching()
        streamer.rescan("")
    else:
        streamer.check_linked()  # a name written through from outside makes no event
    _flush_or_raise(s, streamer)
    if streamer.is_watching:
        streamer.hold()
        _flush_or_raise(s, streamer)  # what was journalled just before the hold
    return walk


def release_hold(streamer: Streamer) -> None:
    """After a failed close: journal what was saved during it (the session goes on)."""
    try:
        streamer.release()
    except (AgentError, OSError) as exc:  # the next rescan finds it
        log.warning("close_hold_release_failed", error=str(exc))


def _hash_of(folder: WorkFolder, rel: str) -> str:
    return file_sha256(folder.path(rel))


def _flush_or_raise(s: PlantDesignSession, streamer: Streamer) -> None:
    """Wait for staging to hold every change, reporting progress by bytes sent."""
    timeout = s.config.transfer.close_timeout
    total = streamer.journal.pending_count()
    if not total:
        flushed = streamer.flush(timeout=timeout)
    else:
        size_left = partial(_pending_bytes, streamer)
        progress = Progress(f"Uploading {total} changes", size_left(), s.progress.emit)
        outcome: list[bool] = []
        waiter = threading.Thread(
            target=lambda: outcome.append(streamer.flush(timeout=timeout)),
            name="pdagent-close-flush",
            daemon=True,
        )
        waiter.start()
        while waiter.is_alive():
            waiter.join(_FLUSH_POLL)
            progress.advance_to(progress.total - size_left())
        flushed = bool(outcome and outcome[0])
        if flushed:
            progress.finish()
    if not flushed:
        pending = streamer.journal.pending()
        raise TransferError(
            f"{len(pending)} changes could not be sent to the store "
            f"(last error: {streamer.last_error or 'timed out'}). Nothing was committed and "
            "the lock is kept; check the connection and run close again",
            failed=len(pending),
        )


def _pending_bytes(streamer: Streamer) -> int:
    return streamer.journal.pending_bytes()
