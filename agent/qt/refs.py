"""PySide6 6.12.0's reference bug, repaired: every Qt call of ``agent.qt`` that returns
``True`` or ``None`` without a reference of its own goes through ``_emit``,
``_disconnect`` or ``_void``, which give the lost reference back when the binding is
measured (once, at import) to drop it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Signal


class _Probe(QObject):
    ping = Signal()


def _incref(obj: object) -> None:
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _drops(call: Callable[[], object], obj: object) -> bool:
    """True if ``call()`` lowers ``obj``'s reference count by one (a binding's bug).

    PySide6 6.12.0 returns ``True`` from ``SignalInstance.emit`` and ``None`` from every
    void method without a reference of their own (6.11.3 does not): each call from
    Python lowers the count, and a long-running host ends in "deallocating True".
    Measured once, one call at a time; another thread may move the count meanwhile,
    so six of the eight must agree. What the probe itself took is given back.
    """
    dropped = 0
    for _ in range(8):
        before = sys.getrefcount(obj)
        call()
        dropped += before - sys.getrefcount(obj) == 1
    if dropped < 6:
        return False
    for _ in range(dropped):
        _incref(obj)
    return True


def _probe_binding() -> tuple[bool, bool]:
    probe = _Probe()
    return _drops(probe.ping.emit, True), _drops(lambda: probe.setObjectName("probe"), None)


_DROPS_TRUE, _DROPS_NONE = _probe_binding()


def _emit(signal: Any, *args: object) -> None:
    """``signal.emit(*args)``; every Qt signal this module emits goes through here."""
    result = signal.emit(*args)
    if _DROPS_TRUE and result is True:
        _incref(result)


def _disconnect(signal: Any, slot: Callable[..., object]) -> None:
    """``signal.disconnect(slot)`` (6.12.0's returns ``True`` without a reference, too)."""
    result = signal.disconnect(slot)
    if _DROPS_TRUE and result is True:
        _incref(result)


def _void(method: Callable[..., object], *args: object) -> None:
    """Call a void Qt method; every one this module calls repeatedly goes through here."""
    result = method(*args)
    if _DROPS_NONE and result is None:
        _incref(result)
