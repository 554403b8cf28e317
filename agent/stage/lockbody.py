"""What the stage lock object says, read as data and judged by the store's clock.

``LockBody`` is the validated body (anyone with write access can put anything in
the bucket), ``LockStatus`` one read of it with the store's time; ``read_lock`` and
``judge_lock`` turn an object into a status or ``LockCorruptError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from agent.config import LockConfig
from agent.errors import LockCorruptError, NotFoundError, ObjectTooLargeError
from agent.store.base import LOCK_MAX_BYTES, ObjectData, ObjectStore
from agent.text import printable

__all__ = ["Holder", "LockBody", "LockStatus", "judge_lock", "read_lock"]


class LockBody(BaseModel):
    """What the lock object says.

    The body comes from the bucket, where anyone with write access can put
    anything: it is validated as data (issue 9). Dates without a timezone are
    read as UTC (DESIGN.md says the lock's dates are UTC; an older or foreign
    writer that left the offset out meant UTC), so they compare with the store's
    clock instead of crashing; the optional fields may be missing in any
    combination (``broken_by`` without ``broken_at`` is shown as "at an unknown time").
    """

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
    write_id: str | None = None
    """Unique per write: how a writer recognises its own write when the answer was lost."""

    @field_validator("since", "expires", "heartbeat_at", "broken_at", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """A naive date is UTC; an aware one is converted to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def to_bytes(self) -> bytes:
        """JSON as stored."""
        return self.model_dump_json(indent=1).encode()


def _when(value: datetime | None) -> str:
    return "an unknown time" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


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
        p = printable
        key = p(self.key)
        if b.state == "released":
            lines = [f"{key}: free (released; last holder {p(b.user)} on {p(b.machine)})"]
            if b.broken_by:
                lines.append(
                    f"  broken by {p(b.broken_by)} at {_when(b.broken_at)}: "
                    f"{p(b.broken_reason)} (holder was {p(b.previous_holder)})"
                )
            return lines
        gone = " - holder appears gone" if self.is_stale else ""
        expired = " (EXPIRED: free to take)" if self.is_expired else ""
        return [
            f"{key}: held by {p(b.user)} on {p(b.machine)}{expired}",
            f"  since {_when(b.since)}, expires {_when(b.expires)}",
            f"  last heartbeat {_age(self.heartbeat_age)} ago{gone}",
            f"  session {p(b.session_id)}, pid {b.pid}, agent {p(b.agent_version)}",
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


def _corrupt(key: str, why: str) -> LockCorruptError:
    projekt, _, rest = key.partition("/")
    stage = rest.removesuffix(".lock.json")
    return LockCorruptError(
        f"the lock {printable(key)} does not parse as a lock ({why}); nobody can take it "
        f"until an operator runs `agent lock unlock {printable(projekt)} --stage "
        f"{printable(stage)} --force`, which overwrites it by compare-and-swap"
    )


def _parse(key: str, data: bytes) -> LockBody:
    try:
        return LockBody.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        raise _corrupt(key, type(exc).__name__) from exc


def read_lock(store: ObjectStore, key: str, config: LockConfig) -> LockStatus | None:
    """Read and judge a lock; ``None`` when no lock object exists."""
    try:
        data = store.get(key, max_bytes=LOCK_MAX_BYTES)
    except NotFoundError:
        return None
    except ObjectTooLargeError as exc:
        raise _corrupt(key, f"{exc.size or 'more than ' + str(exc.limit)} bytes") from exc
    return judge_lock(key, data, config)


def judge_lock(key: str, data: ObjectData, config: LockConfig) -> LockStatus:
    """A lock object as read (``LockCorruptError`` if its body is not a lock)."""
    return LockStatus(
        key=key,
        body=_parse(key, data.body),
        etag=data.etag,
        server_time=data.server_time,
        stale_after=config.stale_after,
    )
