"""Host applications for the crash-hook tests, run as child processes (issue 10).

``python -m tests.hosts MODE``: the configuration comes from the environment
(``AGENT_*``), exactly as a host that calls only the seed's API would get it.
Each mode prints one JSON line ``{"ready": <work path>}`` once the session is
ACTIVE, then idles the way its kind of host does; the test sends it a signal.

Modes:

* ``qt-seed``: a QApplication idling in ``exec()`` with no Python timer; the
  session made and opened on the GUI thread with only the seed's calls.
* ``qt-worker-open``: the same, but ``open()`` runs on a worker thread.
* ``qt-adapter``: ``agent.qt.SessionAdapter`` (open on its worker; the crash
  handling on the GUI thread's ``QSocketNotifier``); prints ``about-to-quit``.
* ``qt-own-handler``: the host's own wake-up fd + ``QSocketNotifier`` and its own
  SIGTERM handler (``app.quit()``); prints ``host-handler`` and ``about-to-quit``.
* ``plain-idle``: a plain Python host blocked in ``Event.wait()``.
* ``plain-exit``: a plain Python host that returns from main without closing
  when a line arrives on stdin (the exit hook saves).
* ``plain-close-fails``: a plain Python host that, when a line arrives on stdin, calls
  ``close()`` (the test has made the store unreachable: it fails), prints
  ``{"close_failed": <error class>}`` and returns from main (the exit hook saves).
  ``plain-close-fails-unhooked``: the same with ``crash_hooks=False`` (no save at exit).
* ``plain-wake-race``: a close on a worker asks the main thread to restore the
  handlers, and a second session opens before the main thread runs Python.
* ``plain-cycles``: 20 x (open on the main thread, close on a worker); prints
  whether the host's handler came back each time and whether sessions were collected.
* ``plain-replaced-close``: the host has a wake-up fd of its own; after open it sets its
  own handler for every signal the hooks set, then closes on a worker; prints whether
  the relay thread ended once the main thread ran Python again, the threads, whether
  the wake-up fd is the host's again, then raises SIGTERM itself: its handler prints
  ``host-handler`` (only then) and the signal's byte reaches its wake-up fd.
* ``signal-state``: prints the handler of each termination signal as it started
  (``default_int_handler``, ``SIG_DFL`` or ``SIG_IGN``), and exits.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import socket
import sys
import threading
import weakref
from pathlib import Path
from types import FrameType

from agent.errors import AgentError
from agent.session import PlantDesignSession
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"


def _say(**data: object) -> None:
    """One JSON line on stdout, written with one system call: a signal handler may call
    this while the main thread is inside it (print's buffer would raise "reentrant
    call", and the host's handler would never reach ``app.quit()``)."""
    os.write(1, (json.dumps(data) + "\n").encode())


def _qt_host(mode: str) -> int:
    from PySide6.QtCore import QSocketNotifier, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    keep: list[object] = []
    if mode == "qt-own-handler":
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        signal.set_wakeup_fd(wsock.fileno())
        notifier = QSocketNotifier(rsock.fileno(), QSocketNotifier.Type.Read)
        notifier.activated.connect(lambda *_: rsock.recv(64))
        keep += [rsock, wsock, notifier]

        def host_handler(_signum: int, _frame: FrameType | None) -> None:
            _say(event="host-handler")
            app.quit()

        signal.signal(signal.SIGTERM, host_handler)
        app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
    if mode == "qt-adapter":
        from agent.qt import SessionAdapter

        adapter = SessionAdapter()
        adapter.finished.connect(lambda name, path: _say(ready=str(path)))
        adapter.failed.connect(lambda name, exc: _say(failed=str(exc)))
        app.aboutToQuit.connect(lambda: _say(event="about-to-quit"))
        adapter.open(P, "admin", STAGE)
        app.exec()
        _say(event="exited")
        return 0
    session = PlantDesignSession()
    if mode == "qt-worker-open":
        opened: list[Path] = []
        worker = threading.Thread(target=lambda: opened.append(session.open(P, "admin", STAGE)))
        worker.start()
        worker.join()
        work = opened[0]
    else:
        work = session.open(P, "admin", STAGE)
    # "ready" once the event loop runs: a quit() before exec() would be lost.
    QTimer.singleShot(0, lambda: _say(ready=str(work)))
    app.exec()
    _say(event="exited")
    return 0


def _plain_cycles() -> int:
    def host(_signum: int, _frame: FrameType | None) -> None:
        """The host's own SIGTERM handler."""

    signal.signal(signal.SIGTERM, host)
    restored, refs = [], []
    for _ in range(20):
        session = PlantDesignSession()
        session.open(P, "admin", STAGE, watch=False)
        installed = signal.getsignal(signal.SIGTERM) is not host
        closer = threading.Thread(target=session.close)
        closer.start()
        closer.join()
        refs.append(weakref.ref(session))
        del session
        back = wait_for(lambda: signal.getsignal(signal.SIGTERM) is host, timeout=5)
        restored.append(installed and back)
    gc.collect()
    # A handler the host sets while a session is open is left alone by close.
    session = PlantDesignSession()
    session.open(P, "admin", STAGE, watch=False)

    def later(_signum: int, _frame: FrameType | None) -> None:
        """Set by the host after the session's hooks."""

    signal.signal(signal.SIGTERM, later)
    closer = threading.Thread(target=session.close)
    closer.start()
    closer.join()
    del session
    gc.collect()
    _say(
        restored=restored,
        collected=sum(r() is None for r in refs),
        later_kept=signal.getsignal(signal.SIGTERM) is later,
        threads=sorted(t.name for t in threading.enumerate()),
    )
    return 0


def _replaced_close() -> int:
    """The host replaces every handler the hooks set; the last close runs on a worker."""
    host_reader, host_writer = socket.socketpair()
    host_writer.setblocking(False)
    signal.set_wakeup_fd(host_writer.fileno())
    ignored = [n for n in ("SIGINT", "SIGHUP") if _handler(n) == signal.SIG_IGN]
    session = PlantDesignSession()
    session.open(P, "admin", STAGE, watch=False)
    hooked = [n for n in ("SIGTERM", "SIGINT", "SIGHUP") if callable(_handler(n))]

    def host(signum: int, _frame: FrameType | None) -> None:
        _say(event="host-handler", signal=signum)

    for name in hooked:
        signal.signal(getattr(signal, name), host)
    closer = threading.Thread(target=session.close)
    closer.start()
    closer.join()
    del session
    gc.collect()
    # From here the main thread runs Python: the hooks come down now.
    ended = wait_for(
        lambda: all(t.name != "pdagent-crash-relay" for t in threading.enumerate()), timeout=10
    )
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    _say(
        ignored=ignored,
        hooked=hooked,
        relay_ended=ended,
        threads=sorted(t.name for t in threading.enumerate()),
        wakeup_is_hosts=wakeup == host_writer.fileno(),
        handlers_kept=all(_handler(n) is host for n in hooked),
    )
    signal.raise_signal(signal.SIGTERM)  # the host's handler runs on the way back
    host_reader.settimeout(10)
    _say(host_wakeup=list(host_reader.recv(64)))
    return 0


def _handler(name: str) -> object:
    return signal.getsignal(getattr(signal, name))


def _signal_state() -> int:
    def name(handler: object) -> str:
        if handler is signal.default_int_handler:
            return "default_int_handler"
        if handler == signal.SIG_DFL:
            return "SIG_DFL"
        return "SIG_IGN" if handler == signal.SIG_IGN else repr(handler)

    _say(**{n: name(_handler(n)) for n in ("SIGINT", "SIGHUP", "SIGTERM")})
    return 0


def _wake_race() -> int:
    """Close on a worker asks the main thread to restore; a new open comes first."""
    first = PlantDesignSession()
    first.open(P, "admin", STAGE, watch=False)
    made: list[PlantDesignSession] = []

    def worker() -> None:
        first.close()  # the last session, off the main thread: main is asked to restore ...
        made.append(PlantDesignSession())
        made[0].open(P, "admin", STAGE, watch=False)  # ... but a new session is ACTIVE

    closer = threading.Thread(target=worker)
    closer.start()
    closer.join()  # the main thread runs Python only now: the request is handled here
    gc.collect()
    second = made[0]
    state = str(second.state)
    second.close()
    _say(state_after_request=state)
    return 0


def main(mode: str) -> int:
    """Run one host."""
    # A test that finds this host hung asks for every thread's stack (Host._diagnose).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    if mode.startswith("qt-"):
        return _qt_host(mode)
    if mode == "plain-cycles":
        return _plain_cycles()
    if mode == "plain-wake-race":
        return _wake_race()
    if mode == "plain-replaced-close":
        return _replaced_close()
    if mode == "signal-state":
        return _signal_state()
    hooked = mode != "plain-close-fails-unhooked"
    session = PlantDesignSession(crash_hooks=hooked)
    work = session.open(P, "admin", STAGE, crash_hooks=hooked)
    _say(ready=str(work))
    if mode == "plain-exit":
        sys.stdin.readline()
        return 0
    if mode.startswith("plain-close-fails"):
        sys.stdin.readline()
        try:
            session.close()
        except AgentError as exc:
            _say(close_failed=type(exc).__name__)
        return 0
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
