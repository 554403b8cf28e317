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
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import shiboken6
from PySide6.QtCore import (
    QCoreApplication,
    QObject,
    QRunnable,
    QSocketNotifier,
    QThreadPool,
    QTimer,
    Signal,
)
from PySide6.QtGui import QCloseEvent, QShortcut
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressDialog,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from agent.config import AgentConfig
from agent.errors import SessionCancelledError
from agent.log import get_logger
from agent.session import PlantDesignSession, crash
from agent.session.recovery import RecoveryInfo
from agent.state import SessionState

log = get_logger(__name__)

__all__ = [
    "ProgressDialog",
    "RecoveryDialog",
    "SessionAdapter",
    "install_crash_handling",
    "offer_recovery",
]


_CANCELLABLE = (
    SessionState.IDLE,
    SessionState.ACQUIRING,
    SessionState.DOWNLOADING,
    SessionState.RESTORING,
)
# Why Cancel does not apply, by the verb that runs (shown by ``ProgressDialog``).
_NOT_CANCELLABLE = {
    "close": "committing: cannot be cancelled",
    "abort": "aborting: cannot be cancelled",
    "discard": "discarding: cannot be cancelled",
    "open": "finishing: cannot be cancelled",
    "resume": "finishing: cannot be cancelled",
}


# How often the GUI thread checks that the wake-up fd is still the crash hooks'.
_RECLAIM_EVERY_MS = 1000


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


class _Relay(QObject):
    """Carries results from a worker to the GUI thread (lives on the GUI thread)."""

    done = Signal(str, object)
    failed = Signal(str, object)


class _Job(QRunnable):
    def __init__(
        self, name: str, fn: Callable[[], object], relay: _Relay, ended: threading.Event
    ) -> None:
        super().__init__()
        self.name, self.fn, self.relay, self.ended = name, fn, relay, ended
        _void(self.setAutoDelete, True)

    def run(self) -> None:
        try:
            try:
                result = self.fn()
            except Exception as exc:  # noqa: BLE001 - every failure goes to the GUI as a signal
                self._report(self.relay.failed, exc)
                return
            self._report(self.relay.done, result)
        finally:
            self.ended.set()

    def _report(self, signal: Any, value: object) -> None:
        # The relay is the adapter's, kept alive by this job: it is never deleted under
        # a worker (the adapter may be, with its window, at exit: its slots then drop).
        if shiboken6.isValid(self.relay):
            _emit(signal, self.name, value)


class _CrashNotifier(QObject):
    """Reads the crash hooks' wake-up socket on the GUI thread, and takes the wake-up fd
    back (chaining to the host's) when the host set its own after ours."""

    def __init__(self, app: QCoreApplication) -> None:
        super().__init__(app)
        self._notifier: QSocketNotifier | None = None
        crash.hooks().use_event_loop(self._watch, self._terminate)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._reclaim)
        _void(self._timer.start, _RECLAIM_EVERY_MS)

    @staticmethod
    def _reclaim() -> None:
        crash.hooks().reclaim_wakeup_fd()

    def _watch(self, fd: int | None) -> None:
        old, self._notifier = self._notifier, None
        if old is not None and shiboken6.isValid(old):  # gone already at interpreter exit
            _void(old.setEnabled, False)
            _void(old.deleteLater)
        if fd is not None:
            self._notifier = QSocketNotifier(fd, QSocketNotifier.Type.Read, self)
            self._notifier.activated.connect(self._ready)

    def _ready(self, *_args: object) -> None:
        # Running this slot runs Python on the GUI thread: the pending signal handler
        # (the bounded save, then the chain) runs right here.
        crash.hooks().drain()

    @staticmethod
    def _terminate(_signum: int) -> None:
        _void(QCoreApplication.quit)

    def stop(self) -> None:
        """Give the socket back to the crash hooks' relay thread."""
        _void(self._timer.stop)
        crash.hooks().leave_event_loop()


_NOTIFIER: _CrashNotifier | None = None


