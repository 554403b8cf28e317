"""Parallel downloads and uploads over an ``ObjectStore``, with progress.

Downloads go to a recognisable temp name beside the target and are renamed only
when complete and verified (size, and sha256 where the manifest knows it), so a
working copy never holds a partial file. Uploads hash the file, send it, and
redo the upload if the file changed while it was read. Retries of transient
errors happen inside the store; here a failure cancels what has not started,
waits for what is running, and raises the first error.
"""

from __future__ import annotations

import errno
import functools
import mimetypes
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from agent.errors import (
    ContentMismatchError,
    LocalFileError,
    NotFoundError,
    PreconditionFailedError,
    TransferError,
    TransientStoreError,
)
from agent.folder.entries import LocalEntry, fd_sha256, file_sha256, object_etag
from agent.folder.ignore import temp_name_for
from agent.folder.snapshot import FileStat
from agent.folder.workfolder import HAS_DIR_FD, WorkFolder, fd_path
from agent.log import get_logger
from agent.store.base import ObjectInfo, ObjectStore, WriteResult
from agent.store.parallel import Parallel, Progress

__all__ = [
    "Download",
    "FileKeptChangingError",
    "Progress",
    "Transfers",
    "Upload",
    "Uploaded",
    "content_type_for",
    "local_file_error",
    "same_stat",
]

log = get_logger(__name__)


_MAX_UPLOAD_REDOS = 5
_NO_TIME = datetime.min.replace(tzinfo=UTC)  # a write result that made no request
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_EXTRA_TYPES = {
    ".dwg": "image/vnd.dwg",
    ".dxf": "image/vnd.dxf",
    ".step": "model/step",
    ".stp": "model/step",
    ".ifc": "application/x-step",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".json": "application/json",
    ".sqlite": "application/vnd.sqlite3",
}


def content_type_for(path: str) -> str:
    """The Content-Type to store a file under (octet-stream when unknown)."""
    # What mimetypes looks at: the last suffix, and the one before an encoding's (.tar.gz).
    return _type_of_suffixes("".join(PurePosixPath(path).suffixes[-2:]))


@functools.lru_cache(maxsize=1024)
def _type_of_suffixes(suffixes: str) -> str:
    last = suffixes[suffixes.rfind(".") :].lower()
    if last in _EXTRA_TYPES:
        return _EXTRA_TYPES[last]
    guessed, _ = mimetypes.guess_type(f"x{suffixes}", strict=False)
    return guessed or "application/octet-stream"


