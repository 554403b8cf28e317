"""The embedded default store: a folder that keeps S3's promises.

Put-if-absent, put-if-match and ETags (md5 of the content, kept in a sidecar so
``head`` and ``list`` never re-hash), atomic writes (temp file, fsync, rename),
safe across threads and processes (a ``filelock`` per key around every
check-and-write). Layout: a key ``a/b/c`` is stored as ``objects/a.d/b.d/c.o``
with ``c.o.etag`` (and ``c.o.meta``, user metadata as JSON) beside it, so the
key ``a/b`` (``a.d/b.o``) and the key ``a/b/c`` can exist at once, as in S3.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from agent.errors import (
    BucketMissingError,
    NotFoundError,
    PermanentStoreError,
    PreconditionFailedError,
)
from agent.store.base import (
    DEFAULT_MAX_BYTES,
    Level,
    ObjectData,
    ObjectInfo,
    ProgressFn,
    WriteResult,
    check_size,
    get_each,
)

__all__ = ["LocalStore"]

_CHUNK = 1024 * 1024
_MOVE_TRIES = 50  # a prune racing one write takes at most one try; many at once, a few
_DIR, _OBJ, _ETAG, _META = ".d", ".o", ".etag", ".meta"


def _encode(key: str) -> Path:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
        raise PermanentStoreError(f"key {key!r} cannot be stored in a folder store")
    return Path(*(p + _DIR for p in parts[:-1]), parts[-1] + _OBJ)


def _decode(rel: Path) -> str:
    parts = rel.parts
    return "/".join([*(p[: -len(_DIR)] for p in parts[:-1]), parts[-1][: -len(_OBJ)]])


class LocalStore:
    """An ``ObjectStore`` in a local (or network-shared) folder."""

    def __init__(
        self,
        root: Path,
        *,
        create: bool = False,
        multipart_threshold: int = 0,
        max_small: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.root = root
        self._max_small = max_small
        if not root.is_dir():
            if not create:
                raise BucketMissingError(
                    f"the store folder {root} does not exist: create it, or point store.url "
                    "at an existing folder"
                )
            root.mkdir(parents=True, exist_ok=True)
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._locks = root / "locks"
        for folder in (self._objects, self._tmp, self._locks):
            folder.mkdir(exist_ok=True)
        del multipart_threshold  # a folder needs no multipart; accepted for a uniform factory

    @property
    def description(self) -> str:
        """``file://`` URL of the folder."""
        return self.root.resolve().as_uri()

    # ----------------------------------------------------------------- helpers

    def _path(self, key: str) -> Path:
        return self._objects / _encode(key)

    def _lock(self, key: str) -> FileLock:
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
        return FileLock(self._locks / f"{digest}.lock", timeout=60)

    def _etag_of(self, path: Path) -> str:
        try:
            return (path.parent / (path.name + _ETAG)).read_text().strip()
        except FileNotFoundError:
            if not path.exists():
                raise
            return _md5_file(path)

    def _metadata_of(self, path: Path) -> dict[str, str]:
        try:
            raw = json.loads((path.parent / (path.name + _META)).read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _write(
        self,
        key: str,
        fill: ProgressFn | None,
        source: Path | bytes,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Write ``source`` to a temp file, fsync, then rename over the key; return the md5."""
        target = self._path(key)
        digest = hashlib.md5(usedforsecurity=False)
        fd_path = self._tmp / f"{os.getpid()}-{os.urandom(6).hex()}.part"
        try:
            with fd_path.open("wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                    digest.update(source)
                    if fill:
                        fill(len(source))
                else:
                    with source.open("rb") as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            if fill:
                                fill(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            etag = digest.hexdigest()
            etag_tmp = fd_path.with_suffix(".etag")
            etag_tmp.write_text(etag)
            meta_tmp = fd_path.with_suffix(".meta")
            meta_tmp.write_text(json.dumps(dict(metadata or {})))
            self._move_in(fd_path, target)
            os.replace(etag_tmp, target.parent / (target.name + _ETAG))
            os.replace(meta_tmp, target.parent / (target.name + _META))
            return etag
        finally:
            for leftover in (fd_path, fd_path.with_suffix(".etag"), fd_path.with_suffix(".meta")):
                leftover.unlink(missing_ok=True)

    def _move_in(self, source: Path, target: Path) -> None:
        """Rename ``source`` onto ``target``, creating its folder.

        A delete of a neighbouring key prunes a folder it emptied; one that does so
        between our ``mkdir`` and our rename makes the rename fail with the folder gone
        (or ``mkdir`` itself fail: it saw the folder, then found it gone). Once the
        rename succeeded the object stands in the folder and no prune can take it:
        make the folder again and retry.
        """
        for attempt in range(1, _MOVE_TRIES + 1):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            except (FileNotFoundError, FileExistsError):
                if attempt == _MOVE_TRIES or not source.exists():
                    raise
            else:
                return

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    # -------------------------------------------------------------- protocol

    def get(self, key: str, *, max_bytes: int | None = None) -> ObjectData:
        """Read an object whole (at most ``max_bytes``, by default the configured
        ``store.max_manifest_bytes``, else ``ObjectTooLargeError``)."""
        if max_bytes is None:
            max_bytes = self._max_small
        path = self._path(key)
        with self._lock(key):
            try:
                with path.open("rb") as fh:
                    check_size(key, os.fstat(fh.fileno()).st_size, max_bytes)
                    body = fh.read(max_bytes + 1)
                check_size(key, len(body), max_bytes)  # grew since the stat
                etag = self._etag_of(path)
            except FileNotFoundError as exc:
                raise NotFoundError(f"no object {key!r} in {self.description}") from exc
        return ObjectData(key=key, body=body, etag=etag, server_time=self._now())

    def get_many(
        self, keys: Sequence[str], *, max_bytes: int | None = None
    ) -> list[ObjectData | None]:
        """Read many objects (one after another: a local disk gains nothing)."""
        limit = self._max_small if max_bytes is None else max_bytes
        return get_each(functools.partial(self.get, max_bytes=limit), keys, limit)

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag."""
        path = self._path(key)
        try:
            st = path.stat()
            etag = self._etag_of(path)
        except FileNotFoundError as exc:
            raise NotFoundError(f"no object {key!r} in {self.description}") from exc
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=etag,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            metadata=self._metadata_of(path),
        )

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> WriteResult:
        """Write a small object, honouring the conditions under the key's file lock."""
        path = self._path(key)
        with self._lock(key):
            if if_none_match and path.exists():
                raise PreconditionFailedError(f"{key!r} already exists")
            if if_match is not None:
                try:
                    current = self._etag_of(path)
                except FileNotFoundError as exc:
                    raise PreconditionFailedError(f"{key!r} does not exist") from exc
                if current != if_match:
                    raise PreconditionFailedError(f"{key!r} has changed (etag {current})")
            etag = self._write(key, None, data)
        return WriteResult(etag=etag, server_time=self._now())

    def upload_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        progress: ProgressFn | None = None,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> WriteResult:
        """Copy a local file in (only if the key is absent, with ``if_none_match``)."""
        with self._lock(key):
            if if_none_match and self._path(key).exists():
                raise PreconditionFailedError(f"{key!r} already exists")
            etag = self._write(key, progress, path, metadata)
        return WriteResult(etag=etag, server_time=self._now())

    def etag_part_size(self, size: int) -> int | None:
        """A folder store's ETag is always the MD5 of the whole object."""
        del size
        return None

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Copy an object out to ``dest``."""
        path = self._path(key)
        with self._lock(key):
            try:
                etag = self._etag_of(path)
                size = 0
                with path.open("rb") as src, dest.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                        if progress:
                            progress(len(chunk))
            except FileNotFoundError as exc:
                if not path.exists():
                    raise NotFoundError(f"no object {key!r} in {self.description}") from exc
                raise
        return ObjectInfo(key=key, size=size, etag=etag)

    def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_source_etag: str | None = None,
        size: int | None = None,
    ) -> WriteResult:
        """Copy one object (and its metadata) onto another key, the source pinned if asked."""
        del size  # a folder copies any size in one go
        src = self._path(src_key)
        with contextlib.ExitStack() as held:
            for key in sorted({src_key, dst_key}):  # one order: no deadlock between copies
                held.enter_context(self._lock(key))
            try:
                current = self._etag_of(src)
            except FileNotFoundError as exc:
                raise NotFoundError(f"no object {src_key!r} in {self.description}") from exc
            if if_source_etag is not None and current != if_source_etag:
                raise PreconditionFailedError(
                    f"{src_key!r} has changed (etag {current}, expected {if_source_etag})"
                )
            etag = self._write(dst_key, None, src, self._metadata_of(src))
        return WriteResult(etag=etag, server_time=self._now())

    def delete(self, key: str) -> None:
        """Delete; a missing object is fine."""
        path = self._path(key)
        with self._lock(key):
            path.unlink(missing_ok=True)
            (path.parent / (path.name + _ETAG)).unlink(missing_ok=True)
            (path.parent / (path.name + _META)).unlink(missing_ok=True)
        self._prune_dirs(path.parent)

    def _prune_dirs(self, folder: Path) -> None:
        while folder != self._objects and folder.is_relative_to(self._objects):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several objects."""
        for key in keys:
            self.delete(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order."""
        found: list[ObjectInfo] = []
        folders = [seg + _DIR for seg in prefix.split("/")[:-1]]
        start = self._objects.joinpath(*folders)
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if not name.endswith(_OBJ):
                    continue
                full = Path(dirpath) / name
                key = _decode(full.relative_to(self._objects))
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                    etag = self._etag_of(full)
                except FileNotFoundError:
                    continue  # deleted while listing
                modified = datetime.fromtimestamp(st.st_mtime, UTC)
                found.append(
                    ObjectInfo(key=key, size=st.st_size, etag=etag, last_modified=modified)
                )
        found.sort(key=lambda o: o.key)
        yield from found

    def list_level(self, prefix: str) -> Level:
        """The objects directly under ``prefix`` and its sub-prefixes (see the protocol)."""
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a level is '' or ends in '/': {prefix!r}")
        folder = self._objects.joinpath(*(seg + _DIR for seg in prefix.split("/")[:-1]))
        objects: list[ObjectInfo] = []
        subs: list[str] = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            return [], []
        for entry in entries:
            if entry.name.endswith(_DIR) and entry.is_dir(follow_symlinks=False):
                subs.append(f"{prefix}{entry.name[: -len(_DIR)]}/")
            elif entry.name.endswith(_OBJ):
                full = Path(entry.path)
                try:
                    st = full.stat()
                    etag = self._etag_of(full)
                except FileNotFoundError:
                    continue  # deleted while listing
                objects.append(
                    ObjectInfo(
                        key=f"{prefix}{entry.name[: -len(_OBJ)]}",
                        size=st.st_size,
                        etag=etag,
                        last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
                    )
                )
        return objects, subs

    def server_time(self) -> datetime:
        """The local clock (the folder has no other)."""
        return self._now()

    def close(self) -> None:
        """Nothing to release."""


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
