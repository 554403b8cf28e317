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

import contextlib
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

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


class ChildOutput:
    """A child's stdout, as JSON lines, and its stderr, read on threads as they come.

    Reading lines from ``proc.stdout`` and then calling ``communicate()`` loses lines:
    ``communicate`` reads the pipe itself, not what the text wrapper's buffer already
    holds, so a line that arrived in the same chunk as the one read last was dropped
    (a host handler's line printed right after the report before it: a test failing
    about one run in two). Here every byte is read by one reader per stream.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_out, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_err, args=(proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_out(self, stream: IO[str]) -> None:
        try:
            for raw in stream:
                self.out.append(raw)
                try:
                    data = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    self._lines.put(data)
        except (OSError, ValueError):
            pass  # closed by kill()
        finally:
            self._lines.put(None)
            with contextlib.suppress(OSError):
                stream.close()

    def _read_err(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.err.extend(stream)
        with contextlib.suppress(OSError):
            stream.close()

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON object line; None once stdout ended; ``queue.Empty`` on timeout."""
        return self._lines.get(timeout=timeout)

    def rest(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Once the child ended: its JSON lines not taken by ``next`` yet."""
        for reader in self._readers:
            reader.join(timeout)
        rest: list[dict[str, Any]] = []
        while True:
            try:
                data = self._lines.get_nowait()
            except queue.Empty:
                return rest
            if data is not None:
                rest.append(data)

    def ended(self, timeout: float) -> bool:
        """Close the child's stdin (as ``communicate`` does) and wait for it to end; False
        if it still runs after ``timeout`` seconds."""
        proc = self._proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """Make sure the child is gone, its output read and its pipes closed."""
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.rest()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stdout(self) -> str:
        """Everything it wrote to stdout so far."""
        return "".join(self.out)

    def stderr(self) -> str:
        """Everything it wrote to stderr so far."""
        return "".join(self.err)
