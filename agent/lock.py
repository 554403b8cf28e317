"""The stage lock: a small register in the bucket changed only by compare-and-swap.

``{projekt_id}/{stage}.lock.json`` is created with ``If-None-Match: *`` and from
then on only rewritten with ``If-Match: <etag>``; it is never deleted (R2 has no
conditional delete, and a read-then-delete can remove someone else's new lock).
Expiry is judged by the store's clock. Of two racers for a free lock exactly
one CAS wins; the other re-reads and sees the winner.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.config import LockConfig
from agent.errors import (
    AgentError,
    LockCorruptError,
    LockHeldError,
    LockLostError,
    NotFoundError,
    PreconditionFailedError,
    UnsafeStoreError,
)
from agent.store.base import ObjectStore

__all__ = [
    "Heartbeat",
    "Holder",
    "LockBody",
    "LockStatus",
    "RemoteLock",
    "ensure_store_is_safe",
    "force_unlock",
    "probe_conditional_writes",
    "read_lock",
]

log = structlog.get_logger(__name__)

_CAS_ROUNDS = 8


class LockBody(BaseModel):
    """What the lock object says."""

    model_config = ConfigDict(frozen=True)

    state: Literal["held", "released"]
    user: str
    machine: str
    since: datetime
    expires: datetime
    heartbeat_at: datetime
    session_id: str | None = None
    pid: int | None = None
    agent_version: str | None = None
    broken_by: str | None = None
    broken_at: datetime | None = None
    broken_reason: str | None = None
    previous_holder: str | None = None

    def to_bytes(self) -> bytes:
        """JSON as stored."""
        return self.model_dump_json(indent=1).encode()


@dataclass(frozen=True)
class Holder:
    """Who asks for the lock."""

    user: str
    machine: str
    pid: int
    session_id: str
    agent_version: str


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}min"
    return f"{seconds / 3600:.1f}h"


@dataclass(frozen=True)
class LockStatus:
    """A lock as read, judged by the store's clock at the time of the read."""

    key: str
    body: LockBody
    etag: str
    server_time: datetime
    stale_after: float

    @property
    def is_expired(self) -> bool:
        """The lock's ``expires`` has passed on the store's clock."""
        return self.server_time >= self.body.expires

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the holder last renewed (store clock)."""
        return (self.server_time - self.body.heartbeat_at).total_seconds()

    @property
    def is_stale(self) -> bool:
        """The holder's heartbeat is older than ``stale_after``: it appears gone."""
        return self.heartbeat_age > self.stale_after

    @property
    def is_free(self) -> bool:
        """Released or expired: anyone may take it by CAS."""
        return self.body.state == "released" or self.is_expired

    def describe(self) -> list[str]:
        """Readable lines for ``agent lock show`` and error messages."""
        b = self.body
        if b.state == "released":
            lines = [f"{self.key}: free (released; last holder {b.user} on {b.machine})"]
            if b.broken_by:
                lines.append(
                    f"  broken by {b.broken_by} at {b.broken_at:%Y-%m-%d %H:%M:%S} UTC: "
                    f"{b.broken_reason} (holder was {b.previous_holder})"
                )
            return lines
        gone = " - holder appears gone" if self.is_stale else ""
        expired = " (EXPIRED: free to take)" if self.is_expired else ""
        return [
            f"{self.key}: held by {b.user} on {b.machine}{expired}",
            f"  since {b.since:%Y-%m-%d %H:%M:%S} UTC, expires {b.expires:%Y-%m-%d %H:%M:%S} UTC",
            f"  last heartbeat {_age(self.heartbeat_age)} ago{gone}",
            f"  session {b.session_id}, pid {b.pid}, agent {b.agent_version}",
        ]

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "body": json.loads(self.body.model_dump_json()),
            "etag": self.etag,
            "server_time": self.server_time.isoformat(),
            "expired": self.is_expired,
            "stale": self.is_stale,
            "heartbeat_age_seconds": round(self.heartbeat_age, 1),
        }


def _parse(key: str, data: bytes) -> LockBody:
    try:
        return LockBody.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        projekt, _, rest = key.partition("/")
        stage = rest.removesuffix(".lock.json")
        raise LockCorruptError(
            f"the lock {key} does not parse as a lock ({type(exc).__name__}); nobody can take it "
            f"until an operator runs `agent lock unlock {projekt} --stage {stage} --force`, "
            "which overwrites it by compare-and-swap"
        ) from exc


