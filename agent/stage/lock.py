"""The stage lock: a small register in the bucket changed only by compare-and-swap.

``{projekt_id}/{stage}.lock.json`` is created with ``If-None-Match: *`` and from
then on only rewritten with ``If-Match: <etag>``; it is never deleted (R2 has no
conditional delete, and a read-then-delete can remove someone else's new lock).
Expiry is judged by the store's clock. Of two racers for a free lock exactly
one CAS wins; the other re-reads and sees the winner.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from agent.config import LockConfig
from agent.errors import (
    AgentError,
    LockError,
    LockHeldError,
    LockLostError,
    PreconditionFailedError,
)
from agent.log import get_logger
from agent.platform import pid_alive
from agent.stage.cas import new_write_id, put_fenced
from agent.stage.lockbody import Holder, LockBody, LockStatus, _age, read_lock
from agent.stage.locktools import ensure_store_is_safe
from agent.store.base import ObjectStore, WriteResult
from agent.text import printable

__all__ = ["Heartbeat", "RemoteLock"]

log = get_logger(__name__)

_CAS_ROUNDS = 8
_REMEMBERED_WRITES = 32
_DATE_RESOLUTION = timedelta(seconds=2)

# Sessions of this process whose lock keeper is live (acquired, not yet released or
# given up). A lock held under our name and pid by a session *not* in here was left
# behind by a session of this process that ended without its release landing (an
# open that failed half-way while the store was failing): it may be re-entered.
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


class RemoteLock:
    """One session's keeper of one stage lock: the only writer of its ETag.

    Acquire, heartbeat renewals, close's fencing renewal and the release all go
    through here one at a time (``_mutex``), so two writers of this process never
    race on one ETag. Every write carries a fresh ``write_id``; the ids of our
    recent writes are remembered, so a write of ours whose answer was lost is
    recognised when it is read back (never a false "lock lost").
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        holder: Holder,
        config: LockConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.key = key
        self.holder = holder
        self.config = config
        self._etag: str | None = None
        self._since: datetime | None = None
        self._clock_offset = timedelta(0)
        self._sent: deque[str] = deque(maxlen=_REMEMBERED_WRITES)
        self._mutex = threading.RLock()
        self._sleep, self._clock = sleep, clock
        self._last_write: float | None = None

    @property
    def etag(self) -> str | None:
        """The ETag of our last write (None until acquired)."""
        return self._etag

    def adopt(self, etag: str) -> None:
        """Continue with a lock another process of this session acquired."""
        with self._mutex:
            self._etag = etag
            self._live(True)

    def read(self) -> LockStatus | None:
        """The lock as it is now."""
        return read_lock(self.store, self.key, self.config)

    def _store_now(self) -> datetime:
        return datetime.now(UTC) + self._clock_offset

    def store_now(self) -> datetime:
        """The store's clock as this lock's last answers gave it (the local clock corrected
        by the offset they showed): the one clock for every time the agent stores."""
        return self._store_now()

    def _note_clock(self, server_time: datetime) -> None:
        """Follow the store's clock (HTTP ``Date``); its 1 s resolution is not a skew."""
        offset = server_time - datetime.now(UTC)
        self._clock_offset = offset if abs(offset) > _DATE_RESOLUTION else timedelta(0)

    def _body(self, now: datetime, write_id: str, since: datetime | None = None) -> LockBody:
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
            write_id=write_id,
        )

    def _put(self, body: LockBody, *, if_match: str | None, gap: bool = True) -> WriteResult:
        """One fenced write; its id is remembered before it is sent.

        ``gap``: wait out ``write_gap`` since our last write of the key first. The release
        does not (``gap=False``): it is the session's last write, a close would otherwise
        wait up to a second after its fencing renewal for nothing, and a 429 from a store
        that counts writes per key is retried with backoff like any other.
        """
        assert body.write_id is not None
        if gap and self._last_write is not None:
            # R2: about one write a second per key; closer writes are answered 429.
            wait = self._last_write + self.config.write_gap - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_write = self._clock()
        self._sent.append(body.write_id)
        result = put_fenced(
            self.store,
            self.key,
            body.to_bytes(),
            body.write_id,
            if_match=if_match,
            if_none_match=if_match is None,
        )
        self._note_clock(result.server_time)
        return result

    def _is_our_write(self, status: LockStatus | None) -> bool:
        """The lock holds one of this handle's own writes (an answer we lost)."""
        return (
            status is not None
            and status.body.session_id == self.holder.session_id
            and status.body.write_id is not None
            and status.body.write_id in self._sent
        )

    def acquire(self, *, take_over: bool = False) -> LockStatus:
        """Take the lock, re-enter it, or raise ``LockHeldError`` naming the holder."""
        ensure_store_is_safe(self.store)
        with self._mutex:
            for _ in range(_CAS_ROUNDS):
                status = self.read()
                if status is not None:
                    self._note_clock(status.server_time)
                    if self._is_our_write(status) and status.body.state == "held":
                        self._etag, self._since = status.etag, status.body.since
                        self._live(True)
                        return status
                    self._check_may_take(status, take_over)
                same = (
                    status is not None
                    and status.body.state == "held"
                    and status.body.session_id == self.holder.session_id
                )
                now = status.server_time if status is not None else self._store_now()
                body = self._body(
                    now,
                    new_write_id(),
                    since=status.body.since if same and status is not None else None,
                )
                try:
                    result = self._put(body, if_match=status.etag if status else None)
                except PreconditionFailedError:
                    log.info("lock_race_lost_rereading", key=self.key)
                    continue
                self._etag, self._since = result.etag, body.since
                self._live(True)
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
        """Held under our name on this machine by our session, or by a process that is gone."""
        if body.user != self.holder.user or body.machine != self.holder.machine:
            return False
        if body.session_id == self.holder.session_id:
            return True
        if body.pid == os.getpid():
            with _LIVE_LOCK:
                return body.session_id not in _LIVE
        return body.pid is None or not pid_alive(body.pid)

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
        elif body.user == self.holder.user and body.machine == self.holder.machine:
            hint = (
                f"another session of yours on this machine holds it "
                f"(session {printable(body.session_id)}, "
                f"pid {body.pid}); finish that one with `agent close` or `agent abort`"
            )
        elif body.user == self.holder.user:
            hint = (
                f"you hold it on another machine ({printable(body.machine)}); close the session "
                "there, or "
                "use --take-over if that machine is gone"
            )
        elif status.is_stale:
            hint = "the holder appears gone (stale heartbeat): --take-over takes it"
        else:
            hint = "ask them to close, see `agent lock show`, or wait until it expires"
        raise LockHeldError(
            f"{printable(status.key)} is held by {printable(body.user)} on "
            f"{printable(body.machine)} since "
            f"{body.since:%Y-%m-%d %H:%M} UTC (expires {body.expires:%Y-%m-%d %H:%M} UTC, "
            f"last heartbeat {_age(status.heartbeat_age)} ago"
            f"{', holder appears gone' if status.is_stale else ''}): {hint}"
        )

    def _cas(self, make: Callable[[datetime, str], LockBody], *, gap: bool = True) -> LockBody:
        """Write ``make(now, write_id)`` over our ETag; adopt our own lost write once."""
        if self._etag is None:
            raise LockLostError(f"{self.key}: this session never held the lock")
        for _ in range(2):
            body = make(self._store_now(), new_write_id())
            try:
                result = self._put(body, if_match=self._etag, gap=gap)
            except PreconditionFailedError as exc:
                status = self._safe_read()
                if self._is_our_write(status) and status is not None:
                    log.info("lock_adopted_own_lost_write", key=self.key, etag=status.etag)
                    if body.state == "released" and status.body.state == "released":
                        self._etag = status.etag
                        return status.body
                    self._etag = status.etag
                    continue
                raise self._lost(status) from exc
            self._etag = result.etag
            return body
        raise self._lost(self._safe_read())

    def renew(self) -> None:
        """Rewrite heartbeat and expiry by CAS; ``LockLostError`` if it changed under us."""
        with self._mutex:
            self._cas(lambda now, wid: self._body(now, wid, since=self._since))

    def _safe_read(self) -> LockStatus | None:
        try:
            return self.read()
        except AgentError:
            return None

    def _lost(self, status: LockStatus | None) -> LockLostError:
        now = (
            "nobody"
            if status is None
            else f"{printable(status.body.user)} on {printable(status.body.machine)} "
            f"({status.body.state})"
        )
        return LockLostError(
            f"the lock {self.key} was taken from this session (it now says: {now}); streaming "
            "stopped, the journal and the staged changes are kept. `agent recover` continues "
            "once the stage is free"
        )

    def release(self) -> None:
        """Write ``state: released`` by CAS (never a delete) and read it back.

        Raises ``LockError`` unless the lock in the bucket then says ``released``
        with our write: a close never reports success with the lock still held.
        """
        with self._mutex:
            if self._etag is None:
                return
            written = self._cas(
                lambda now, wid: self._body(now, wid, since=self._since).model_copy(
                    update={"state": "released", "expires": now}
                ),
                gap=False,
            )
            check = self.read()
            if (
                check is None
                or check.body.state != "released"
                or check.body.write_id != written.write_id
            ):
                raise LockError(
                    f"the release of {self.key} was written but the lock now says "
                    f"{check.body.state if check else 'nothing'}: check `agent lock show`"
                )
            log.info("lock_released", key=self.key, session_id=self.holder.session_id)
            self._etag = None
            self._live(False)

    def _live(self, live: bool) -> None:
        with _LIVE_LOCK:
            (_LIVE.add if live else _LIVE.discard)(self.holder.session_id)

    def abandon(self) -> None:
        """This session ends without its release having landed (the store is failing).

        The lock stays in the bucket until it expires, but this process may take it
        again: a later open under our name re-enters instead of waiting for expiry.
        """
        with self._mutex:
            self._live(False)


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
        self.last_error: str | None = None
        """Why the last renewal failed; ``None`` once one succeeds again."""

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
                self.last_error = str(exc)
                continue
            self.last_renewed = datetime.now(UTC)
            self.last_error = None
            if self._on_renewed is not None and self.lock.etag:
                self._on_renewed(self.lock.etag)

    def stop(self) -> None:
        """Stop and wait for the thread (bounded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
