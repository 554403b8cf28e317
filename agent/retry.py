"""The retry policy for store requests, built from ``RetryConfig`` (tenacity).

Only ``TransientStoreError`` is retried (connection errors, timeouts, 5xx,
throttling); 4xx and failed preconditions never are. Waits grow exponentially
with jitter. ``sleep`` is injectable so tests assert the exact waits without
waiting (tenacity's ``nap`` seam).

``stop_retrying_on(event)``: on the calling thread, inside the ``with``, the requests
are retried only until ``event`` is set (a wait ends at once; the last error is
raised) and none starts once it is (the streamer's uploads when the process ends).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from agent.config import RetryConfig
from agent.errors import TransientStoreError
from agent.log import get_logger

__all__ = [
    "backoff",
    "call_with_retries",
    "delay_after",
    "make_retrying",
    "stop_retrying_on",
]

log = get_logger(__name__)
T = TypeVar("T")

_scope = threading.local()  # ``stop``: the event of the innermost ``stop_retrying_on``
# Stale-connection failures retried without a wait before the backoff starts.
_AT_ONCE = 2


@contextmanager
def stop_retrying_on(stop: threading.Event) -> Iterator[None]:
    """On this thread, inside: no request is retried (nor started) once ``stop`` is set."""
    outer = getattr(_scope, "stop", None)
    _scope.stop = stop
    try:
        yield
    finally:
        _scope.stop = outer


class _StoppedError(Exception):
    """The wait before a retry ended because the scope's event was set."""


def backoff(config: RetryConfig, *, cap: float | None = None) -> wait_base:
    """Exponential wait plus jitter, from tenacity's strategies.

    ``min(cap, initial * 2**(n-1)) + uniform(0, jitter)``; ``cap`` defaults to
    ``max_backoff``.
    """
    ceiling = config.max_backoff if cap is None else cap
    exponential = wait_exponential(multiplier=config.initial_backoff, max=ceiling)
    return exponential + wait_random(0, config.jitter)


def delay_after(wait: wait_base, failures: int) -> float:
    """The wait ``wait`` gives after ``failures`` failed attempts.

    For loops that schedule their own retries (the streamer, the watcher's
    delivery) instead of blocking in ``Retrying``.
    """
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = max(1, failures)
    return float(wait(state))


def make_retrying(
    config: RetryConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "",
    stop: threading.Event | None = None,
) -> Retrying:
    """A tenacity ``Retrying`` for one request (re-raises the last error); ``stop`` ends
    the retries once set (a wait in progress raises ``_StoppedError``)."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "store_retry",
            key=what,
            attempt=state.attempt_number,
            error=str(exc),
            wait=round(state.next_action.sleep, 3) if state.next_action else None,
        )

    waits = backoff(config)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if state.attempt_number <= _AT_ONCE and getattr(exc, "retry_at_once", False):
            # A stale pooled connection: the next needs no backoff. The connections of
            # one pool went idle together (a long upload ran on the other client), so
            # the retry may meet a second stale one (seen at 4 x 64 MiB: 0.4-0.8 s waits).
            return 0.0
        return float(waits(state))

    nap = sleep
    if stop is not None:

        def nap(seconds: float) -> None:
            if sleep is time.sleep:
                stop.wait(seconds)
            else:
                sleep(seconds)
            if stop.is_set():
                raise _StoppedError

    return Retrying(
        stop=stop_after_attempt(config.attempts)
        if stop is None
        else stop_after_attempt(config.attempts) | stop_when_event_set(stop),
        wait=wait,
        retry=retry_if_exception_type(TransientStoreError),
        sleep=nap,
        reraise=True,
        before_sleep=before_sleep,
    )


def call_with_retries(
    fn: Callable[[], T],
    config: RetryConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "",
) -> T:
    """Call ``fn`` under the policy; the last ``TransientStoreError`` is raised after the tries.

    Inside ``stop_retrying_on(event)`` with ``event`` set, nothing is sent
    (``TransientStoreError``), and a retry's wait ends as it is set (the last error).
    """
    stop: threading.Event | None = getattr(_scope, "stop", None)
    if stop is None:
        # The first try without tenacity: building a ``Retrying`` costs ~0.2 ms, as
        # much again as a small download's own work, and almost every call succeeds
        # at once. A failure is replayed as the policy's attempt 1 (same log, same
        # wait), so the retries go exactly as before.
        try:
            return fn()
        except TransientStoreError as exc:
            failed: list[TransientStoreError] = [exc]

        def replay() -> T:
            if failed:
                raise failed.pop()
            return fn()

        return make_retrying(config, sleep=sleep, what=what)(replay)
    if stop.is_set():
        raise TransientStoreError(f"not sent ({what or 'a request'}): the sending was stopped")
    last: list[BaseException] = []

    def attempt() -> T:
        try:
            return fn()
        except BaseException as exc:
            last[:] = [exc]
            raise

    try:
        return make_retrying(config, sleep=sleep, what=what, stop=stop)(attempt)
    except _StoppedError:
        pass  # the last error is raised outside: its own cause, no context of ours
    log.info("store_retry_stopped", key=what)
    raise last[0]