def read_lock(store: ObjectStore, key: str, config: LockConfig) -> LockStatus | None:
    """Read and judge a lock; ``None`` when no lock object exists."""
    try:
        data = store.get(key)
    except NotFoundError:
        return None
    return LockStatus(
        key=key,
        body=_parse(key, data.body),
        etag=data.etag,
        server_time=data.server_time,
        stale_after=config.stale_after,
    )


_SAFE: set[str] = set()
_SAFE_LOCK = threading.Lock()


def probe_conditional_writes(store: ObjectStore, key_prefix: str = ".pdagent-probe") -> None:
    """Refuse a store that does not honour ``If-None-Match`` and ``If-Match``.

    Writes a probe object, then tries a second put-if-absent and a put with a wrong
    ETag on it; both must be refused. The probe object is deleted afterwards.
    """
    import os

    key = f"{key_prefix}/{os.urandom(8).hex()}.json"
    first = store.put_bytes(key, b'{"probe": 1}', if_none_match=True)
    problems = []
    try:
        try:
            store.put_bytes(key, b'{"probe": 2}', if_none_match=True)
            problems.append("a second If-None-Match put on the same key was accepted")
        except PreconditionFailedError:
            pass
        try:
            store.put_bytes(key, b'{"probe": 3}', if_match=first.etag + "0")
            problems.append("a put with a wrong If-Match ETag was accepted")
        except PreconditionFailedError:
            pass
    finally:
        store.delete(key)
    if problems:
        raise UnsafeStoreError(
            f"the store {store.description} does not honour conditional writes ("
            + "; ".join(problems)
            + "), so a lock there gives no mutual exclusion: locking is refused. Use a store "
            "with conditional writes (R2, S3, MinIO, SeaweedFS)"
        )


def ensure_store_is_safe(store: ObjectStore) -> None:
    """Run the capability probe once per process and store."""
    with _SAFE_LOCK:
        if store.description in _SAFE:
            return
    probe_conditional_writes(store)
    with _SAFE_LOCK:
        _SAFE.add(store.description)


