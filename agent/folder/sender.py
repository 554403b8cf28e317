"""One journal row to ``.objects/``: the sending half of ``Streamer``.

A put row is hashed first when the store already holds something of its size (equal
content is not sent again), then sent from the descriptor that hashed it to
``.objects/{sha256}``; a file still being written is sent as a copy of what it holds
now. A delete row only forgets the path: objects are shared, only ``history prune``
removes them.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.errors import AgentError, LocalFileError, WorkFolderReplacedError
from agent.folder.entries import LocalEntry, fd_sha256
from agent.folder.journal import Journal
from agent.folder.snapshot import FileStat
from agent.folder.transfer import FileKeptChangingError, Transfers, Upload, Uploaded, same_stat
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import printable
from agent.platform import executable_bit

__all__ = ["ContentKeys", "Sender", "StoredFile"]

log = get_logger(__name__)

_GROWING_TRIES = 2  # a file changing during this many upload tries is sent as a copy
_COPY_CHUNK = 1 << 20


class ContentKeys(Protocol):
    """Where content is stored: ``.objects/{sha256}`` of the project (``StageKeys`` is one)."""

    @property
    def objects_prefix(self) -> str: ...

    def version(self, sha256: str) -> str: ...


class StoredFile(Protocol):
    """What the store holds for a committed file (``ManifestEntry`` is one)."""

    @property
    def sha256(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def executable(self) -> bool: ...

    @property
    def etag(self) -> str: ...


class Sender:
    """The sending of ``Streamer`` (a mixin: it shares the streamer's tables and locks)."""

    if TYPE_CHECKING:  # the streamer's, set in ``Streamer.__init__``
        keys: ContentKeys
        session_id: str
        base: Mapping[str, StoredFile]
        journal: Journal
        uploads: int
        reused: int
        last_upload_at: datetime | None
        _folder: WorkFolder
        _transfers: Transfers
        _copies: Path
        _known: dict[str, LocalEntry]
        _known_lock: threading.Lock
        _stored: dict[str, str] | None

        def _note_other(self, rel: str, st: os.stat_result | FileStat | None) -> None: ...

        def _is_tracked(self, rel: str) -> bool: ...

        def _remember(self, rel: str, entry: LocalEntry) -> None: ...

    def _held(self, rel: str) -> tuple[str, int, bool | None] | None:
        """``(sha256, size, executable)`` the store holds for ``rel`` (staged, else base)."""
        staged = self.journal.staged_entry(rel)
        if staged is not None:
            if staged.op != "put":
                return None
            return (staged.sha256, staged.size, staged.executable)
        base = self.base.get(rel)
        return (base.sha256, base.size, base.executable) if base is not None else None

    def _put(self, rel: str, seq: int) -> bool:
        """Send a put row; True if the row is finished (no newer save arrived meanwhile).

        The file is hashed first when the store already holds something of its size:
        equal content is not sent again (a ``touch``, a ``chmod``, a tool that rewrote
        the same bytes), other content always is, whatever its size and mtime say.
        """
        failed: LocalFileError | None = None
        try:
            with self._folder.open_file(rel) as (fd, opened):
                st = opened
                held = self._held(rel)
                known: tuple[os.stat_result, str] | None = None
                for _try in range(3):  # a file written while hashed is hashed again
                    if held is None or st.st_size != held[1]:
                        break
                    digest = fd_sha256(fd)
                    after = os.fstat(fd)
                    if not same_stat(st, after):
                        st = after
                        continue
                    known = (st, digest)
                    mode_kept = held[2] is None or executable_bit(st.st_mode) in (None, held[2])
                    if digest == held[0] and mode_kept:
                        finished = self.journal.mark_done(rel, seq, unchanged=True)
                        self._remember(rel, LocalEntry.from_stat(st, digest))
                        return finished
                    break
                # Sent from this descriptor: the file is opened (and its path checked) once,
                # to ``.objects/{sha256}``, and only if that content is not there yet.
                item = Upload(
                    rel=rel,
                    key=self.keys.objects_prefix,
                    src=self._folder.root.joinpath(*rel.split("/")),
                )
                try:
                    done = self._transfers.upload_one(
                        item,
                        None,
                        known=known,
                        fd=fd,
                        objects=self.keys.version,
                        stored=self._stored_etag,
                        tries=_GROWING_TRIES,
                    )
                except FileKeptChangingError:  # still being written: a copy of it as it is
                    done = self._send_copy(rel, fd)
                except LocalFileError as exc:  # a read error, not a link: reported below
                    failed = exc
        except FileNotFoundError:
            return self._gone(rel, seq)
        except WorkFolderReplacedError:
            raise  # the folder, not the file: retried (and shown) until it is back
        except LocalFileError as exc:  # now a link, special file or folder: never followed
            self._replaced(rel, exc)
            return self._gone(rel, seq)
        if failed is not None:
            if not isinstance(failed.__cause__, FileNotFoundError):
                raise failed
            return self._gone(rel, seq)  # renamed away meanwhile (rsync's temp file): no error
        return self._sent(rel, seq, done)

    def _send_copy(self, rel: str, fd: int) -> Uploaded:
        """Send a copy of a file a program is still writing (a log, a long export).

        The bytes it has now (its size when the copy starts: a prefix, for a file that
        grows) are read once from ``fd`` into a private file outside the working folder,
        which is hashed and sent: the store holds exactly those bytes under their hash.
        The row is then done with the copy's stat, which the file never matches: its next
        save or scan sends it again, superseding this copy, and close (which waits until
        the file stops changing) sends its final bytes. Never committed half-way.
        """
        folder = self._copies
        folder.mkdir(parents=True, exist_ok=True)
        copy_fd, name = tempfile.mkstemp(prefix="growing-", dir=folder)
        try:
            left = os.fstat(fd).st_size
            os.lseek(fd, 0, os.SEEK_SET)  # our own descriptor, opened for this upload
            while left > 0 and (chunk := os.read(fd, min(left, _COPY_CHUNK))):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(copy_fd, view) :]
                left -= len(chunk)
            item = Upload(rel=rel, key=self.keys.objects_prefix, src=Path(name))
            done = self._transfers.upload_one(
                item, None, fd=copy_fd, objects=self.keys.version, stored=self._stored_etag
            )
        finally:
            os.close(copy_fd)
            Path(name).unlink(missing_ok=True)
        log.info("streamed_copy_of_growing_file", path=printable(rel), bytes=done.size)
        return done

    def _replaced(self, rel: str, exc: LocalFileError) -> None:
        """A file to send is no longer a file: say what it is now, truthfully."""
        try:
            st = self._folder.path(rel).lstat()
        except (OSError, AgentError):
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            log.info("file_replaced_by_folder", path=printable(rel))
        elif st is not None and not stat.S_ISREG(st.st_mode):
            self._note_other(rel, st)
        else:  # a folder on the way is a link
            log.warning("not_synchronised", path=printable(rel), reason=str(exc))

    def _sent(self, rel: str, seq: int, done: Uploaded) -> bool:
        """The store holds ``done``: mark the row, remember it; True if the row is finished."""
        finished = self.journal.mark_done(
            rel,
            seq,
            etag=done.etag,
            size=done.size,
            sha256=done.sha256,
            mtime_ns=done.mtime_ns,
            executable=executable_bit(done.mode),
        )
        if finished:
            self._remember(rel, done.entry())
        with self._known_lock:
            if self._stored is not None:
                self._stored[done.sha256] = done.etag
        if done.sent:
            self.uploads += 1
        else:
            self.reused += 1
        self.last_upload_at = datetime.now(UTC)
        log.info(
            "streamed",
            path=rel,
            key=done.key,
            bytes=done.size if done.sent else 0,
            already_stored=not done.sent,
            session_id=self.session_id,
        )
        return finished

    def _stored_etag(self, sha256: str) -> str | None:
        """The ETag of ``.objects/{sha256}`` as the base manifest or this session knows it."""
        with self._known_lock:
            if self._stored is None:
                self._stored = {e.sha256: e.etag for e in self.base.values() if e.etag}
                for staged in self.journal.staged().values():
                    if staged.op == "put" and staged.etag:
                        self._stored[staged.sha256] = staged.etag
            return self._stored.get(sha256)

    def _gone(self, rel: str, seq: int) -> bool:
        """The file is not there (any more): a delete if the store has it, else nothing."""
        if self._is_tracked(rel):
            self.journal.record(rel, "delete")
            return False
        return self.journal.mark_done(rel, seq)

    def _delete(self, rel: str, seq: int) -> bool:
        """Apply a delete row; True if finished."""
        # The object a put sent stays: content is shared by every name and stage that
        # has it, and only the collection (``history prune``) removes unreferenced ones.
        finished = self.journal.mark_done(rel, seq, deleted=True)
        with self._known_lock:
            self._known.pop(rel, None)
        return finished
