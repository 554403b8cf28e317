"""``agent doctor``: check that the configured store can hold locks and data.

Each check is independent and reports what it found; a failed check carries the
exit code of the error class it met, so scripts can tell "wrong credentials"
from "store ignores conditional writes".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.lock import probe_conditional_writes
from agent.store import ObjectStore, open_store

__all__ = ["Check", "run_checks"]

MAX_SKEW_SECONDS = 60.0


@dataclass(frozen=True)
class Check:
    """One doctor check's outcome."""

    name: str
    ok: bool
    detail: str
    exit_code: int = 0

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _fail(name: str, exc: AgentError) -> Check:
    return Check(name, False, f"{type(exc).__name__}: {exc.format_message()}", exc.exit_code)


def _check_listing(store: ObjectStore) -> Check:
    try:
        found = list(islice(store.list(""), 5))
    except AgentError as exc:
        return _fail("bucket and credentials", exc)
    return Check("bucket and credentials", True, f"listing works ({len(found)} objects sampled)")


def _check_clock(store: ObjectStore) -> Check:
    try:
        remote = store.server_time()
    except AgentError as exc:
        return _fail("clock skew", exc)
    skew = (datetime.now(UTC) - remote).total_seconds()
    detail = f"local clock is {skew:+.1f}s from the store's (lock expiry uses the store's clock)"
    return Check(
        "clock skew",
        abs(skew) <= MAX_SKEW_SECONDS,
        detail,
        0 if abs(skew) <= MAX_SKEW_SECONDS else 1,
    )


def _check_conditional(store: ObjectStore) -> Check:
    try:
        probe_conditional_writes(store)
    except AgentError as exc:
        return _fail("conditional writes (locking)", exc)
    return Check(
        "conditional writes (locking)",
        True,
        "If-None-Match and If-Match are honoured: locks give mutual exclusion",
    )


def run_checks(config: AgentConfig) -> list[Check]:
    """Run every check against the configured store."""
    try:
        store = open_store(config)
    except AgentError as exc:
        return [_fail("open store", exc)]
    try:
        listing = _check_listing(store)
        if not listing.ok:
            return [listing]
        return [listing, _check_conditional(store), _check_clock(store)]
    finally:
        store.close()
