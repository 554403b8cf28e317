"""``run_on_main_thread``: a call asked for from any thread runs on the main thread the
next time it runs Python, with no signal sent; a call that fails is logged there."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import pytest

from agent.platform import run_on_main_thread
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="tests run off main"
)


def _ask_from_a_worker(callback: Callable[[], None]) -> bool:
    asked: list[bool] = []
    worker = threading.Thread(target=lambda: asked.append(run_on_main_thread(callback)))
    worker.start()
    worker.join()
    return asked == [True]


def test_a_call_asked_for_from_a_worker_runs_once_on_the_main_thread() -> None:
    ran: list[bool] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert _ask_from_a_worker(
        lambda: ran.append(threading.current_thread() is threading.main_thread())
    )
    assert wait_for(lambda: bool(ran), timeout=10)
    assert [True] == ran
    assert handlers == {s: signal.getsignal(s) for s in handlers}


def test_a_call_that_fails_is_logged_and_the_main_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> None:
        raise ValueError("broken call")

    with caplog.at_level(logging.ERROR, logger="agent.platform.termination"):
        assert _ask_from_a_worker(broken)
        assert wait_for(lambda: "main_thread_call_failed" in caplog.text, timeout=10)
    assert "broken call" in caplog.text