def install_crash_handling(app: QCoreApplication | None = None) -> None:
    """Let the Qt event loop handle termination signals (GUI thread; idempotent)."""
    global _NOTIFIER  # noqa: PLW0603 - one notifier per process, like the hooks
    app = app or QCoreApplication.instance()
    if app is None:
        raise RuntimeError("create the QApplication before the session adapter")
    if _NOTIFIER is None:
        _NOTIFIER = _CrashNotifier(app)


def uninstall_crash_handling() -> None:
    """The relay thread reads the wake-up socket again (GUI thread)."""
    global _NOTIFIER  # noqa: PLW0603
    if _NOTIFIER is not None:
        _NOTIFIER.stop()
        _NOTIFIER.deleteLater()
        _NOTIFIER = None


class SessionAdapter(QObject):
    """A ``PlantDesignSession`` for a Qt GUI: non-blocking verbs, Qt signals.

    Signals (delivered on the GUI thread):

    * ``stateChanged(int)``: a ``SessionState`` value, on every transition.
    * ``progress(str, int)``: message and percent, monotonic per operation.
    * ``error(str)``: a message for the user (a failed verb, lock lost while ACTIVE).
    * ``finished(str, object)``: a verb finished: ``("open", Path)``, ``("resume", Path)``,
      ``("close", CloseReport)``, ``("abort", None)``, ``("discard", None)``.
    * ``failed(str, object)``: a verb failed with this exception
      (``SessionCancelledError`` after ``cancel()``).
    * ``verbStarted(str)``: a verb started (``"open"``, ``"close"`` ...), emitted on the
      GUI thread by the verb's call itself.

    One verb at a time per session; a closed session is replaced by a new one on the
    next ``open``/``resume``/``discard``. Create the adapter on the GUI thread.
    """

    stateChanged = Signal(int)  # noqa: N815 - Qt's naming
    progress = Signal(str, int)
    error = Signal(str)
    finished = Signal(str, object)
    failed = Signal(str, object)
    verbStarted = Signal(str)  # noqa: N815
    _emitState = Signal(int)  # noqa: N815
    _emitProgress = Signal(str, int)  # noqa: N815
    _emitError = Signal(str)  # noqa: N815

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        parent: QObject | None = None,
        pool: QThreadPool | None = None,
        crash_handling: bool = True,
        session_factory: Callable[[], PlantDesignSession] | None = None,
    ) -> None:
        super().__init__(parent)
        self._factory = session_factory or (lambda: PlantDesignSession(config))
        self.pool = pool or QThreadPool.globalInstance()
        # No parent: a worker's job holds it, so it outlives an adapter deleted at exit.
        self._relay = _Relay()
        self._ended = threading.Event()  # the running verb's job has returned
        self._ended.set()
        self._forwards: list[tuple[Any, Callable[..., None]]] = []
        self._relay.done.connect(self._on_done)
        self._relay.failed.connect(self._on_failed)
        # Session signals come from worker threads: re-emit through our own signals so
        # that Qt queues them to the GUI thread.
        self._emitState.connect(self.stateChanged)
        self._emitProgress.connect(self.progress)
        self._emitError.connect(self.error)
        self.busy = False
        self.verb: str | None = None  # the verb running now
        if _DROPS_TRUE or _DROPS_NONE:
            log.warning(
                "qt_binding_drops_references",
                pyside6=shiboken6.__version__,
                hint="this PySide6 loses a reference to True/None on every signal emit or "
                "void call made from Python; the adapter makes up for its own calls, but "
                "the host's add up until the interpreter aborts: use another version",
            )
        if crash_handling:
            install_crash_handling()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._before_quit)
        self.session = self._new_session()

    def _new_session(self) -> PlantDesignSession:
        session = self._factory()
        self._unforward()
        self._forwards = [
            (session.state_changed, lambda state: self._forward(self._emitState, state)),
            (session.progress, lambda msg, pct: self._forward(self._emitProgress, msg, pct)),
            (session.error, lambda message: self._forward(self._emitError, message)),
        ]
        for signal, slot in self._forwards:
            signal.connect(slot)
        return session

    def _forward(self, signal: Any, *args: object) -> None:
        """A session signal (on a worker) re-emitted as ours, unless we are gone already."""
        if shiboken6.isValid(self):
            _emit(signal, *args)

    def _unforward(self) -> None:
        for signal, slot in self._forwards:
            signal.disconnect(slot)
        self._forwards = []

    def _before_quit(self) -> None:
        """``aboutToQuit``: a verb that runs is finished (an open/resume cancelled) before
        ``exec()`` returns and the interpreter shuts down around it; then the session's
        signals are cut from ours, so nothing is emitted into an adapter deleted at exit.
        """
        if not self._ended.is_set():
            verb = self.verb
            cancelled = self.cancel()
            log.warning(
                "qt_quit_waits_for_verb",
                verb=verb,
                cancelled=cancelled,
                hint="the application quits while a verb runs: it ends first",
            )
            self._ended.wait()
            # Deliver what the verb reported (finished/failed, last progress) now: the
            # event loop will not run again.
            _void(QCoreApplication.sendPostedEvents, self, 0)
        self._unforward()

    def _fresh(self) -> PlantDesignSession:
        if self.session.state is not SessionState.IDLE:
            self.session = self._new_session()
        return self.session

    @property
    def state(self) -> SessionState:
        """The current session's state."""
        return self.session.state

    def _start(self, name: str, fn: Callable[[], object]) -> None:
        if self.busy and name != "cancel":
            raise RuntimeError(f"cannot {name} now: another operation is running")
        if _NOTIFIER is not None:
            crash.hooks().reclaim_wakeup_fd()  # a host's wake-up fd set since: chained
        ended = threading.Event()
        if name != "cancel":
            self.busy = True
            self.verb = name
            self._ended = ended
        _void(self.pool.start, _Job(name, fn, self._relay, ended))
        if name != "cancel":
            _emit(self.verbStarted, name)

    # -- the verbs (non-blocking) ------------------------------------------------------

    def open(self, projekt_id: str, user: str, stage: str, **options: Any) -> None:
        """Start ``open`` on a worker; ``finished("open", path)`` or ``failed``."""
        session = self._fresh()
        self._start("open", lambda: session.open(projekt_id, user, stage, **options))

    def resume(self, session_id: str | None = None, **options: Any) -> None:
        """Start ``resume`` on a worker; ``finished("resume", path)`` or ``failed``."""
        session = self._fresh()
        self._start("resume", lambda: session.resume(session_id, **options))

    def close(self, **options: Any) -> None:
        """Start ``close`` on a worker; ``finished("close", CloseReport)`` or ``failed``."""
        session = self.session
        self._start("close", lambda: session.close(**options))

    def abort(self) -> None:
        """Start ``abort`` on a worker; ``finished("abort", None)`` or ``failed``."""
        session = self.session
        self._start("abort", session.abort)

    def discard(
        self, session_id: str | None = None, *, confirm_loss: Iterable[str] | bool = ()
    ) -> None:
        """Start ``discard`` of an orphan on a worker (see ``PlantDesignSession.discard``)."""
        session = self._fresh()
        loss = confirm_loss if isinstance(confirm_loss, bool) else list(confirm_loss)
        self._start("discard", lambda: session.discard(session_id, confirm_loss=loss))

    def cancel(self) -> bool:
        """Cancel a running ``open``/``resume``: it fails with ``SessionCancelledError``.

        Nothing is left behind (the lock released, partial folder and record removed).
        Returns at once (the abort waits for the transfer to stop on a worker): True if
        the cancel was started, False if nothing cancellable runs (``cancel_refusal``
        says why: a close that commits, for one, always runs to its end).
        """
        session = self.session
        if not self.can_cancel():
            return False
        self._start("cancel", session.abort)
        return True

    def can_cancel(self) -> bool:
        """True while an ``open``/``resume`` runs that ``cancel()`` can still stop."""
        return self.busy and self.verb in ("open", "resume") and self.session.state in _CANCELLABLE

    def cancel_refusal(self) -> str | None:
        """Why Cancel does not apply now (e.g. ``"committing: cannot be cancelled"``);
        None when it does, or when no verb runs."""
        if not self.busy or self.verb is None or self.can_cancel():
            return None
        return _NOT_CANCELLABLE.get(self.verb, "cannot be cancelled")

    def check_previous_crash(self) -> RecoveryInfo | None:
        """An orphaned session on this machine, for the recovery dialog (local files only)."""
        return self._factory().check_previous_crash()

    # -- results, on the GUI thread ----------------------------------------------------

    def _on_done(self, name: str, result: object) -> None:
        if name != "cancel":
            self.busy, self.verb = False, None
        self._tidy()
        if name != "cancel":
            _emit(self.finished, name, result)

    def _on_failed(self, name: str, exc: object) -> None:
        if name != "cancel":
            self.busy, self.verb = False, None
        self._tidy()
        if name == "cancel":
            return  # the open/resume itself reports the cancellation
        _emit(self.error, str(exc))
        _emit(self.failed, name, exc)

    @staticmethod
    def _tidy() -> None:
        # A verb that ended a session on a worker could not restore signal handlers
        # there; the GUI thread can, now.
        crash.hooks().release_if_unused()


