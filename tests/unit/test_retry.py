"""The retry policy: exact waits, transient errors only (tenacity with injected sleep)."""

from __future__ import annotations

import pytest

from agent.config import RetryConfig
from agent.errors import AccessDeniedError, PreconditionFailedError, TransientStoreError
from agent.retry import backoff, call_with_retries, delay_after

CFG = RetryConfig(attempts=5, initial_backoff=0.2, max_backoff=1.0, jitter=0)


def test_transient_errors_are_retried_with_exponential_capped_waits() -> None:
    """Waits double from initial_backoff and stop at max_backoff; success ends the loop."""
    waits: list[float] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise TransientStoreError("503")
        return "ok"

    assert "ok" == call_with_retries(flaky, CFG, sleep=waits.append)
    assert [0.2, 0.4, 0.8, 1.0] == waits


def test_last_transient_error_is_raised_after_all_attempts() -> None:
    """After `attempts` tries the last TransientStoreError propagates."""
    waits: list[float] = []

    def down() -> None:
        raise TransientStoreError("connection refused")

    with pytest.raises(TransientStoreError, match="refused"):
        call_with_retries(down, CFG, sleep=waits.append)
    assert 4 == len(waits)


@pytest.mark.parametrize("exc", [AccessDeniedError("403"), PreconditionFailedError("412")])
def test_permanent_errors_are_never_retried(exc: Exception) -> None:
    """403 and 412 fail at once."""
    waits: list[float] = []
    calls = 0

    def refused() -> None:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        call_with_retries(refused, CFG, sleep=waits.append)
    assert (1, []) == (calls, waits)


def test_jitter_stays_within_its_bound() -> None:
    """Jittered waits lie between the exponential value and that plus jitter."""
    waits: list[float] = []
    cfg = RetryConfig(attempts=4, initial_backoff=0.1, max_backoff=10, jitter=0.5)

    def down() -> None:
        raise TransientStoreError("x")

    with pytest.raises(TransientStoreError):
        call_with_retries(down, cfg, sleep=waits.append)
    for wait, base in zip(waits, [0.1, 0.2, 0.4], strict=True):
        assert base <= wait <= base + 0.5


def test_delay_after_follows_the_strategy_and_its_cap() -> None:
    """Loops that schedule their own retries get tenacity's waits, capped."""
    cfg = RetryConfig(attempts=3, initial_backoff=0.5, max_backoff=2.0, jitter=0)
    waits = [delay_after(backoff(cfg), n) for n in (1, 2, 3, 4, 10)]
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert delay_after(backoff(cfg, cap=30.0), 10) == 30.0


def test_a_connection_closed_before_any_answer_is_retried_at_once_then_backed_off() -> None:
    """A stale pooled connection (closed by the store while idle) is retried without a wait;
    if the fresh connection fails too, the usual backoff follows."""
    waits: list[float] = []
    calls = 0

    def stale_then_fine() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            error = TransientStoreError("Connection was closed before we received a response")
            error.retry_at_once = True
            raise error
        return "ok"

    assert "ok" == call_with_retries(stale_then_fine, CFG, sleep=waits.append)
    assert [0.0, 0.4] == waits
