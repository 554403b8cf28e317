"""Child processes started as from a desktop or a terminal, however pytest was started.

A child inherits its parent's ignored signals (SIG_IGN survives ``exec``; ``subprocess``
resets only SIGPIPE and SIGXFSZ). Under ``nohup pytest ... &`` in a script, SIGHUP and
SIGINT are ignored in pytest and so in every host a test starts: a host the test ends by
SIGINT or SIGHUP ignored it and never ended. ``as_from_a_terminal`` puts a small launcher
in front of the command: it sets SIGINT, SIGHUP and SIGTERM to their default action (a
Python child then makes SIGINT its ``KeyboardInterrupt``), ignores only what the test asks
for (a host started under ``nohup`` on purpose), unblocks every signal, and execs the
command (the same process: its pid is the one the test signals).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TERMINATION = ("SIGINT", "SIGHUP", "SIGTERM")

_LAUNCHER = """
import os, signal, sys
ignored = set(filter(None, sys.argv[1].split(",")))
for name in ("SIGINT", "SIGHUP", "SIGTERM", "SIGPIPE", "SIGXFSZ"):
    signal.signal(getattr(signal, name), signal.SIG_IGN if name in ignored else signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
os.execvp(sys.argv[2], sys.argv[2:])
"""


def as_from_a_terminal(argv: Sequence[str], ignored: Sequence[str] = ()) -> list[str]:
    """``argv`` run with the termination signals' default actions, except ``ignored``
    (names, e.g. ``"SIGHUP"``: SIG_IGN from the start, as under ``nohup``).

    Windows: ``argv`` unchanged (no SIGHUP, and ``os.exec*`` there starts a new process).
    """
    if sys.platform == "win32":
        if ignored:
            raise ValueError("ignored signals are a POSIX launch")
        return list(argv)
    unknown = set(ignored) - set(TERMINATION)
    if unknown:
        raise ValueError(f"not a termination signal: {sorted(unknown)}")
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, ",".join(ignored), *argv]