class RecoveryDialog(QDialog):
    """What an interrupted session left, and the choice: Resume, Discard or Later.

    ``choice`` is ``"resume"``, ``"discard"`` (the user confirmed the listed losses)
    or ``"later"``.
    """

    def __init__(self, info: RecoveryInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.info = info
        self.choice = "later"
        self.setWindowTitle("Unfinished editing session")
        layout = QVBoxLayout(self)
        how = (
            "The program ended while this session was open; its work was saved."
            if info.kind == "handled"
            else "The program ended without saving this session (killed or power loss); "
            "the working folder is still on disk."
        )
        layout.addWidget(
            QLabel(
                f"<b>{info.projekt_id}</b> / {info.stage} (user {info.user}), "
                f"{info.crashed_at:%Y-%m-%d %H:%M} UTC<br>{how}"
            )
        )
        layout.addWidget(QLabel(f"Backup of the files: {info.backup_path or 'none'}"))
        unsaved = info.unsaved
        layout.addWidget(
            QLabel(
                f"{len(unsaved)} change(s) are not in the store yet:"
                if unsaved
                else "Every change is in the store."
            )
        )
        self.files = QListWidget(self)
        for rel in unsaved:
            self.files.addItem(f"{rel}  ({change_state(info, rel)})")
        layout.addWidget(self.files)
        buttons = QDialogButtonBox(self)
        self.resume_button = QPushButton("Resume", self)
        self.discard_button = QPushButton("Discard…", self)
        self.later_button = QPushButton("Later", self)
        buttons.addButton(self.resume_button, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(self.discard_button, QDialogButtonBox.ButtonRole.DestructiveRole)
        buttons.addButton(self.later_button, QDialogButtonBox.ButtonRole.RejectRole)
        self.resume_button.clicked.connect(self._resume)
        self.discard_button.clicked.connect(self._discard)
        self.later_button.clicked.connect(self.reject)
        layout.addWidget(buttons)

    def _resume(self) -> None:
        self.choice = "resume"
        self.accept()

    def _discard(self) -> None:
        if self.confirm_discard():
            self.choice = "discard"
            self.accept()

    def confirm_discard(self) -> bool:
        """Ask before losing changes (none to lose: no question)."""
        unsaved = self.info.unsaved
        if not unsaved:
            return True
        shown = "\n".join(unsaved[:20]) + ("\n…" if len(unsaved) > 20 else "")
        answer = QMessageBox.warning(
            self,
            "Discard changes",
            f"These {len(unsaved)} change(s) will be lost for good:\n\n{shown}",
            QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Discard


def change_state(info: RecoveryInfo, rel: str) -> str:
    """How the recovery dialog names an unsaved change: ``"deleted, not committed"``
    (in neither the backup nor the working folder), ``"only here"`` (the store has no
    copy) or ``"uploaded, not committed"`` (in this session's staging only)."""
    if rel in info.deleted:
        return "deleted, not committed"
    parts = rel.split("/")
    folders = [p for p in (info.backup_path, info.work_path) if p is not None]
    if not any(os.path.lexists(folder.joinpath(*parts)) for folder in folders):
        return "deleted, not committed"
    return "only here" if rel in info.pending else "uploaded, not committed"


def offer_recovery(adapter: SessionAdapter, parent: QWidget | None = None) -> str | None:
    """At start-up: show the recovery dialog if a session was left, and act on the choice.

    Returns the choice (``None`` when there was nothing to recover). Resume and discard
    run on a worker (``adapter.finished`` / ``adapter.failed`` report them).
    """
    info = adapter.check_previous_crash()
    if info is None:
        return None
    dialog = RecoveryDialog(info, parent)
    dialog.exec()
    if dialog.choice == "resume":
        adapter.resume(info.session_id)
    elif dialog.choice == "discard":
        adapter.discard(info.session_id, confirm_loss=info.unsaved)
    return dialog.choice


class ProgressDialog(QProgressDialog):
    """Shows an adapter's progress; its Cancel button cancels the open/resume.

    While Cancel cannot apply (a close that commits, an abort, the end of an open),
    the button and Escape are disabled, the label says why (``cancel_refusal``) and
    closing the dialog is refused: it never hides while its verb goes on. Closes
    itself when the verb finishes or fails.
    """

    def __init__(self, adapter: SessionAdapter, title: str, parent: QWidget | None = None) -> None:
        super().__init__(title, "Cancel", 0, 100, parent)
        self.adapter = adapter
        self._message = title
        self._ended = False
        _void(self.setWindowTitle, title)
        _void(self.setMinimumDuration, 0)
        _void(self.setAutoClose, False)
        _void(self.setAutoReset, False)
        _void(self.setValue, 0)
        self._connections: list[tuple[Any, Callable[..., object]]] = [
            (adapter.progress, self._on_progress),
            (adapter.stateChanged, self._refresh),
            (adapter.verbStarted, self._refresh),
            (adapter.finished, self._done),
            (adapter.failed, self._done),
            (self.canceled, adapter.cancel),  # closing emits canceled: not for the next verb
        ]
        for signal, slot in self._connections:
            signal.connect(slot)
        self._refresh()

    def _on_progress(self, message: str, percent: int) -> None:
        self._message = message
        _void(self.setValue, percent)
        self._refresh()

    def _refresh(self, *_args: object) -> None:
        reason = self.adapter.cancel_refusal()
        button = self.findChild(QPushButton)
        if button is not None:
            _void(button.setEnabled, reason is None)
        for shortcut in self.findChildren(QShortcut):  # Escape emits canceled
            _void(shortcut.setEnabled, reason is None)
        label = self._message if reason is None else f"{self._message}\n({reason})"
        if label != self.labelText():
            _void(self.setLabelText, label)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        """Refused while the verb runs and cannot be cancelled (it would only hide)."""
        if not self._ended and self.adapter.cancel_refusal() is not None:
            event.ignore()
            return
        super().closeEvent(event)

    def reject(self) -> None:
        """Escape: refused like ``closeEvent``."""
        if not self._ended and self.adapter.cancel_refusal() is not None:
            return
        super().reject()

    def _done(self, *_args: object) -> None:
        self._ended = True
        for signal, slot in self._connections:
            _disconnect(signal, slot)
        self.close()


def is_cancelled(exc: object) -> bool:
    """True if a ``failed`` signal's exception is a cancellation (not an error to show)."""
    return isinstance(exc, SessionCancelledError)