def local_file_error(exc: OSError, path: Path, action: str) -> LocalFileError:
    """Translate an OS error on a local file into a message that says what to do."""
    hint = {
        errno.ENOSPC: "the disk is full: free some space and try again",
        errno.EACCES: "permission denied: check the folder's permissions",
        errno.EPERM: "permission denied: check the folder's permissions",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return LocalFileError(f"cannot {action} {path}: {hint}")


class FileKeptChangingError(TransferError):
    """The file changed while it was read, at every try: a program is still writing it."""


@dataclass(frozen=True)
class Download:
    """One object to bring down to ``dest``."""

    key: str
    dest: Path
    size: int | None = None
    sha256: str | None = None
    fallback: str | None = None
    """Where the same content is too (``.objects/{sha256}``): read when ``key`` is missing
    or holds other bytes (a plain tree damaged by a late write or a plain tool)."""


@dataclass(frozen=True)
class Upload:
    """One local file to send to ``key``."""

    rel: str
    key: str
    src: Path


@dataclass(frozen=True)
class Uploaded:
    """What the store confirmed for an upload."""

    rel: str
    key: str
    etag: str
    size: int
    sha256: str
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0
    mode: int = 0
    sent: bool = True
    """False when the content was already in the store (checked): no body was sent."""

    def entry(self) -> LocalEntry:
        """What the store now holds for this file, as change detection's entry."""
        return LocalEntry.from_stat(
            FileStat(self.size, self.mtime_ns, self.ctime_ns, self.inode, self.mode), self.sha256
        )


class Transfers(Parallel):
    """A pool of ``workers`` threads moving files between a folder and a store."""

    def __init__(self, store: ObjectStore, workers: int, folder: WorkFolder | None = None) -> None:
        super().__init__(workers)
        self.store = store
        # With a folder, downloads below its root and every upload go through its
        # descriptors: no link on the way is followed (issue 8).
        self.folder = folder
        self.damaged: list[str] = []
        """Keys found missing or with other bytes and read from their fallback instead."""

    def download(self, items: Sequence[Download], progress: Progress | None = None) -> list[str]:
        """Download every item (temp + verify + rename); return the sha256 of each, in order."""
        return self.map(items, lambda item: self._download_one(item, progress), progress)

    def upload(self, items: Sequence[Upload], progress: Progress | None = None) -> list[Uploaded]:
        """Upload every item; return what the store confirmed, in order."""
        return self.map(items, lambda item: self.upload_one(item, progress), progress)

    def _download_one(self, item: Download, progress: Progress | None) -> str:
        try:
            return self._download_from(item, progress)
        except (NotFoundError, ContentMismatchError) as exc:
            if item.fallback is None:
                raise
            log.warning("plain_object_damaged", key=item.key, reading=item.fallback, error=str(exc))
            self.damaged.append(item.key)
        try:
            return self._download_from(replace(item, key=item.fallback, fallback=None), progress)
        except (NotFoundError, ContentMismatchError) as exc:
            raise ContentMismatchError(
                f"the content of {item.key} is gone from the store: the plain object is "
                f"missing or holds other bytes, and {item.fallback} is missing or holds other "
                "bytes too. Nothing was overwritten; restore the file from the version "
                "history (`agent history`) or ask an operator"
            ) from exc

    def _download_from(self, item: Download, progress: Progress | None) -> str:
        if progress is not None:
            progress.check()
        sent = 0

        def on_bytes(delta: int) -> None:
            nonlocal sent
            sent += delta
            if progress is not None:
                progress.add(delta)
            # The object is bucket input: stop at the manifest's size instead of
            # reading whatever size someone put there (issue 9).
            if delta > 0 and item.size is not None and sent > item.size:
                raise ContentMismatchError(
                    f"{item.key} is larger than the manifest says ({item.size} bytes): the "
                    "download was stopped. The object was changed outside the agent; nothing "
                    "was overwritten, ask an operator"
                )

        try:
            try:
                rel = self._rel_in_folder(item.dest)
                if rel is not None and HAS_DIR_FD:
                    return self._download_by_fd(item, rel, on_bytes)
                if rel is not None and self.folder is not None:
                    self.folder.path(rel)  # no descriptors (Windows): lstat the way now
                return self._download_by_path(item, on_bytes)
            except OSError as exc:
                raise local_file_error(exc, item.dest, "write") from exc
        except BaseException:
            if progress is not None and sent:
                progress.add(-sent)
            raise

    def _rel_in_folder(self, dest: Path) -> str | None:
        if self.folder is None:
            return None
        try:
            return dest.relative_to(self.folder.root).as_posix()
        except ValueError:
            return None

    def _download_by_fd(self, item: Download, rel: str, on_bytes: Callable[[int], None]) -> str:
        """Into the folder's descriptors: folders made inside it, the temp renamed by fd."""
        assert self.folder is not None
        head, _, name = rel.rpartition("/")
        with self.folder.open_dir(head, create=True) as dfd:
            tmp_name = temp_name_for(Path(name)).name
            via = fd_path(dfd)
            tmp = via / tmp_name if via is not None else item.dest.with_name(tmp_name)
            try:
                info: ObjectInfo = self.store.download_file(item.key, tmp, progress=on_bytes)
                if info.sha256 is not None:  # hashed as the store wrote it: no second read
                    digest = self._verify(item, info, _file_size(tmp_name, dfd), info.sha256)
                else:
                    fd = os.open(tmp_name, os.O_RDONLY | _O_NOFOLLOW, dir_fd=dfd)
                    try:
                        digest = self._verify(item, info, os.fstat(fd).st_size, fd_sha256(fd))
                    finally:
                        os.close(fd)
                os.replace(tmp_name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp_name, dir_fd=dfd)
                raise
        return digest

    def _download_by_path(self, item: Download, on_bytes: Callable[[int], None]) -> str:
        tmp = temp_name_for(item.dest)
        try:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            info: ObjectInfo = self.store.download_file(item.key, tmp, progress=on_bytes)
            digest = self._verify(item, info, tmp.stat().st_size, info.sha256 or file_sha256(tmp))
            os.replace(tmp, item.dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    @staticmethod
    def _verify(item: Download, info: ObjectInfo, actual: int, digest: str) -> str:
        if actual != info.size:
            # Fewer (or more) bytes on disk than the store's answer carried: the
            # transfer was cut, which a later try can mend (issue 19).
            raise TransientStoreError(
                f"downloaded {item.key} has {actual} bytes of the {info.size} the store sent; "
                "the transfer was cut: try again"
            )
        if item.size is not None and actual != item.size:
            raise ContentMismatchError(
                f"downloaded {item.key} has {actual} bytes, expected "
                f"{item.size if item.size is not None else info.size}; the object changed "
                "during the download or the transfer was cut: try again"
            )
        if item.sha256 is not None and digest != item.sha256:
            raise ContentMismatchError(
                f"downloaded {item.key} does not match the manifest's sha256; the object "
                "was changed outside the agent. Nothing was overwritten; ask an operator."
            )
        return digest

    def upload_one(
        self,
        item: Upload,
        progress: Progress | None,
        *,
        known: tuple[os.stat_result, str] | None = None,
        fd: int | None = None,
        objects: Callable[[str], str] | None = None,
        stored: Callable[[str], str | None] | None = None,
        tries: int = _MAX_UPLOAD_REDOS,
    ) -> Uploaded:
        """Upload one file on the calling thread (redone if it changes while read).

        ``FileKeptChangingError`` if it changed during each of ``tries`` tries.

        ``known`` is a ``(stat, sha256)`` the caller already computed, so a large file
        is not hashed twice; it is trusted only while the file's stat still matches.
        With a ``folder`` the file is opened once without following links and the
        store reads that very file (through /proc/self/fd where there is one). ``fd``
        is such a descriptor the caller opened already (and closes itself).

        ``objects`` makes the upload content-addressed: the key is ``objects(sha256)``
        (``item.key`` is ignored) and the content is sent only if it is not there
        already (``send_object``). ``stored(sha256)`` is the ETag the caller believes
        that object has (from a manifest or the journal), or ``None``.
        """
        for _attempt in range(tries):
            sent = 0

            def on_bytes(delta: int) -> None:
                nonlocal sent
                sent += delta
                if progress is not None:
                    progress.add(delta)

            try:
                with self._opened(item, fd) as (fd_, before):
                    if known is not None and same_stat(known[0], before):
                        digest = known[1]
                    else:
                        digest = fd_sha256(fd_) if fd_ >= 0 else file_sha256(item.src)
                    known = None
                    via = fd_path(fd_) if fd_ >= 0 else None
                    source = via if via is not None else item.src
                    key, sent = item.key, True
                    if objects is None:
                        result = self.store.upload_file(
                            key,
                            source,
                            content_type=content_type_for(item.rel),
                            progress=on_bytes,
                            metadata={"sha256": digest},
                        )
                    else:
                        key = objects(digest)
                        result, sent = self._send_object(
                            item.rel,
                            key,
                            source,
                            fd=fd_,
                            size=before.st_size,
                            digest=digest,
                            expected=stored(digest) if stored is not None else None,
                            on_bytes=on_bytes,
                        )
                    after = os.fstat(fd_) if fd_ >= 0 else item.src.stat()
            except OSError as exc:
                if progress is not None:
                    progress.add(-sent)
                raise local_file_error(exc, item.src, "read") from exc
            if same_stat(before, after):
                return Uploaded(
                    rel=item.rel,
                    key=key,
                    etag=result.etag,
                    sent=sent,
                    size=after.st_size,
                    sha256=digest,
                    mtime_ns=after.st_mtime_ns,
                    ctime_ns=after.st_ctime_ns,
                    inode=after.st_ino,
                    mode=after.st_mode,
                )
            log.info("upload_redo_file_changed", path=item.rel, key=item.key)
            if progress is not None:
                progress.add(-sent)
        raise FileKeptChangingError(
            f"{item.src} kept changing while it was uploaded ({tries} tries); "
            "close the program writing it and try again",
            failed=1,
        )

    def _send_object(
        self,
        rel: str,
        key: str,
        source: Path,
        *,
        fd: int,
        size: int,
        digest: str,
        expected: str | None,
        on_bytes: Callable[[int], None],
    ) -> tuple[WriteResult, bool]:
        """Make ``key`` (``.objects/{sha256}``) hold these bytes; ``(result, sent)``.

        An object the caller believes stored is looked at (HEAD): the same size and the
        ETag it expects, and nothing is sent. Otherwise the content is sent with
        ``If-None-Match: *``; a 412 (someone, or our own lost-answer retry, wrote it)
        is trusted only if the object's size and ETag are those of the local bytes
        (MD5, or the multipart ETag at the store's part size). An object under that
        name with other bytes (planted, or cut) is replaced by the local bytes and
        reported: nothing is trusted by its name alone.
        """
        if expected:
            info = self._head_or_none(key)
            if info is not None and info.size == size and info.etag == expected:
                return WriteResult(etag=info.etag, server_time=_NO_TIME), False
        metadata = {"sha256": digest}
        ctype = content_type_for(rel)
        try:
            result = self.store.upload_file(
                key,
                source,
                content_type=ctype,
                progress=on_bytes,
                metadata=metadata,
                if_none_match=True,
            )
            return result, True
        except PreconditionFailedError:
            pass
        info = self._head_or_none(key)
        if info is not None and info.size == size:
            ours = object_etag(fd, size, self.store.etag_part_size(size)) if fd >= 0 else None
            if ours is None:
                with source.open("rb") as fh:
                    ours = object_etag(fh.fileno(), size, self.store.etag_part_size(size))
            if info.etag == ours:
                return WriteResult(etag=info.etag, server_time=_NO_TIME), False
        log.warning(
            "object_replaced",
            key=key,
            path=rel,
            reason="the object under this content's name holds other bytes",
            found_size=info.size if info is not None else None,
        )
        result = self.store.upload_file(
            key, source, content_type=ctype, progress=on_bytes, metadata=metadata
        )
        return result, True

    def _head_or_none(self, key: str) -> ObjectInfo | None:
        try:
            return self.store.head(key)
        except NotFoundError:
            return None

    @contextmanager
    def _opened(self, item: Upload, fd: int | None) -> Iterator[tuple[int, os.stat_result]]:
        """``(fd, fstat)`` of the file through the folder, or ``(-1, stat)`` without one.

        A descriptor the caller gives is used as it is (and left open).
        """
        if fd is not None:
            yield fd, os.fstat(fd)
            return
        if self.folder is None:
            yield -1, item.src.stat()
            return
        with self.folder.open_file(item.rel) as opened:
            yield opened


def _file_size(name: str, dfd: int) -> int:
    """The size of the plain file ``name`` in the folder ``dfd`` (a link is refused)."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.ELOOP, "not a plain file (replaced while it was written?)", name)
    return st.st_size


def same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    """The same file, unchanged: size, mtime, ctime and inode all equal (issue 8)."""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )
