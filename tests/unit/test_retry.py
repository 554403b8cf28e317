"""The retry policy: exact waits, transient errors only (tenacity with injected sleep)."""

from __future__ import annotations

import threading

import pytest

from agent.config import RetryConfig
from agent.errors import AccessDeniedError, PreconditionFailedError, TransientStoreError
from agent.retry import backoff, call_with_retries, delay_after, stop_retrying_on

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
    """A stale pooled connection (closed by the store while idle) is retried without a wait,
    and so is a second one (the pool's connections went idle together); if a third fails
    too, the usual backoff follows."""
    waits: list[float] = []
    calls = 0

    def stale_then_fine() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            error = TransientStoreError("Connection was closed before we received a response")
            error.retry_at_once = True
            raise error
        return "ok"

    assert "ok" == call_with_retries(stale_then_fine, CFG, sleep=waits.append)
    assert [0.0, 0.0, 0.8] == waits


def test_once_the_scopes_event_is_set_a_request_is_not_retried_and_its_error_raised() -> None:
    """Inside ``stop_retrying_on``: the event set during a failed request's wait ends the
    retries with that request's error (no further attempt, the wait cut short)."""
    stop = threading.Event()
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise TransientStoreError(f"timeout {calls}") from OSError("no answer")

    def wait(_seconds: float) -> None:
        stop.set()  # the process ends while the request waits for its retry

    with stop_retrying_on(stop), pytest.raises(TransientStoreError, match="timeout 1") as err:
        call_with_retries(down, CFG, sleep=wait)
    assert 1 == calls
    assert isinstance(err.value.__cause__, OSError), "the error's own cause is kept"


def test_once_the_scopes_event_is_set_no_request_starts_and_other_threads_retry_on() -> None:
    """With the event already set nothing is sent; outside the scope (another thread, or
    after it) the retries are as ever; the wait itself ends when the event is set."""
    stop = threading.Event()
    stop.set()
    sent: list[str] = []
    with stop_retrying_on(stop), pytest.raises(TransientStoreError, match="sending was stopped"):
        call_with_retries(lambda: sent.append("x"), CFG, sleep=lambda _s: None)
    assert [] == sent
    outside: list[float] = []

    def flaky() -> str:
        if len(outside) < 2:
            raise TransientStoreError("503")
        return "ok"

    assert "ok" == call_with_retries(flaky, CFG, sleep=outside.append)
    late = threading.Event()
    threading.Timer(0.05, late.set).start()
    slow = RetryConfig(attempts=3, initial_backoff=3600, max_backoff=3600, jitter=0)

    def never() -> None:
        raise TransientStoreError("down")

    with stop_retrying_on(late), pytest.raises(TransientStoreError, match="down"):
        call_with_retries(never, slow)  # the real sleep: an hour, unless the event ends it


def test_a_call_that_succeeds_at_once_builds_no_policy_and_a_failed_one_is_its_attempt_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first try runs without tenacity (its setup cost as much as a small download's
    work); after a transient failure the policy runs on, that failure counted as attempt 1."""
    from agent import retry

    real = retry.make_retrying
    built: list[str] = []

    def counting(*args: object, **kwargs: object) -> object:
        built.append("policy")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(retry, "make_retrying", counting)
    assert "ok" == call_with_retries(lambda: "ok", CFG)
    assert [] == built
    outcomes = iter([TransientStoreError("503"), None])
    waits: list[float] = []

    def once_flaky() -> str:
        if (exc := next(outcomes)) is not None:
            raise exc
        return "ok"

    assert "ok" == call_with_retries(once_flaky, CFG, sleep=waits.append)
    assert (["policy"], [0.2]) == (built, waits)
