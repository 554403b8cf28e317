"""The session layer: ``PlantDesignSession`` (``facade``), one module per verb, records, recovery.

Verbs: ``checkout`` (open), ``checkin`` (close and the commit; ``closing`` holds its
flush and the look at the folder after the commit), ``runtime`` (streaming, heartbeat,
flush, status), ``resume`` (crash recovery and merge), ``discard`` (abort, discard),
``crash`` (the emergency save), ``versions`` (history, show, restore, prune). ``reports``
is what the verbs hand back (``CloseReport``). ``records`` and ``recovery`` are the
session's files on this machine.

The facade is imported on first use, so ``agent status`` (which reads ``records``)
does not import watchdog or the store.

May import: ``agent.stage``, ``agent.folder``, ``agent.store`` and the foundations.
Never a front door (``agent.cli``, ``agent.agentd``, ``agent.qt``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.session.facade import CloseReport, PlantDesignSession

__all__ = ["CloseReport", "PlantDesignSession"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agent.session import facade

        return getattr(facade, name)
    raise AttributeError(f"module 'agent.session' has no attribute {name!r}")
