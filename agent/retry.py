"""The retry policy for store requests, built from ``RetryConfig`` (tenacity).

Only ``TransientStoreError`` is retried (connection errors, timeouts, 5xx,
throttling); 4xx and failed preconditions never are. Waits grow exponentially
with jitter. ``sleep`` is injectable so tests assert the exact waits without
waiting (tenacity's ``nap`` seam).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from agent.config import RetryConfig
from agent.errors import TransientStoreError
from agent.log import get_logger

__all__ = ["backoff", "call_with_retries", "delay_after", "make_retrying"]

log = get_logger(__name__)
T = TypeVar("T")


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
    config: RetryConfig, *, sleep: Callable[[float], None] = time.sleep, what: str = ""
) -> Retrying:
    """A tenacity ``Retrying`` for one request (re-raises the last error)."""

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
        if state.attempt_number == 1 and getattr(exc, "retry_at_once", False):
            return 0.0  # a stale pooled connection: a fresh one needs no backoff
        return float(waits(state))

    return Retrying(
        stop=stop_after_attempt(config.attempts),
        wait=wait,
        retry=retry_if_exception_type(TransientStoreError),
        sleep=sleep,
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
    """Call ``fn`` under the policy; the last ``TransientStoreError`` is raised after the tries."""
    return make_retrying(config, sleep=sleep, what=what)(fn)
