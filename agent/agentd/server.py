"""The background agent: one process per open session, and the client that talks to it.

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
import hashlib
import hmac
import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import errors
from agent.config import AgentConfig, PathsConfig
from agent.errors import AgentError, AgentUnreachableError, InsecureStateError, SessionError
from agent.log import get_logger
from agent.platform import (
    bind_control_socket,
    check_private_dir,
    connect_control_socket,
    current_uid,
    ensure_private_dir,
    open_private_append,
    peer_uid,
    pid_alive,
    spawn_detached,
    write_private_file,
)
from agent.session.records import SessionRecord, SessionStore
from agent.signals import Signal

__all__ = [
    "MAX_REQUEST_BYTES",
    "AgentClient",
    "AgentServer",
    "ProtocolError",
    "SessionLike",
    "decode_frame_length",
    "encode_message",
    "spawn_agent",
]

log = get_logger(__name__)

TOKEN_NAME = "token"  # noqa: S105 - a file name, not a secret
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
"""A connection must deliver its whole authenticated request within this."""
SEND_TIMEOUT = 10.0
"""A reply (or progress line) a client does not read within this drops the client."""
STATUS_TIMEOUT = 2.0
"""``status`` and ``ping`` answer within this, or the agent "does not respond"."""
MAX_PENDING = 128
"""Connections still sending their request; beyond this the oldest is dropped."""
WORKERS = 4
_HEADER = struct.Struct(">I")
_REFUSED = "the agent refused the request: wrong token (the token file is not this agent's)"
# Spawned agents outlive us by design; keeping their Popen objects alive stops
# Popen.__del__ from warning that a child is "still running".
_SPAWNED: list[subprocess.Popen[bytes]] = []
_READY_TIMEOUT = 30.0


class ProtocolError(Exception):
    """A peer broke the framing or sent something that is not a request (internal)."""


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


def encode_message(message: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> bytes:
    """One frame: 4-byte big-endian length, then the JSON object as UTF-8."""
    data = json.dumps(message, default=str, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {limit}")
    return _HEADER.pack(len(data)) + data


def decode_frame_length(header: bytes, limit: int) -> int:
    """The body length a frame header announces; ``ProtocolError`` beyond ``limit``."""
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return int(length)


def decode_message(body: bytes) -> dict[str, Any]:
    """A frame's body as a JSON object; anything else is a ``ProtocolError``."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON message ({type(exc).__name__})") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def control_path(paths: PathsConfig, session_id: str) -> Path:
    """The socket of one session's agent: short (the 108-byte limit), unique per base folder."""
    digest = hashlib.sha256(f"{paths.state_dir}\0{session_id}".encode()).hexdigest()[:24]
    return paths.control_dir / f"{digest}.sock"


def _token_path(store: SessionStore, session_id: str) -> Path:
    return store.folder(session_id) / TOKEN_NAME


def _private_control_dir(paths: PathsConfig) -> Path:
    folder = paths.control_dir
    problem = ensure_private_dir(folder)
    if problem is not None:
        raise InsecureStateError(
            f"the control folder {folder} {problem}: another user could impersonate or "
            f"intercept the background agent. Remove it (or `chmod 700 {folder}` if it is "
            "yours) or set paths.runtime_dir to a private folder"
        )
    return folder


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


def _float(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 86400:
        return float(value)
    return default


def _error_reply(kind: str, message: str, code: int) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "exit_code": code}}


def _error_frame(kind: str, message: str, code: int) -> bytes:
    return encode_message(_error_reply(kind, message, code))


