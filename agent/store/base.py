"""The store boundary: the ``ObjectStore`` protocol every backend implements.

Keys given to a store are relative to its configured prefix (see ``agent.stage.keys``);
ETags are plain strings without the quotes S3 puts around them. Backends raise
only ``agent.errors`` classes: ``NotFoundError`` for a missing object,
``PreconditionFailedError`` when ``if_none_match``/``if_match`` did not hold
(404, 409 and 412 on a conditional write all mean that), ``AccessDeniedError``,
``BucketMissingError``, ``TransientStoreError`` (after the backend's own retries),
``PermanentStoreError`` for the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.errors import NotFoundError, ObjectTooLargeError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LOCK_MAX_BYTES",
    "Level",
    "ObjectData",
    "ObjectInfo",
    "ObjectStore",
    "ProgressFn",
    "WriteResult",
    "check_size",
    "get_each",
    "raise_oversized",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""What ``get``/``get_many`` read of one object unless the caller names its kind's limit
(a manifest of about 300,000 files); bucket content is input (issue 19)."""

LOCK_MAX_BYTES = 64 * 1024
"""A lock body: a few hundred bytes; the rest is someone else's doing."""

ProgressFn = Callable[[int], None]
"""Called with byte deltas as a transfer proceeds; negative when a retry rewinds."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or HEAD says of one object."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    """User metadata (``x-amz-meta-*``, lower-case names); filled by ``head`` only."""
    sha256: str | None = None
    """The sha256 of the bytes ``download_file`` wrote, when the store hashed them as it
    wrote them (read back from the file in order); ``None``: the caller hashes the file."""


Level = tuple[list[ObjectInfo], list[str]]
"""``list_level``'s answer: the objects directly under a prefix, and its sub-prefixes."""


@dataclass(frozen=True)
class ObjectData:
    """A small object read whole (lock, manifest), with the store's clock."""

    key: str
    body: bytes
    etag: str
    server_time: datetime


@dataclass(frozen=True)
class WriteResult:
    """What the store confirmed for a write, with the store's clock (HTTP ``Date``)."""

    etag: str
    server_time: datetime


def check_size(key: str, size: int | None, max_bytes: int) -> None:
    """``ObjectTooLargeError`` when a known ``size`` is over ``max_bytes``."""
    if size is not None and size > max_bytes:
        raise ObjectTooLargeError(key, size, max_bytes)


def get_or_none(get: Callable[[str], ObjectData], key: str) -> ObjectData | None:
    """``get(key)``, or ``None`` when the object does not exist."""
    try:
        return get(key)
    except NotFoundError:
        return None


def raise_oversized(
    results: list[ObjectData | None], oversized: dict[str, int | None], max_bytes: int
) -> list[ObjectData | None]:
    """``results``, or ``ObjectTooLargeError`` naming every oversized key and carrying them."""
    if not oversized:
        return results
    first, size = next(iter(oversized.items()))
    raise ObjectTooLargeError(
        first, size, max_bytes, oversized=oversized, results=list[object](results)
    )


def get_each(
    get: Callable[[str], ObjectData], keys: Sequence[str], max_bytes: int
) -> list[ObjectData | None]:
    """``get_many`` by one ``get`` after another (``get`` already bound to ``max_bytes``)."""
    results: list[ObjectData | None] = []
    oversized: dict[str, int | None] = {}
    for key in keys:
        try:
            results.append(get_or_none(get, key))
        except ObjectTooLargeError as exc:
            results.append(None)
            oversized[key] = exc.size
    return raise_oversized(results, oversized, max_bytes)


@runtime_checkable
class ObjectStore(Protocol):
    """An S3-like object store with conditional writes."""

    @property
    def description(self) -> str:
        """A human description (URL, endpoint) without credentials."""
        ...

    def get(self, key: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ObjectData:
        """Read a small object whole. ``NotFoundError`` if absent.

        More than ``max_bytes`` is ``ObjectTooLargeError`` (naming key, size and limit);
        the read stops after ``max_bytes + 1`` bytes, or before any when the store
        states the size.
        """
        ...

    def get_many(
        self, keys: Sequence[str], *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> list[ObjectData | None]:
        """Read many small objects whole, in parallel; ``None`` for each one absent.

        Objects over ``max_bytes`` are not read: after all the others were, one
        ``ObjectTooLargeError`` names them all (``oversized``) and carries the other
        results (``results``, ``None`` in the oversized ones' places).
        """
        ...

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag of an object. ``NotFoundError`` if absent."""
        ...

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> WriteResult:
        """Write a small object in one request (never multipart).

        ``if_none_match=True`` writes only if the key does not exist;
        ``if_match=ETAG`` only if the current ETag is ``ETAG``.
        Otherwise ``PreconditionFailedError``.
        """
        ...

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
        """Upload a local file (multipart above the configured threshold).

        ``metadata`` is stored as user metadata (objects carry their sha256).
        ``if_none_match=True`` writes only if the key does not exist, else
        ``PreconditionFailedError`` (also for our own write whose answer was lost).
        """
        ...

    def etag_part_size(self, size: int) -> int | None:
        """The part size ``upload_file`` would send ``size`` bytes in, ``None`` for one
        part: what the ETag of an object this store wrote is made of (``object_etag``)."""
        ...

    def download_file(
        self, key: str, dest: Path, *, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Write the object's bytes to ``dest`` (the caller passes a temp path and renames).

        Returns size and ETag of what was read (and, where the store hashed the bytes
        as it wrote them, their sha256). ``NotFoundError`` if absent.
        """
        ...

    def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_source_etag: str | None = None,
        size: int | None = None,
    ) -> WriteResult:
        """Server-side copy of ``src_key`` onto ``dst_key`` (user metadata copied too).

        ``if_source_etag`` pins the source (``x-amz-copy-source-if-match``): if the
        source's ETag is another, ``PreconditionFailedError`` and nothing is copied.
        A missing source is ``NotFoundError``. ``size`` (the source's, when the
        caller knows it) lets a backend pick a multipart copy without asking.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete an object; a missing object is not an error."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several objects; missing ones are not an error."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, in key order."""
        ...

    def list_level(self, prefix: str) -> Level:
        """One level of ``prefix`` (``""`` or ending in ``/``): the objects directly in it,
        and its sub-prefixes (each ending in ``/``), both in key order. Complete or an error.
        """
        ...

    def server_time(self) -> datetime:
        """The store's current clock (UTC), for judging lock expiry."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...
