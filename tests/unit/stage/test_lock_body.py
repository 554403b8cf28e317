"""Lock bodies are bucket input: validated as data, never a crash (issue 9)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from agent.errors import LockCorruptError
from agent.stage.lockbody import LockBody, LockStatus, _parse

_NAIVE = {
    "state": "held",
    "user": "bob",
    "machine": "ws",
    "since": "2026-01-01T08:00:00",
    "expires": "2026-01-01T20:00:00",
    "heartbeat_at": "2026-01-01T08:00:00",
}


def _status(body: LockBody) -> LockStatus:
    return LockStatus(
        key="P/s.lock.json",
        body=body,
        etag="e",
        server_time=datetime(2026, 1, 1, 9, 0, tzinfo=UTC),
        stale_after=600,
    )


def test_naive_dates_are_read_as_utc() -> None:
    """A date without an offset is UTC, so it compares with the store's clock."""
    body = LockBody.model_validate_json(json.dumps(_NAIVE))
    assert datetime(2026, 1, 1, 8, 0, tzinfo=UTC) == body.since
    status = _status(body)
    assert 3600.0 == status.heartbeat_age
    assert status.is_stale
    assert not status.is_expired


def test_other_offsets_are_converted_to_utc() -> None:
    """``+02:00`` is the same instant in UTC."""
    body = LockBody.model_validate_json(
        json.dumps({**_NAIVE, "since": "2026-01-01T10:00:00+02:00"})
    )
    assert datetime(2026, 1, 1, 8, 0, tzinfo=UTC) == body.since


def test_broken_by_without_broken_at_describes_without_a_crash() -> None:
    """Optional fields may be missing in any combination."""
    body = LockBody.model_validate_json(
        json.dumps({**_NAIVE, "state": "released", "broken_by": "op"})
    )
    lines = _status(body).describe()
    assert "broken by op at an unknown time: None (holder was None)" in lines[1]
    assert _status(body).as_dict()["body"]["broken_at"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    "data",
    [b"", b"null", b"[]", b'{"state": "held"}', b'{"state": "maybe"}', b"\xff", b"{" * 50_000],
)
def test_a_body_that_is_not_a_lock_is_lock_corrupt(data: bytes) -> None:
    """Anything else is LockCorruptError (exit 4) with the operator's fix."""
    with pytest.raises(LockCorruptError, match="unlock P --stage s --force"):
        _parse("P/s.lock.json", data)
