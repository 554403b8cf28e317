"""Lock tools outside one session's keeper: the store probe and the operator's break.

``ensure_store_is_safe`` refuses (once per process and store) a store that does not
honour ``If-None-Match``/``If-Match``; ``force_unlock`` releases a lock by CAS and
records who broke it and why.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from agent.config import LockConfig
from agent.errors import (
    LockError,
    NotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StoreError,
    UnsafeStoreError,
)
from agent.log import get_logger
from agent.stage.cas import new_write_id, put_fenced, read_back, write_id_of
from agent.stage.lockbody import LockBody, LockStatus
from agent.store.base import LOCK_MAX_BYTES, ObjectData, ObjectStore, WriteResult

__all__ = ["ensure_store_is_safe", "force_unlock", "probe_conditional_writes"]

log = get_logger(__name__)

_SAFE: set[str] = set()
_SAFE_LOCK = threading.Lock()


def probe_conditional_writes(store: ObjectStore, key_prefix: str = ".pdagent-probe") -> None:
    """Refuse a store that does not honour ``If-None-Match`` and ``If-Match``.

    Writes a probe object (with a write id, so a lost answer is resolved by reading
    it back), then tries a second put-if-absent and a put with a wrong ETag on it;
    both must be refused, which the read-back proves: the object must still hold the
    first write. The probe object is deleted afterwards, whatever happened.
    """
    # One key per step (R2 takes about one write a second to one key): each key is
    # written once, then refused once. The two keys' steps run at once: four round
    # trips, not eight (0.3-0.6 s per CLI process on an office link, 30 ms each).
    steps: list[tuple[str, Callable[[WriteResult], dict[str, Any]]]] = [
        ("a second If-None-Match put on the same key", lambda _first: {"if_none_match": True}),
        ("a put with a wrong If-Match ETag", lambda first: {"if_match": first.etag + "0"}),
    ]

    def check(key: str, what: str, kwargs_for: Callable[[WriteResult], dict[str, Any]]) -> str:
        try:
            first_id = new_write_id()
            first = put_fenced(store, key, _probe_body(first_id), first_id, if_none_match=True)
            with contextlib.suppress(PreconditionFailedError):
                store.put_bytes(
                    key,
                    _probe_body(new_write_id()),
                    content_type="application/json",
                    **kwargs_for(first),
                )
            current = read_back(store, key)
            return "" if current is not None and write_id_of(current.body) == first_id else what
        finally:
            with contextlib.suppress(StoreError):
                store.delete(key)

    with ThreadPoolExecutor(len(steps), thread_name_prefix="pdagent-probe") as pool:
        checks = [
            pool.submit(check, f"{key_prefix}/{new_write_id()}.json", what, kwargs_for)
            for what, kwargs_for in steps
        ]
        problems = [problem for c in checks if (problem := c.result())]
    if problems:
        raise UnsafeStoreError(
            f"the store {store.description} does not honour conditional writes ("
            + "; ".join(problems)
            + "), so a lock there gives no mutual exclusion: locking is refused. Use a store "
            "with conditional writes (R2, S3, MinIO, SeaweedFS)"
        )


def _probe_body(write_id: str) -> bytes:
    return json.dumps({"probe": True, "write_id": write_id}).encode()


def ensure_store_is_safe(store: ObjectStore) -> None:
    """Run the capability probe once per process and store."""
    with _SAFE_LOCK:
        if store.description in _SAFE:
            return
    probe_conditional_writes(store)
    with _SAFE_LOCK:
        _SAFE.add(store.description)


_FORCE_TRIES = 5


def force_unlock(
    store: ObjectStore,
    key: str,
    *,
    operator: str,
    machine: str,
    reason: str,
    config: LockConfig | None = None,
) -> LockStatus:
    """An operator's explicit break: ``released`` by CAS, recording who and why.

    A live holder's heartbeat may renew between our read and our write: read again
    and retry (a few times) instead of failing on the first 412.
    """
    for attempt in range(1, _FORCE_TRIES + 1):
        try:
            return _force_unlock_once(
                store, key, operator=operator, machine=machine, reason=reason, config=config
            )
        except PreconditionFailedError as exc:
            if attempt == _FORCE_TRIES:
                raise LockError(
                    f"the lock {key} changed {_FORCE_TRIES} times while it was being broken "
                    "(its holder is renewing it right now); try again, or ask its holder to close"
                ) from exc
            log.info("lock_forced_unlock_retry", key=key, attempt=attempt)
    raise AssertionError("unreachable")


def _force_unlock_once(
    store: ObjectStore,
    key: str,
    *,
    operator: str,
    machine: str,
    reason: str,
    config: LockConfig | None = None,
) -> LockStatus:
    config = config or LockConfig()
    try:
        data = store.get(key, max_bytes=LOCK_MAX_BYTES)
    except NotFoundError as exc:
        raise NotFoundError(f"there is no lock {key} to unlock") from exc
    except ObjectTooLargeError:
        # Overwritten unread, by compare-and-swap on the ETag its HEAD states.
        data = ObjectData(key, b"", store.head(key).etag, store.server_time())
    now = data.server_time
    try:
        old = LockBody.model_validate_json(data.body)
        previous = f"{old.user}@{old.machine} (session {old.session_id})"
        body = old.model_copy(
            update={
                "state": "released",
                "broken_by": f"{operator}@{machine}",
                "broken_at": now,
                "broken_reason": reason,
                "previous_holder": previous,
                "write_id": new_write_id(),
            }
        )
    except (ValidationError, ValueError):
        previous = "unreadable lock body"
        body = LockBody(
            state="released",
            user=operator,
            machine=machine,
            since=now,
            expires=now,
            heartbeat_at=now,
            broken_by=f"{operator}@{machine}",
            broken_at=now,
            broken_reason=reason,
            previous_holder=previous,
            write_id=new_write_id(),
        )
    assert body.write_id is not None
    result = put_fenced(store, key, body.to_bytes(), body.write_id, if_match=data.etag)
    log.warning(
        "lock_forced_unlock", key=key, operator=operator, previous_holder=previous, reason=reason
    )
    return LockStatus(
        key=key,
        body=body,
        etag=result.etag,
        server_time=result.server_time,
        stale_after=config.stale_after,
    )
