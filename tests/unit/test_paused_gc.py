"""``paused_gc``: the cyclic collector is off inside, back after the last pause ends,
and never switched on when the host had it off."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from agent.platform import paused_gc


@pytest.fixture(autouse=True)
def _gc_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_back_after() -> None:
    gc.enable()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled(), "an inner pause ending switched the collector on"
    assert gc.isenabled()


def test_a_collector_the_host_switched_off_stays_off() -> None:
    gc.disable()
    with paused_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_pauses_on_two_threads_end_with_the_last() -> None:
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_in.wait(10)
        with paused_gc():  # begins inside the first, ends after it
            second_in.set()
            first_out.wait(10)
            seen.append(gc.isenabled())

    worker = threading.Thread(target=second)
    worker.start()
    with paused_gc():
        first_in.set()
        assert second_in.wait(10)
    first_out.set()
    worker.join(10)
    assert [False] == seen, "the first pause's end switched the collector on under the second"
    assert gc.isenabled()


def test_an_exception_inside_still_ends_the_pause() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