class RemoteLock:
    """One holder's handle on one stage lock."""

    def __init__(self, store: ObjectStore, key: str, holder: Holder, config: LockConfig) -> None:
        self.store = store
        self.key = key
        self.holder = holder
        self.config = config
        self._etag: str | None = None

    @property
    def etag(self) -> str | None:
        """The ETag of our last write (None until acquired)."""
        return self._etag

    def adopt(self, etag: str) -> None:
        """Continue with a lock another process of this session acquired."""
        self._etag = etag

    def read(self) -> LockStatus | None:
        """The lock as it is now."""
        return read_lock(self.store, self.key, self.config)

    def _body(self, now: datetime, since: datetime | None = None) -> LockBody:
        return LockBody(
            state="held",
            user=self.holder.user,
            machine=self.holder.machine,
            since=since or now,
            expires=now + timedelta(seconds=self.config.ttl),
            heartbeat_at=now,
            session_id=self.holder.session_id,
            pid=self.holder.pid,
            agent_version=self.holder.agent_version,
        )

    def acquire(self, *, take_over: bool = False) -> LockStatus:
        """Take the lock, re-enter it, or raise ``LockHeldError`` naming the holder."""
        ensure_store_is_safe(self.store)
        for _ in range(_CAS_ROUNDS):
            status = self.read()
            try:
                if status is None:
                    now = self.store.server_time()
                    body = self._body(now)
                    result = self.store.put_bytes(
                        self.key,
                        body.to_bytes(),
                        if_none_match=True,
                        content_type="application/json",
                    )
                else:
                    self._check_may_take(status, take_over)
                    same = status.body.state == "held" and self._is_mine(status.body)
                    now = status.server_time
                    body = self._body(now, since=status.body.since if same else None)
                    result = self.store.put_bytes(
                        self.key,
                        body.to_bytes(),
                        if_match=status.etag,
                        content_type="application/json",
                    )
            except PreconditionFailedError:
                log.info("lock_race_lost_rereading", key=self.key)
                continue
            self._etag = result.etag
            log.info(
                "lock_acquired",
                key=self.key,
                user=self.holder.user,
                session_id=self.holder.session_id,
            )
            return LockStatus(
                key=self.key,
                body=body,
                etag=result.etag,
                server_time=result.server_time,
                stale_after=self.config.stale_after,
            )
        raise LockHeldError(
            f"the lock {self.key} kept changing while we tried to take it; try again"
        )

    def _is_mine(self, body: LockBody) -> bool:
        return body.user == self.holder.user and body.machine == self.holder.machine

    def _check_may_take(self, status: LockStatus, take_over: bool) -> None:
        body = status.body
        if status.is_free or self._is_mine(body):
            return
        if take_over and status.is_stale:
            log.warning("lock_taken_over", key=self.key, previous=f"{body.user}@{body.machine}")
            return
        if take_over:
            hint = (
                "its holder's heartbeat is fresh, so --take-over is refused; an operator can "
                "break it with `agent lock unlock ... --force`"
            )
        elif body.user == self.holder.user:
            hint = (
                f"you hold it on another machine ({body.machine}); close the session there, or "
                "use --take-over if that machine is gone"
            )
        elif status.is_stale:
            hint = "the holder appears gone (stale heartbeat): --take-over takes it"
        else:
            hint = "ask them to close, see `agent lock show`, or wait until it expires"
        raise LockHeldError(
            f"{status.key} is held by {body.user} on {body.machine} since "
            f"{body.since:%Y-%m-%d %H:%M} UTC (expires {body.expires:%Y-%m-%d %H:%M} UTC, "
            f"last heartbeat {_age(status.heartbeat_age)} ago"
            f"{', holder appears gone' if status.is_stale else ''}): {hint}"
        )

    def renew(self) -> None:
        """Rewrite heartbeat and expiry by CAS; ``LockLostError`` if it changed under us."""
        if self._etag is None:
            raise LockLostError(f"{self.key}: this session never held the lock")
        try:
            status = self.read()
        except LockCorruptError as exc:
            raise LockLostError(
                f"{self.key} was overwritten with something that is not a lock"
            ) from exc
        if status is None or status.etag != self._etag:
            raise self._lost(status)
        body = self._body(status.server_time, since=status.body.since)
        try:
            result = self.store.put_bytes(
                self.key, body.to_bytes(), if_match=self._etag, content_type="application/json"
            )
        except PreconditionFailedError as exc:
            raise self._lost(self._safe_read()) from exc
        self._etag = result.etag

    def _safe_read(self) -> LockStatus | None:
        try:
            return self.read()
        except AgentError:
            return None

    def _lost(self, status: LockStatus | None) -> LockLostError:
        now = (
            "nobody"
            if status is None
            else f"{status.body.user} on {status.body.machine} ({status.body.state})"
        )
        return LockLostError(
            f"the lock {self.key} was taken from this session (it now says: {now}); streaming "
            "stopped, the journal and the staged changes are kept. `agent recover` continues "
            "once the stage is free"
        )

    def release(self) -> None:
        """Write ``state: released`` by CAS (never a delete)."""
        if self._etag is None:
            return
        status = self._safe_read()
        body = (
            status.body.model_copy(update={"state": "released", "heartbeat_at": status.server_time})
            if status is not None
            else self._body(self.store.server_time())
        )
        try:
            self.store.put_bytes(
                self.key, body.to_bytes(), if_match=self._etag, content_type="application/json"
            )
        except PreconditionFailedError as exc:
            raise self._lost(status) from exc
        log.info("lock_released", key=self.key, session_id=self.holder.session_id)
        self._etag = None


def force_unlock(
    store: ObjectStore,
    key: str,
    *,
    operator: str,
    machine: str,
    reason: str,
    config: LockConfig | None = None,
) -> LockStatus:
    """An operator's explicit break: ``released`` by CAS, recording who and why."""
    config = config or LockConfig()
    try:
        data = store.get(key)
    except NotFoundError as exc:
        raise NotFoundError(f"there is no lock {key} to unlock") from exc
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
        )
    result = store.put_bytes(
        key, body.to_bytes(), if_match=data.etag, content_type="application/json"
    )
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


class Heartbeat:
    """Renews a lock every ``interval`` seconds until stopped or the lock is lost."""

    def __init__(
        self,
        lock: RemoteLock,
        interval: float,
        *,
        on_lost: Callable[[LockLostError], None],
        on_renewed: Callable[[str], None] | None = None,
    ) -> None:
        self.lock = lock
        self.interval = interval
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdagent-heartbeat", daemon=True)
        self.last_renewed = datetime.now(UTC)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def age(self) -> float:
        """Seconds since the last successful renewal."""
        return (datetime.now(UTC) - self.last_renewed).total_seconds()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lock.renew()
            except LockLostError as exc:
                self._on_lost(exc)
                return
            except AgentError as exc:
                log.warning("heartbeat_failed", key=self.lock.key, error=str(exc))
                continue
            self.last_renewed = datetime.now(UTC)
            if self._on_renewed is not None and self.lock.etag:
                self._on_renewed(self.lock.etag)

    def stop(self) -> None:
        """Stop and wait for the thread (bounded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
