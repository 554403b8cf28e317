"""The small thread-safe signal class."""

from __future__ import annotations

import threading

from agent.signals import Signal


def test_emit_calls_slots_in_connection_order() -> None:
    """Slots receive the emitted arguments in the order they were connected."""
    sig: Signal[str, int] = Signal("progress")
    seen: list[tuple[str, str, int]] = []
    sig.connect(lambda m, p: seen.append(("a", m, p)))
    sig.connect(lambda m, p: seen.append(("b", m, p)))
    sig.emit("Downloading", 50)
    assert [("a", "Downloading", 50), ("b", "Downloading", 50)] == seen


def test_disconnect_stops_delivery() -> None:
    """A disconnected slot is not called again."""
    sig: Signal[int] = Signal("state_changed")
    seen: list[int] = []
    sig.connect(seen.append)
    sig.emit(1)
    sig.disconnect(seen.append)
    sig.emit(2)
    assert [1] == seen


def test_failing_slot_does_not_stop_the_others() -> None:
    """An exception in one slot is logged; later slots still run."""
    sig: Signal[int] = Signal("state_changed")
    seen: list[int] = []

    def broken(_value: int) -> None:
        raise ValueError("slot bug")

    sig.connect(broken)
    sig.connect(seen.append)
    sig.emit(4)
    assert [4] == seen


def test_emit_from_many_threads_delivers_every_value() -> None:
    """Concurrent emits all arrive."""
    sig: Signal[int] = Signal("progress")
    seen: list[int] = []
    lock = threading.Lock()

    def slot(value: int) -> None:
        with lock:
            seen.append(value)

    sig.connect(slot)
    threads = [threading.Thread(target=sig.emit, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert list(range(50)) == sorted(seen)
