"""The wake-up socket of the crash hooks, and who reads it (see ``agent.session.crash``).

Python's C signal handler writes a signal's number to the interpreter's wake-up fd; while
the hooks are installed that is a socket of ours. ``WakeupRelay`` holds that socket, reads
it on its relay thread (or lets an event loop read it: ``use_event_loop``), forwards every
real signal's byte to the host's wake-up fd, and hands the first signal we hooked to its
``CrashHooks``. It counts the bytes: wake-ups of our own requests (``tokens``), real
signals not yet handled on the main thread (``real_pending``), and those handled while
their bytes were still unread (``handled_unread``). The counts and the socket change under
the hooks' lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.log import get_logger
from agent.platform import forward_wakeup, on_main_thread, peek_wakeup, swap_wakeup_fd

if TYPE_CHECKING:
    import socket

    from agent.session.crash_hooks import CrashHooks

log = get_logger(__name__)

_STOP = b"\x00"


class WakeupRelay:
    """The hooks' wake-up socket: read by a relay thread, or by an event loop."""

    def __init__(self, hooks: CrashHooks) -> None:
        self._hooks = hooks
        self.prev_wakeup = -1
        self.reader: socket.socket | None = None
        self.writer: socket.socket | None = None
        self._relay: threading.Thread | None = None
        self._relay_stop = threading.Event()
        self._stopped_relays: list[threading.Thread] = []
        self.tokens = 0  # wake-up bytes of our own requests, for the relay to swallow
        # Real signal bytes seen, per signal, not yet handled by our handler on the main thread.
        self.real_pending: dict[int, int] = {}
        # Bytes of signals our handler already handled while they were still unread in
        # the socket (an event loop reads after the handler ran): not counted when read.
        self.handled_unread: dict[int, int] = {}
        # Set by an event loop that reads the wake-up socket itself (agent.qt).
        self.loop_reader: Callable[[int | None], None] | None = None
        self.terminator: Callable[[int], None] | None = None

    def start_reading(self) -> None:
        """Under the lock, as the hooks go in: the event loop reads, or the relay thread."""
        assert self.reader is not None
        if self.loop_reader is not None:
            self.loop_reader(self.reader.fileno())
        else:
            self._start_relay()

    def unhook(self) -> None:
        """Under the lock, as the hooks come down: the host's wake-up fd back (unless it
        set its own after ours), and our unread signal bytes forwarded to it."""
        assert self.writer is not None
        now = swap_wakeup_fd(self.prev_wakeup)
        if now != self.writer.fileno():
            swap_wakeup_fd(now)  # the host set its own after ours: keep theirs
        self._forward_unread()

    def close(self) -> None:
        """Under the lock, after ``unhook``: counts reset, reading stopped, socket closed."""
        assert self.writer is not None
        self.tokens = 0
        self.real_pending = {}
        self.handled_unread = {}
        if self.loop_reader is not None:
            self.loop_reader(None)
        self._stop_relay()
        self.reader.close() if self.reader is not None else None
        self.writer.close()
        self.reader = self.writer = None

    def _forward_unread(self) -> None:
        """Under the lock, before our channel closes: signal bytes no one read yet (the
        event loop reads after the handler ran) go on to the host's wake-up fd."""
        reader = self.reader
        if reader is None:
            return
        reader.setblocking(False)
        try:
            while data := reader.recv(64):
                self.take(data, None)
        except OSError:
            pass  # nothing left (BlockingIOError), or closed
        finally:
            reader.setblocking(True)

    def _start_relay(self) -> None:
        assert self.reader is not None
        self._relay_stop = threading.Event()
        self._relay = threading.Thread(
            target=self._relay_loop,
            args=(self.reader, self._relay_stop),
            name="pdagent-crash-relay",
            daemon=True,
        )
        self._relay.start()

    def _stop_relay(self) -> None:
        """Under the lock: tell the relay to stop (joined later, outside the lock)."""
        relay, self._relay = self._relay, None
        self._relay_stop.set()
        if relay is None or self.writer is None:
            return
        with contextlib.suppress(OSError):
            self.writer.send(_STOP)
        self._stopped_relays.append(relay)

    def join_stopped(self) -> None:
        """Outside the lock: wait for relays told to stop (they may wait for the lock)."""
        while self._stopped_relays:
            relay = self._stopped_relays.pop()
            if relay is not threading.current_thread():
                relay.join(timeout=5)

    def use_event_loop(
        self, reader: Callable[[int | None], None], terminator: Callable[[int], None]
    ) -> None:
        """See ``CrashHooks.use_event_loop``."""
        with self._hooks._lock:
            self.terminator = terminator
            self.loop_reader = reader
            if self._hooks.installed and self.reader is not None:
                self._stop_relay()
                reader(self.reader.fileno())
        self.join_stopped()

    def leave_event_loop(self) -> None:
        """See ``CrashHooks.leave_event_loop``."""
        with self._hooks._lock:
            reader, self.loop_reader, self.terminator = self.loop_reader, None, None
            if reader is not None:
                reader(None)
            if self._hooks.installed and self._relay is None:
                self._start_relay()

    # -- a signal arrives ------------------------------------------------------------

    def _relay_loop(self, reader: socket.socket, stop: threading.Event) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data or stop.is_set():
                return
            signum = self.take(data, stop)
            if signum is not None:
                self._hooks._after_signal(signum, stop)

    def read_now(self) -> int | None:
        """Read the socket without blocking: the first real signal we hooked, or None."""
        reader = self.reader
        if reader is None:
            return None
        reader.setblocking(False)
        try:
            data = reader.recv(64)
        except (BlockingIOError, OSError):
            return None
        finally:
            reader.setblocking(True)
        return self.take(data, None)

    def take(self, data: bytes, stop: threading.Event | None) -> int | None:
        """Forward real signal bytes to the host's wake-up fd; the first real signal we
        hooked, or None."""
        real = bytearray()
        with self._hooks._lock:
            previous = self._hooks._previous
            if (stop is not None and stop.is_set()) or previous is None:
                return None  # bytes of a channel being taken down: nothing to act on
            hooked = set(previous)
            for b in data:
                if b == 0:
                    continue
                if self.tokens > 0:
                    self.tokens -= 1  # our own request to the main thread, not a signal
                    continue
                real.append(b)
            fresh = bytearray()
            for b in real:
                if self.handled_unread.get(b, 0) > 0:
                    self.handled_unread[b] -= 1  # its handler ran already: only forwarded
                    continue
                fresh.append(b)
                self.real_pending[b] = self.real_pending.get(b, 0) + 1
        if not real:
            return None
        forward_wakeup(self.prev_wakeup, bytes(real))
        # Only the signals we hooked end a session: a host's own SIGUSR1 or SIGCHLD
        # handler writes its byte to the same wake-up fd (issue 20).
        return next((b for b in fresh if b in hooked), None)

    def reclaim(self) -> bool:
        """See ``CrashHooks.reclaim_wakeup_fd``."""
        with self._hooks._lock:
            if not self._hooks.installed or self.writer is None or not on_main_thread():
                return False
            ours = self.writer.fileno()
            now = swap_wakeup_fd(ours)
            if now == ours:
                return False
            self.prev_wakeup = now
        log.info("crash_hooks_wakeup_fd_chained", host_fd=now)
        return True

    def consume(self, signum: int, *, real: bool) -> None:
        """Under the lock, as our handler takes ``signum``: its count is used up, and
        (a real signal) so are its bytes still unread in the socket. Counted when read
        later, they made a stale count, and the next request of our own (a close
        restoring the handlers) was taken for that signal: the host's handler called
        again, or the application quit at the end of a normal close (issue 20)."""
        self.real_pending.pop(signum, None)
        if not real or self.reader is None:
            return
        waiting = [b for b in peek_wakeup(self.reader) if b != 0][self.tokens :]
        self.handled_unread[signum] = waiting.count(signum)

    def unread_signal(self) -> bool:
        """True if a real signal's byte waits in the socket (the relay has not read it yet)."""
        if self.reader is None:
            return False
        return len([b for b in peek_wakeup(self.reader) if b != 0]) > self.tokens
