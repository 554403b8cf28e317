"""A tiny thread-safe signal, shaped like Qt's so a Qt app can forward it.

``session.state_changed.connect(qt_signal.emit)`` is all a Qt host needs.
A slot that raises is logged and does not stop the others or the session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVarTuple, Unpack

from agent.log import get_logger

__all__ = ["Signal"]

Ts = TypeVarTuple("Ts")
_log = get_logger("agent.signals")


class Signal(Generic[*Ts]):
    """Connect callables, emit arguments to all of them in connection order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._slots: list[Callable[[Unpack[Ts]], object]] = []
        self._lock = threading.Lock()

    def connect(self, slot: Callable[[Unpack[Ts]], object]) -> None:
        """Call ``slot`` on every emit (connecting twice calls it twice, as Qt does)."""
        with self._lock:
            self._slots.append(slot)

    def disconnect(self, slot: Callable[[Unpack[Ts]], object]) -> None:
        """Stop calling ``slot``; unknown slots are ignored."""
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)

    def emit(self, *args: *Ts) -> None:
        """Call every connected slot with ``args`` (outside the internal lock)."""
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            try:
                slot(*args)
            except Exception:  # noqa: BLE001 - a faulty slot must not break the session
                _log.exception("signal_slot_failed", signal=self.name)