class AgentClient:
    """Talks to the background agent of one recorded session."""

    def __init__(self, record: SessionRecord, paths: PathsConfig) -> None:
        self.record = record
        self.paths = paths
        self.records = SessionStore(paths.state_dir)

    def _gone(self, why: str) -> AgentUnreachableError:
        r = self.record
        if r.agent_pid is not None and pid_alive(r.agent_pid):
            # `agent recover` refuses a session whose agent runs: name what works.
            way = (
                f"It still runs: wait and try again; if it stays so, stop it (`kill "
                f"{r.agent_pid}`), then `agent recover --resume` brings the session back"
            )
        else:
            way = "run `agent recover` to resume or discard the session"
        return AgentUnreachableError(
            f"the background agent of {r.projekt_id}/{r.stage} (session {r.session_id}, "
            f"pid {r.agent_pid}) {why}. Your files and the journal are kept: {way}"
        )

    def _endpoint(self) -> Path:
        address = self.record.agent_address
        if not address:
            raise self._gone("was never started")
        path = Path(address)
        expected = control_path(self.paths, self.record.session_id)
        # The runtime folder may differ between the shell that opened the session and
        # this one (XDG_RUNTIME_DIR set or not): any private folder of ours will do,
        # and the listener's uid is checked once connected.
        if path.name != expected.name or not path.is_absolute():
            raise AgentUnreachableError(
                f"the session record {self.record.session_id} names the agent address "
                f"{address!r}, not this session's socket {expected.name}: the record is not "
                "trusted. `agent recover` resumes or discards the session"
            )
        try:
            problem = check_private_dir(path.parent)
        except FileNotFoundError as exc:
            raise self._gone("left no control socket") from exc
        if problem is not None:
            raise InsecureStateError(
                f"the control folder {path.parent} {problem}: refusing to talk through it"
            )
        return path

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: Callable[[str, int], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; return its result or raise the agent's error class.

        ``timeout`` bounds the wait for each message of the answer (default: 2 s
        for ``status``/``ping``, the flush timeout plus a margin for ``flush``,
        an hour per progress step for ``close``/``abort``).
        """
        path = self._endpoint()
        pid = self.record.agent_pid
        if pid is not None and not pid_alive(pid):
            # Whatever listens at the path now is not this session's agent (a socket some
            # other program left there would take the request and never answer).
            raise self._gone("is not running")
        try:
            token = _token_path(self.records, self.record.session_id).read_text().strip()
        except OSError as exc:
            raise self._gone("left no token") from exc
        per_message = timeout if timeout is not None else _default_timeout(cmd, args)
        try:
            sock = connect_control_socket(path, min(per_message, STATUS_TIMEOUT))
        except TimeoutError as exc:
            raise self._gone(
                f"does not respond (no connection within {STATUS_TIMEOUT:.0f} s)"
            ) from exc
        except OSError as exc:
            alive = self.record.agent_pid is not None and pid_alive(self.record.agent_pid)
            raise self._gone("does not answer" if alive else "is not running") from exc
        with sock:
            uid = peer_uid(sock)
            mine = current_uid()
            if uid is not None and mine is not None and uid != mine:
                raise AgentUnreachableError(
                    f"the listener at {path} belongs to uid {uid}, not to you: refusing it"
                )
            sock.settimeout(per_message)
            try:
                sock.sendall(
                    encode_message(
                        {"token": token, "cmd": cmd, "args": args or {}}, MAX_REQUEST_BYTES
                    )
                )
                while True:
                    message = _read_message(sock)
                    progress = message.get("progress")
                    if progress is not None:
                        if (
                            on_progress is not None
                            and isinstance(progress, list)
                            and len(progress) == 2
                        ):
                            on_progress(str(progress[0]), _int(progress[1]))
                        continue
                    break
            except TimeoutError as exc:
                raise self._gone(
                    f"does not respond (no answer within {per_message:.0f} s)"
                ) from exc
            except (OSError, ProtocolError) as exc:
                raise self._gone(f"stopped while answering ({exc})") from exc
        if "error" in message:
            raise _error_from(message["error"])
        if "ok" not in message:
            raise self._gone("answered something that is not a reply")
        return message["ok"]


def _default_timeout(cmd: str, args: dict[str, Any] | None) -> float:
    if cmd in ("status", "ping"):
        return STATUS_TIMEOUT
    if cmd == "flush":
        return _float((args or {}).get("timeout"), 60.0) + 30.0
    return 3600.0


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("the agent closed the connection")
        buf += chunk
    return bytes(buf)


def _read_message(sock: socket.socket) -> dict[str, Any]:
    length = decode_frame_length(_read_exact(sock, _HEADER.size), MAX_REPLY_BYTES)
    return decode_message(_read_exact(sock, length))


def _error_from(err: object) -> AgentError:
    """The agent's error as our class (only ``AgentError`` subclasses, by name)."""
    if not isinstance(err, dict):
        return AgentError("the agent reported an unreadable error")
    cls = getattr(errors, str(err.get("type")), AgentError)
    if not (isinstance(cls, type) and issubclass(cls, AgentError)):
        cls = AgentError
    return cls(str(err.get("message")))


def spawn_agent(config_path: Path | None, session_id: str, config: AgentConfig) -> SessionRecord:
    """Start the background agent for ``session_id`` and wait until it answers."""
    argv = [sys.executable, "-m", "agent"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += ["_serve", session_id]
    records = SessionStore(config.paths.state_dir)
    _private_control_dir(config.paths)  # refuse here (exit 20), not in the detached child
    log_path = records.folder(session_id) / "agent.out"
    fd = open_private_append(log_path)
    with os.fdopen(fd, "ab") as out:
        proc = spawn_detached(argv, out)
    _SPAWNED.append(proc)
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        record = records.load(session_id)
        if record.agent_pid == proc.pid and record.agent_address:
            AgentClient(record, config.paths).call("ping", timeout=10.0)
            return record
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise AgentUnreachableError(
                f"the background agent exited at start (code {proc.returncode}): {tail.strip()}"
            )
        time.sleep(0.05)
    raise AgentUnreachableError(
        f"the background agent did not answer within {_READY_TIMEOUT:.0f}s; see {log_path}"
    )
