"""Qt hosts of ``agent.qt`` for the adapter's process tests, run as children (issue 20).

``python -m tests.qt_hosts MODE``: the configuration comes from the environment
(``AGENT_*``). Each mode prints JSON lines (``{"ready": <work path>}`` once the
session is ACTIVE where a test acts on it) and exits the way its host would.

Modes:

* ``refcounts``: one warm-up and 40 open/close cycles through the adapter in this
  one process; prints the reference counts of ``True``, ``False``, ``None`` and
  small ints before and after the 40.
* ``wakeup-after``: the host sets its own wake-up fd (read by its own
  ``QSocketNotifier``) *after* the adapter made its session, then opens; idles
  in ``exec()``; at exit prints the bytes its wake-up fd got (``host_bytes``).
* ``handler-after``: the host sets its own SIGTERM handler (which only notes it)
  after the adapter's session; prints ``saved`` when the session is CLOSED.
* ``wakeup-unread``: once open, the host sets a wake-up fd that nothing reads;
  prints ``ready`` once the adapter took the wake-up fd back (or after 20 s).
* ``quit-during-close``: a main window owns the adapter; after open the host
  writes ``EDITS`` and starts close, and while its upload runs (held until the
  window is gone) the user closes the window: the last window closing quits the
  application, and the window (with the adapter) goes when ``exec()`` returns.
* ``own-signals [term-after]``: a host with signal handlers of its own: SIGINT set
  before the adapter and declared its own (``crash.host_handles``): Ctrl-C prints
  ``interrupt`` and quits only when no session is ACTIVE; SIGUSR1 prints the
  session's ``state``; with ``term-after`` a SIGTERM handler set after the adapter
  (it only notes the signal). Reads commands on stdin: ``close`` (prints
  ``closed`` when it finished) and ``quit`` (prints ``quit-asked``, then quits).
  Quitting prints ``about-to-quit``. Also the host started under ``nohup``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from PySide6.QtCore import QSocketNotifier, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QApplication, QMainWindow

from agent.qt import ProgressDialog, SessionAdapter
from agent.session import crash
from agent.state import SessionState

P, STAGE = "Kraftwerk_1234567", "planning"
EDITS = {"plan.dwg": b"edited plan", "sub/notes.txt": b"notes", "new.step": b"new part"}


def _say(**data: object) -> None:
    """One JSON line on stdout in one system call (a signal handler may run meanwhile)."""
    os.write(1, (json.dumps(data) + "\n").encode())


def _counts() -> dict[str, int]:
    gc.collect()
    return {repr(obj): sys.getrefcount(obj) for obj in (True, False, None, 0, 1, 2, 5)}


def _refcounts(app: QApplication) -> int:
    """Driven by the adapter's own signals inside ``exec()``: the host itself makes no Qt
    call per cycle, so what the counts do is the adapter's doing."""
    window = QMainWindow()
    adapter = SessionAdapter(parent=window)
    verbs: list[str] = []
    counts: list[dict[str, int]] = []

    def start(verb: str) -> None:
        # As the example host does: a progress dialog for each verb.
        ProgressDialog(adapter, verb, window).show()
        if verb == "open":
            adapter.open(P, "admin", STAGE, watch=False)
        else:
            adapter.close()

    def next_verb(name: str, _result: object) -> None:
        verbs.append(name)
        if name == "close":
            if len(verbs) == 2:
                counts.append(_counts())  # after the warm-up cycle
            if len(verbs) == 82:
                counts.append(_counts())
                app.quit()
                return
            start("open")
        else:
            start("close")

    def failed(name: str, exc: object) -> None:
        _say(failed=name, error=str(exc))
        app.quit()

    adapter.finished.connect(next_verb)
    adapter.failed.connect(failed)
    adapter.progress.connect(lambda _message, _pct: None)
    adapter.stateChanged.connect(lambda _state: None)
    start("open")
    app.exec()
    _say(before=counts[0] if counts else {}, after=counts[-1] if counts else {}, verbs=verbs)
    return 0


def _wakeup_after(app: QApplication) -> int:
    adapter = SessionAdapter()
    # The host's own wake-up fd, set after the adapter's session installed the hooks.
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    signal.set_wakeup_fd(wsock.fileno())
    seen: list[int] = []
    notifier = QSocketNotifier(rsock.fileno(), QSocketNotifier.Type.Read)
    notifier.activated.connect(lambda *_: seen.extend(rsock.recv(64)))
    adapter.finished.connect(lambda _name, path: _say(ready=str(path)))
    adapter.failed.connect(lambda name, exc: _say(failed=name, error=str(exc)))
    app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    adapter.open(P, "admin", STAGE)
    app.exec()
    _say(event="exited", host_bytes=seen + _unread(rsock))
    return 0


def _unread(sock: socket.socket) -> list[int]:
    sock.setblocking(False)
    try:
        return list(sock.recv(64))
    except BlockingIOError:
        return []


