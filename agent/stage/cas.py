"""Conditional writes whose answer may be lost (DESIGN.md "Writes whose answer is lost").

Every conditional write of a small JSON register (lock, manifest, commit intent,
capability probe) carries a fresh ``write_id`` in its body. When the answer is
lost (timeout, reset, 5xx after the store applied it) the retry, or the next
write, gets 412 although the first one landed. ``put_fenced`` resolves every
such outcome the same way: read the object back; our ``write_id`` there means
the write succeeded, with the ETag read. Nothing else is ever inferred from a
412, so a late or repeated request can never be taken for someone else's.
"""

from __future__ import annotations

import json
import uuid

from agent.errors import (
    NotFoundError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
)
from agent.log import get_logger
from agent.store.base import ObjectData, ObjectStore, WriteResult

__all__ = ["new_write_id", "put_fenced", "write_id_of"]

log = get_logger(__name__)


def new_write_id() -> str:
    """A unique id for one write (random, 128 bits)."""
    return uuid.uuid4().hex


def write_id_of(body: bytes) -> str | None:
    """The ``write_id`` a stored JSON body carries, or ``None`` (not JSON, no id)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    value = parsed.get("write_id") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else None


def read_back(store: ObjectStore, key: str) -> ObjectData | None:
    """The object as it is now, ``None`` when absent."""
    try:
        return store.get(key)
    except NotFoundError:
        return None


def put_fenced(
    store: ObjectStore,
    key: str,
    body: bytes,
    write_id: str,
    *,
    if_match: str | None = None,
    if_none_match: bool = False,
) -> WriteResult:
    """Write ``body`` (which carries ``write_id``) under a condition, surviving a lost answer.

    Raises ``PreconditionFailedError`` only when the object holds someone else's
    write, and ``TransientStoreError`` when the outcome cannot be known (the store
    stays unreachable for the read-back too): the caller must then treat the write
    as possibly applied.
    """
    # Our own serialized JSON: a bytes search, not a parse of a 16 MB manifest.
    if b'"write_id"' not in body or f'"{write_id}"'.encode() not in body:
        raise ValueError("the body must carry the write_id it is written with")
    try:
        return store.put_bytes(
            key,
            body,
            if_match=if_match,
            if_none_match=if_none_match,
            content_type="application/json",
        )
    except (PreconditionFailedError, TransientStoreError) as exc:
        try:
            current = read_back(store, key)
        except StoreError as read_exc:
            raise TransientStoreError(
                f"the write of {key} may or may not have landed (its answer was lost and the "
                f"read-back failed: {read_exc}); it is resolved at the next write"
            ) from exc
        if current is not None and write_id_of(current.body) == write_id:
            log.info("write_confirmed_by_read_back", key=key, write_id=write_id, error=str(exc))
            return WriteResult(etag=current.etag, server_time=current.server_time)
        raise
