"""The Qt (PySide6) adapter: a ``QObject`` with Qt signals, workers off the GUI thread,
crash handling for an event loop, and two ready dialogs (``pip install pd-session-agent[qt]``).

::

    app = QApplication(sys.argv)
    adapter = SessionAdapter(config)          # on the GUI thread
    adapter.stateChanged.connect(...)         # all signals arrive on the GUI thread
    adapter.finished.connect(on_finished)     # ("open", Path) ... ("close", CloseReport)
    adapter.failed.connect(on_failed)         # ("open", SessionCancelledError(...)) ...
    offer_recovery(adapter, window)           # at start-up: the recovery dialog if needed
    adapter.open("Kraftwerk_1234567", "admin", "planning")   # returns at once

Threading rules: every verb (``open``, ``close``, ``abort``, ``resume``, ``discard``)
runs on a ``QThreadPool`` worker and returns at once; ``cancel()`` stops an open or
resume that is running. The session's own signals are emitted on worker threads;
the adapter re-emits them as Qt signals, which Qt delivers to GUI-thread receivers
as queued calls. ``check_previous_crash()`` only reads local files and runs on the
calling thread.

Crash handling: the adapter makes the wake-up socket of ``agent.session.crash`` be
read by a ``QSocketNotifier`` on the GUI thread. A SIGTERM/SIGINT/SIGHUP then wakes
the event loop, the emergency save runs on the GUI thread (bounded by
``recovery.crash_timeout``), and then the host's previous handler runs, or
``QApplication.quit()`` where the default action would have ended the process:
``aboutToQuit`` runs, and no ``SystemExit`` is ever raised inside a slot.

The wake-up fd: while a session is protected, the interpreter's wake-up fd
(``signal.set_wakeup_fd``) is the crash hooks' socket. A host may set its own,
before or after the adapter: the GUI thread takes the wake-up fd back within a
second (and at every verb, and when the signal's Python handler runs) and
chains to the host's, which gets each signal's byte (the signal number, as
Python writes it) forwarded once the hooks read it, and is put back when the
last session ends. A handler the host sets for a signal after the adapter's
session replaces ours: the notifier's read then runs the save, and the host's
handler does the rest (quitting, or not).

Quitting: at ``aboutToQuit`` a verb that runs is finished first (an open or
resume is cancelled; a close commits), so the interpreter never shuts down
under it; its ``finished``/``failed`` is delivered then.

Modules: ``adapter`` (``SessionAdapter``, its workers, the crash notifier), ``dialogs``
(``RecoveryDialog``, ``ProgressDialog``, ``offer_recovery``), ``refs`` (the PySide6
6.12.0 reference repair every Qt call of the adapter goes through).
"""

from __future__ import annotations

from agent.qt.adapter import SessionAdapter, install_crash_handling
from agent.qt.adapter import uninstall_crash_handling as uninstall_crash_handling
from agent.qt.dialogs import ProgressDialog, RecoveryDialog, offer_recovery
from agent.qt.dialogs import change_state as change_state
from agent.qt.dialogs import is_cancelled as is_cancelled

__all__ = [
    "ProgressDialog",
    "RecoveryDialog",
    "SessionAdapter",
    "install_crash_handling",
    "offer_recovery",
]