def _handler_after(app: QApplication) -> int:
    """The host sets its own SIGTERM handler after the adapter's session (it only notes
    the signal; a File menu's Quit ends the program later)."""
    adapter = SessionAdapter()

    def host_handler(_signum: int, _frame: FrameType | None) -> None:
        _say(event="host-handler")

    signal.signal(signal.SIGTERM, host_handler)
    adapter.finished.connect(lambda _name, path: _say(ready=str(path)))
    adapter.failed.connect(lambda name, exc: _say(failed=name, error=str(exc)))
    adapter.stateChanged.connect(
        lambda state: _say(event="saved") if state == int(SessionState.CLOSED) else None
    )
    app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    adapter.open(P, "admin", STAGE)
    app.exec()
    return 0


def _wakeup_unread(app: QApplication) -> int:
    """The host sets a wake-up fd nobody reads, once the session is open: only the
    adapter taking the wake-up fd back lets a signal wake the idle event loop."""
    adapter = SessionAdapter()
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    waited = [0]

    def reclaimed() -> bool:
        # The host's look at the wake-up fd (puts back what it found).
        now = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(now)
        return now != wsock.fileno()

    def poll(work: str) -> None:
        waited[0] += 1
        if reclaimed() or waited[0] > 400:
            _say(ready=work, reclaimed=reclaimed())
            return
        QTimer.singleShot(50, lambda: poll(work))

    def opened(_name: str, path: object) -> None:
        signal.set_wakeup_fd(wsock.fileno())
        poll(str(path))

    adapter.finished.connect(opened)
    adapter.failed.connect(lambda name, exc: _say(failed=name, error=str(exc)))
    app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    adapter.open(P, "admin", STAGE)
    app.exec()
    _say(event="exited", host_bytes=_unread(rsock))
    return 0


class _Window(QMainWindow):
    def __init__(self, gone: threading.Event) -> None:
        super().__init__()
        self.gone = gone
        self.adapter = SessionAdapter(parent=self)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        self.gone.set()
        super().closeEvent(event)


def _quit_during_close(app: QApplication) -> int:
    gone = threading.Event()
    window = _Window(gone)
    windows = [window]  # main()'s only reference: dropped when exec() returns
    window.show()
    adapter = window.adapter

    def hold(message: str, _pct: int) -> None:
        # On the close's worker: the upload waits until the user closed the window.
        if message.startswith("Uploading"):
            gone.wait(timeout=30)

    def on_finished(name: str, result: object) -> None:
        _say(finished=name)
        if name == "open":
            assert isinstance(result, Path)
            for rel, data in EDITS.items():  # the user's edits
                (result / rel).parent.mkdir(parents=True, exist_ok=True)
                (result / rel).write_bytes(data)
            adapter.session.progress.connect(hold)
            adapter.stateChanged.connect(on_state)
            adapter.close()

    def on_state(state: int) -> None:
        if state == int(SessionState.UPLOADING):
            QTimer.singleShot(0, windows[0].close)  # the user closes the main window

    adapter.finished.connect(on_finished)
    adapter.failed.connect(lambda name, exc: _say(failed=name, error=str(exc)))
    app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    adapter.open(P, "admin", STAGE, watch=False)
    code = app.exec()
    _say(event="exited")
    windows.clear()
    return code


def _own_signals(app: QApplication, term_after: bool) -> int:
    adapters: list[SessionAdapter] = []

    def on_interrupt(_signum: int, _frame: FrameType | None) -> None:
        active = bool(adapters) and adapters[0].state is SessionState.ACTIVE
        _say(event="interrupt", active=active)
        if not active:
            app.quit()  # Ctrl-C quits, unless the user must close a session first

    def on_usr1(_signum: int, _frame: FrameType | None) -> None:
        _say(state=adapters[0].state.name if adapters else None)

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGUSR1, on_usr1)
    crash.host_handles("SIGINT")
    adapter = SessionAdapter()
    adapters.append(adapter)
    if term_after:
        signal.signal(signal.SIGTERM, lambda _signum, _frame: _say(event="term"))

    def on_finished(name: str, result: object) -> None:
        if name == "open":
            _say(ready=str(result))
        else:
            _say(closed=name)

    def on_command() -> None:
        for command in os.read(0, 4096).decode().split():
            if command == "close":
                adapter.close()
            elif command == "quit":
                _say(event="quit-asked")
                app.quit()

    commands = QSocketNotifier(0, QSocketNotifier.Type.Read)
    commands.activated.connect(lambda *_: on_command())
    adapter.finished.connect(on_finished)
    adapter.failed.connect(lambda name, exc: _say(failed=name, error=str(exc)))
    app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    adapter.open(P, "admin", STAGE)
    app.exec()
    return 0


def main(mode: str, *flags: str) -> int:
    """Run one host."""
    app = QApplication([])
    if mode == "own-signals":
        return _own_signals(app, "term-after" in flags)
    if mode == "refcounts":
        return _refcounts(app)
    if mode == "wakeup-after":
        return _wakeup_after(app)
    if mode == "handler-after":
        return _handler_after(app)
    if mode == "wakeup-unread":
        return _wakeup_unread(app)
    if mode == "quit-during-close":
        return _quit_during_close(app)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
