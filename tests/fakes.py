"""Small fakes for unit tests only (integration tests use the real stores).

``MemoryStore`` keeps objects in a dict with S3's conditional-write semantics;
``FaultyStore`` wraps any store and makes chosen calls fail (s3transfer's
``StreamWithError``, syncthing's ``errorfs.go``).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import NotFoundError, PreconditionFailedError
from agent.store.base import (
    DEFAULT_MAX_BYTES,
    Level,
    ObjectData,
    ObjectInfo,
    ObjectStore,
    ProgressFn,
    WriteResult,
    check_size,
    get_each,
)


class MemoryStore:
    """An in-memory ObjectStore with put-if-absent / put-if-match."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """Where it is."""
        return "memory://"

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def get(self, key: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ObjectData:
        """Read an object (``ObjectTooLargeError`` over ``max_bytes``)."""
        self.calls.append(("get", key))
        with self._lock:
            if key not in self.objects:
                raise NotFoundError(key)
            data = self.objects[key]
        check_size(key, len(data), max_bytes)
        return ObjectData(key=key, body=data, etag=self._etag(data), server_time=self._now())

    def get_many(
        self, keys: Sequence[str], *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> list[ObjectData | None]:
        """Read many objects; ``None`` for each one absent."""
        return get_each(functools.partial(self.get, max_bytes=max_bytes), keys, max_bytes)

    def head(self, key: str) -> ObjectInfo:
        """Stat an object."""
        data = self.get(key).body
        return ObjectInfo(
            key=key, size=len(data), etag=self._etag(data), metadata=self.metadata.get(key, {})
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
        """Write, honouring the conditions."""
        self.calls.append(("put", key))
        with self._lock:
            current = self.objects.get(key)
            if if_none_match and current is not None:
                raise PreconditionFailedError(f"{key} exists")
            if if_match is not None and (current is None or self._etag(current) != if_match):
                raise PreconditionFailedError(f"{key} etag differs")
            self.objects[key] = data
            self.metadata.pop(key, None)
        return WriteResult(etag=self._etag(data), server_time=self._now())

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
        """Upload a file."""
        data = path.read_bytes()
        if progress is not None:
            progress(len(data))
        result = self.put_bytes(key, data, if_none_match=if_none_match)
        self.metadata[key] = dict(metadata or {})
        return result

    def etag_part_size(self, size: int) -> int | None:
        """Every object is one part here."""
        del size
        return None

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Download to dest."""
        self.calls.append(("download", key))
        data = self.get(key).body
        dest.write_bytes(data)
        if progress is not None:
            progress(len(data))
        return ObjectInfo(key=key, size=len(data), etag=self._etag(data))

    def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_source_etag: str | None = None,
        size: int | None = None,
    ) -> WriteResult:
        """Copy inside the store (metadata too), the source pinned if asked."""
        source = self.get(src_key)
        if if_source_etag is not None and source.etag != if_source_etag:
            raise PreconditionFailedError(f"{src_key} etag differs")
        result = self.put_bytes(dst_key, source.body)
        self.metadata[dst_key] = dict(self.metadata.get(src_key, {}))
        return result

    def delete(self, key: str) -> None:
        """Delete; missing is fine."""
        with self._lock:
            self.objects.pop(key, None)
            self.metadata.pop(key, None)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several."""
        for key in keys:
            self.delete(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """List by prefix."""
        with self._lock:
            items = sorted((k, v) for k, v in self.objects.items() if k.startswith(prefix))
        for key, data in items:
            yield ObjectInfo(key=key, size=len(data), etag=self._etag(data))

    def list_level(self, prefix: str) -> Level:
        """One level under ``prefix``."""
        objects, subs = [], set()
        for info in self.list(prefix):
            head, slash, _rest = info.key[len(prefix) :].partition("/")
            if slash:
                subs.add(f"{prefix}{head}/")
            else:
                objects.append(info)
        return objects, sorted(subs)

    def server_time(self) -> datetime:
        """Now."""
        return self._now()

    def close(self) -> None:
        """Nothing to release."""


class FaultyStore:
    """Delegates to ``inner`` but lets a test make a method fail (``faults[name] = fn``)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.faults: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        if name in self.faults:
            return self.faults[name]
        return getattr(self.inner, name)
