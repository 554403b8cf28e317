"""``SessionAdapter``: a ``PlantDesignSession`` for a Qt GUI, its workers, and the crash
notifier that lets the event loop read the crash hooks' wake-up socket (see ``agent.qt``).
"""

from __future__ import annotations

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

from agent.config import AgentConfig
from agent.log import get_logger
from agent.qt.refs import _DROPS_NONE, _DROPS_TRUE, _emit, _void
from agent.session import PlantDesignSession, crash
from agent.session.recovery import RecoveryInfo
from agent.state import SessionState

log = get_logger(__name__)

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
