"""Plain Python hosts whose own signal handling meets the session's (issue 20).

``python -m tests.signal_hosts MODE``: the configuration comes from the environment
(``AGENT_*``). Each mode prints JSON lines (one ``os.write`` each, safe in a handler):
``{"ready": <work path>}`` once the session is ACTIVE, then what it saw.

Modes:

* ``own-sigterm-later``: the host sets its own SIGTERM handler *after* the session
  (which installed the crash hooks). The handler prints ``host-handler`` and does not
  exit; the host then waits until the crash hooks say they left the signal to it
  (their ``crash_signal_left_to_host`` event), prints the session's state, and
  returns from main normally (exit 0) unless something ended it before.
* ``sighup-ignored``: run under ``nohup`` (SIGHUP ignored before the session); the
  host's SIGUSR1 handler prints the session's state (a SIGHUP sent before it has
  been dealt with by then: Python runs pending handlers in signal-number order),
  then a line on stdin makes it close the session and print ``closed``.
* ``exit-unclosed``: logs to stderr (``logging.basicConfig``); a line on stdin makes
  it return from main with the session still ACTIVE (the exit hooks save it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from types import FrameType

from agent.session import PlantDesignSession
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"


def _say(**data: object) -> None:
    os.write(1, (json.dumps(data) + "\n").encode())


class _Events(logging.Handler):
    """The agent's log events, as the host's own stdlib handler sees them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def _own_sigterm_later() -> int:
    events = _Events()
    logging.getLogger("agent").addHandler(events)
    logging.getLogger("agent").setLevel(logging.DEBUG)
    session = PlantDesignSession()
    work = session.open(P, "admin", STAGE)
    handled = threading.Event()

    def host_handler(_signum: int, _frame: FrameType | None) -> None:
        _say(event="host-handler")
        handled.set()

    signal.signal(signal.SIGTERM, host_handler)
    _say(ready=str(work))
    while not handled.wait(0.05):
        pass
    left = wait_for(lambda: any("crash_signal_left_to_host" in m for m in events.seen), timeout=60)
    _say(state=str(session.state), left_to_host=left)
    return 0


def _sighup_ignored() -> int:
    session = PlantDesignSession()
    work = session.open(P, "admin", STAGE)

    def report(_signum: int, _frame: FrameType | None) -> None:
        _say(state=str(session.state))

    signal.signal(signal.SIGUSR1, report)
    _say(ready=str(work), sighup_ignored=signal.getsignal(signal.SIGHUP) == signal.SIG_IGN)
    sys.stdin.readline()
    session.close()
    _say(event="closed")
    return 0


def _exit_unclosed() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    session = PlantDesignSession()
    work = session.open(P, "admin", STAGE)
    _say(ready=str(work))
    sys.stdin.readline()
    return 0


def main(mode: str) -> int:
    """Run one host."""
    if mode == "exit-unclosed":
        return _exit_unclosed()
    if mode == "own-sigterm-later":
        return _own_sigterm_later()
    if mode == "sighup-ignored":
        return _sighup_ignored()
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
