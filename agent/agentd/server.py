"""The background agent: one process per open session (the client is ``agentd.client``).

``agent open`` downloads the working copy, then starts this process detached
from the terminal. It holds the lock heartbeat, the watcher and the uploader, and
answers ``status``, ``flush``, ``close`` and ``abort`` over a local control
channel that nothing else on the machine can knock over (issue 9):

* the endpoint is a Unix domain socket (0600) in an owner-only runtime folder
  (``paths.control_dir``); the server checks the connecting process's uid
  (``SO_PEERCRED``), the client checks the listener's, so a forged session
  record cannot point a client at someone else's listener;
* every request carries the session's token (32 random bytes, hex, in a 0600
  file of the session's private state folder), compared in constant time;
* messages are JSON objects, each framed by a 4-byte big-endian length and
  capped in size. Nothing is ever unpickled or evaluated;
* a connection is only handed to a worker (a small bounded pool) once it has
  sent one complete, authenticated request before its deadline. Until then it
  waits in the accept loop's selector, costing a file descriptor and no thread;
  a bad, slow, silent or unauthenticated client is logged and dropped. Nothing
  a client sends ends the agent except an authenticated ``close``/``abort``, and
  the lock is never released because the channel was disturbed.

Protocol: the client sends ``{"token": HEX, "cmd": NAME, "args": {...}}``; the
server answers with any number of ``{"progress": [message, percent]}`` and then
exactly one ``{"ok": RESULT}`` or ``{"error": {"type", "message", "exit_code"}}``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.agentd.control import (
    _HEADER,
    MAX_REQUEST_BYTES,
    ProtocolError,
    _error_frame,
    _error_reply,
    _float,
    _private_control_dir,
    _token_path,
    control_path,
    decode_frame_length,
    decode_message,
    encode_message,
)
from agent.config import AgentConfig
from agent.errors import AgentError, SessionError
from agent.log import get_logger
from agent.platform import bind_control_socket, current_uid, peer_uid, write_private_file
from agent.session.records import SessionRecord, SessionStore
from agent.signals import Signal

__all__ = ["AgentServer", "SessionLike"]

log = get_logger(__name__)

HANDSHAKE_TIMEOUT = 5.0
"""A connection must deliver its whole authenticated request within this."""
SEND_TIMEOUT = 10.0
"""A reply (or progress line) a client does not read within this drops the client."""
MAX_PENDING = 128
"""Connections still sending their request; beyond this the oldest is dropped."""
WORKERS = 4
_REFUSED = "the agent refused the request: wrong token (the token file is not this agent's)"


class SessionLike(Protocol):
    """What the server needs of a session (``PlantDesignSession`` is one)."""

    record: SessionRecord | None
    progress: Signal[str, int]
    finished_commit: str | None

    @property
    def is_closed(self) -> bool: ...

    def publish_agent(self, pid: int, address: str) -> None: ...

    def status(self) -> dict[str, object]: ...

    def flush(self, timeout: float = 60.0) -> bool: ...

    def close(self, *, allow_mass_delete: bool = False, skip_unsupported: bool = False) -> Any: ...

    def abort(self) -> None: ...


@dataclass
class _Pending:
    """A connection that has not yet delivered its request."""

    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class AgentServer:
    """Serves one session's requests until it is closed or aborted."""

    def __init__(self, session: SessionLike, config: AgentConfig) -> None:
        self.session = session
        self.config = config
        self.records = SessionStore(config.paths.state_dir)
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self._listener: socket.socket | None = None
        self._path: Path | None = None
        self._token = ""
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="pdagent-control")
        self._pending: dict[int, _Pending] = {}
        self._uid = current_uid()

    @property
    def address(self) -> str | None:
        """Where the agent listens (the socket path)."""
        return None if self._path is None else str(self._path)

    def start(self) -> str:
        """Open the endpoint, publish its address and the token; return the address."""
        record = self.session.record
        assert record is not None
        self._token = secrets.token_hex(32)
        write_private_file(_token_path(self.records, record.session_id), self._token.encode())
        _private_control_dir(self.config.paths)
        self._path = control_path(self.config.paths, record.session_id)
        self._listener = bind_control_socket(self._path)
        self._listener.setblocking(False)
        self.session.publish_agent(os.getpid(), str(self._path))
        log.info("agent_listening", session_id=record.session_id, address=str(self._path))
        return str(self._path)

    def serve_forever(self) -> None:
        """Accept connections until a close/abort finished or ``shutdown`` is called."""
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                timeout = self._next_deadline()
                for key, _ in sel.select(timeout):
                    try:
                        self._on_ready(sel, key)
                    except Exception:  # the accept loop must outlive any one client
                        log.exception("control_loop_error")
                self._expire(sel)
        finally:
            for pending in list(self._pending.values()):
                self._drop(sel, pending, None)
            sel.close()
            self._listener.close()
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self._path.unlink()
            # After close/abort (or shutdown) the running requests finish; leaving on an
            # exception (the crash handler's SystemExit) must not wait for a long close.
            orderly = self._stop.is_set()
            self._pool.shutdown(wait=orderly, cancel_futures=not orderly)
            self._wake_r.close()
            self._wake_w.close()

    def shutdown(self) -> None:
        """Stop accepting; ``serve_forever`` returns (after running requests finish)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the accept loop ------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        if not self._pending:
            return None
        soonest = min(p.deadline for p in self._pending.values())
        return max(0.0, soonest - time.monotonic())

    def _on_ready(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        if key.data == "wake":
            with contextlib.suppress(OSError):
                self._wake_r.recv(64)
            return
        if key.data == "accept":
            self._accept(sel)
            return
        pending = self._pending.get(key.fd)
        if pending is not None:
            self._receive(sel, pending)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        for _ in range(64):  # drain a burst, but come back to the others
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control_accept_failed", error=str(exc))
                return
            try:
                uid = peer_uid(conn)
            except OSError as exc:
                log.warning("control_peer_unknown", error=str(exc))
                conn.close()
                continue
            if uid is not None and self._uid is not None and uid != self._uid:
                log.warning("control_peer_refused", peer_uid=uid)
                conn.close()
                continue
            conn.setblocking(False)
            if len(self._pending) >= MAX_PENDING:
                oldest = min(self._pending.values(), key=lambda p: p.deadline)
                self._drop(sel, oldest, "control_client_dropped_too_many")
            pending = _Pending(conn, time.monotonic() + self.handshake_timeout)
            self._pending[conn.fileno()] = pending
            sel.register(conn, selectors.EVENT_READ, "client")

    def _receive(self, sel: selectors.BaseSelector, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(sel, pending, "control_client_error", error=str(exc))
            return
        if not chunk:
            self._drop(sel, pending, "control_client_closed_early", received=len(pending.buf))
            return
        pending.buf += chunk
        try:
            request = self._complete_request(pending.buf)
        except ProtocolError as exc:
            self._drop(sel, pending, "control_client_bad_request", error=str(exc))
            return
        if request is None:
            return
        if not hmac.compare_digest(str(request.get("token", "")).encode(), self._token.encode()):
            with contextlib.suppress(OSError, ProtocolError):
                pending.sock.send(_error_frame("AgentUnreachableError", _REFUSED, 17))
            self._drop(sel, pending, "control_auth_refused")
            return
        cmd = request.get("cmd")
        args = request.get("args") or {}
        if not isinstance(cmd, str) or not isinstance(args, dict):
            self._drop(sel, pending, "control_client_bad_request", error="cmd/args malformed")
            return
        sel.unregister(pending.sock)
        del self._pending[pending.sock.fileno()]
        pending.sock.setblocking(True)
        pending.sock.settimeout(SEND_TIMEOUT)
        self._pool.submit(self._handle, pending.sock, cmd, args)

    @staticmethod
    def _complete_request(buf: bytearray) -> dict[str, Any] | None:
        if len(buf) < _HEADER.size:
            return None
        length = decode_frame_length(bytes(buf[: _HEADER.size]), MAX_REQUEST_BYTES)
        if len(buf) < _HEADER.size + length:
            return None
        return decode_message(bytes(buf[_HEADER.size : _HEADER.size + length]))

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._drop(sel, pending, "control_client_timeout", received=len(pending.buf))

    def _drop(
        self, sel: selectors.BaseSelector, pending: _Pending, event: str | None, **kw: Any
    ) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(pending.sock)
        pending.sock.close()
        if event is not None:
            log.warning(event, **kw)

    # -- the workers ----------------------------------------------------------------

    def _handle(self, conn: socket.socket, cmd: str, args: dict[str, Any]) -> None:
        finishing = cmd in ("close", "abort")
        send_lock = threading.Lock()

        def send(message: dict[str, Any]) -> None:
            with send_lock:
                conn.sendall(encode_message(message))

        try:
            with conn:
                try:
                    result = self._dispatch(cmd, args, send)
                    reply: dict[str, Any] = {"ok": result}
                except AgentError as exc:
                    finishing = finishing and self.session.is_closed
                    reply = _error_reply(type(exc).__name__, exc.format_message(), exc.exit_code)
                except Exception as exc:
                    log.exception("agent_request_failed", cmd=cmd)
                    finishing = False
                    reply = _error_reply("AgentError", repr(exc), 1)
                try:
                    send(reply)
                except (OSError, ProtocolError) as exc:
                    log.warning("control_reply_failed", cmd=cmd, error=str(exc))
        finally:
            if finishing:
                self.shutdown()

    def _dispatch(self, cmd: str, args: dict[str, Any], send: Callable[[Any], None]) -> Any:
        def progress(message: str, pct: int) -> None:
            with contextlib.suppress(OSError, ProtocolError):
                send({"progress": [message, pct]})

        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            return self.session.status()
        if cmd == "flush":
            return {"flushed": self.session.flush(timeout=_float(args.get("timeout"), 60.0))}
        if cmd == "close":
            self.session.progress.connect(progress)
            try:
                report = self.session.close(
                    allow_mass_delete=args.get("allow_mass_delete") is True,
                    skip_unsupported=args.get("skip_unsupported") is True,
                )
            finally:
                self.session.progress.disconnect(progress)
            return report.as_dict()
        if cmd == "abort":
            self.session.abort()
            return {"aborted": True, "finished_commit": self.session.finished_commit}
        raise SessionError(f"unknown agent command {cmd[:40]!r}")
