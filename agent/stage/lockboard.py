"""Who works on what (issue 11): every stage lock under the store prefix at once.

One listing of the top level (the projects) and one per project (their
``{stage}.lock.json`` objects), then the locks read at once (``get_many``). A lock body that
does not parse is shown as ``corrupt``, never an error for the whole board.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from agent.config import LockConfig
from agent.errors import InvalidNameError, LockCorruptError, ObjectTooLargeError
from agent.names import validate_name
from agent.stage.keys import StageKeys
from agent.stage.lockbody import judge_lock
from agent.store.base import LOCK_MAX_BYTES, ObjectData, ObjectStore
from agent.store.parallel import Parallel

__all__ = ["LockRow", "list_locks"]

_LOCK_SUFFIX = ".lock.json"

State = Literal["held", "released", "expired", "corrupt"]


@dataclass(frozen=True)
class LockRow:
    """One stage's lock as the board shows it (times by the store's clock)."""

    projekt_id: str
    stage: str
    state: State
    user: str | None = None
    machine: str | None = None
    since: datetime | None = None
    heartbeat_age_seconds: float | None = None
    appears_gone: bool = False
    expires: datetime | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` (times as ISO 8601)."""
        return {
            "projekt_id": self.projekt_id,
            "stage": self.stage,
            "state": self.state,
            "user": self.user,
            "machine": self.machine,
            "since": self.since.isoformat() if self.since else None,
            "heartbeat_age_seconds": self.heartbeat_age_seconds,
            "appears_gone": self.appears_gone,
            "expires": self.expires.isoformat() if self.expires else None,
            "problem": self.problem,
        }


def _stages(store: ObjectStore, projekt_id: str) -> list[StageKeys]:
    objects, _subs = store.list_level(f"{projekt_id}/")
    out = []
    for info in objects:
        name = info.key.removeprefix(f"{projekt_id}/")
        if not name.endswith(_LOCK_SUFFIX):
            continue
        try:
            out.append(StageKeys(projekt_id, name.removesuffix(_LOCK_SUFFIX)))
        except InvalidNameError:
            continue  # not a stage of ours (a name we would never write)
    return out


def _projects(store: ObjectStore) -> list[str]:
    _objects, subs = store.list_level("")
    out = []
    for sub in subs:
        try:
            out.append(validate_name("projekt_id", sub.rstrip("/")))
        except InvalidNameError:
            continue  # .pdagent-probe and other foreign folders
    return out


def _too_large(keys: StageKeys, size: int | None) -> LockRow:
    told = f"{size} bytes" if size is not None else f"more than {LOCK_MAX_BYTES} bytes"
    return LockRow(
        keys.projekt_id,
        keys.stage,
        "corrupt",
        problem=f"the lock body is {told}, over the {LOCK_MAX_BYTES} bytes a lock may have: "
        "not read",
    )


def _row(keys: StageKeys, data: ObjectData | None, config: LockConfig) -> LockRow:
    if data is None:  # removed between the listing and the read
        return LockRow(keys.projekt_id, keys.stage, "released")
    try:
        status = judge_lock(keys.lock, data, config)
    except LockCorruptError as exc:
        return LockRow(keys.projekt_id, keys.stage, "corrupt", problem=exc.format_message())
    body = status.body
    state: State = (
        "released" if body.state == "released" else ("expired" if status.is_expired else "held")
    )
    return LockRow(
        projekt_id=keys.projekt_id,
        stage=keys.stage,
        state=state,
        user=body.user,
        machine=body.machine,
        since=body.since,
        heartbeat_age_seconds=round(status.heartbeat_age, 1),
        appears_gone=state == "held" and status.is_stale,
        expires=body.expires,
    )


def list_locks(
    store: ObjectStore,
    config: LockConfig,
    projekt_ids: Sequence[str] = (),
    *,
    workers: int = 16,
) -> list[LockRow]:
    """Every stage lock (of ``projekt_ids``, or of every project), by project and stage."""
    projects = list(projekt_ids) or _projects(store)
    pool = Parallel(workers)
    stages = [keys for found in pool.map(projects, lambda p: _stages(store, p)) for keys in found]
    oversized: dict[str, int | None] = {}
    try:
        bodies = store.get_many([keys.lock for keys in stages], max_bytes=LOCK_MAX_BYTES)
    except ObjectTooLargeError as exc:  # those locks unread, the rest as read
        oversized = exc.oversized
        bodies = [data if isinstance(data, ObjectData) else None for data in exc.results]
    rows = [
        _too_large(keys, oversized[keys.lock])
        if keys.lock in oversized
        else _row(keys, data, config)
        for keys, data in zip(stages, bodies, strict=True)
    ]
    return sorted(rows, key=lambda r: (r.projekt_id, r.stage))
