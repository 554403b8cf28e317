"""The background agent: one process per open session, and the client that talks to it.

``agent open`` downloads the working copy, then starts this process detached
from the terminal. It holds the lock heartbeat, the watcher and the uploader, and
answers ``status``, ``flush``, ``close`` and ``abort`` over a local authenticated
channel (``multiprocessing.connection`` on 127.0.0.1, with a random 32-byte
authkey in a 0600 file in the session's state folder). A wrong key is refused
by the handshake.

Protocol: the client sends ``{"cmd": NAME, "args": {...}}``; the server answers
with any number of ``{"progress": [message, percent]}`` and then exactly one
``{"ok": RESULT}`` or ``{"error": {"type", "message", "exit_code"}}``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.context import AuthenticationError
from pathlib import Path
from typing import Any

import structlog

from agent import errors
from agent.config import AgentConfig
from agent.errors import AgentError, AgentUnreachableError, SessionError
from agent.platform import pid_alive, spawn_detached, write_private_file
from agent.records import SessionRecord, SessionStore

__all__ = ["AgentClient", "AgentServer", "spawn_agent"]

log = structlog.get_logger(__name__)

_AUTHKEY = "authkey"
# Spawned agents outlive us by design; keeping their Popen objects alive stops
# Popen.__del__ from warning that a child is "still running".
_SPAWNED: list[subprocess.Popen[bytes]] = []
_READY_TIMEOUT = 30.0


def _authkey_path(store: SessionStore, session_id: str) -> Path:
    return store.folder(session_id) / _AUTHKEY


class AgentServer:
    """Serves one session's requests until it is closed or aborted."""

    def __init__(self, session: Any, config: AgentConfig) -> None:
        # ``session`` is a PlantDesignSession (typed loosely to avoid an import cycle).
        self.session = session
        self.config = config
        self.records = SessionStore(config.paths.state_dir)
        self._listener: Listener | None = None
        self._key: bytes | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> str:
        """Open the listener, publish its address and the authkey; return the address."""
        record: SessionRecord = self.session.record
        key = os.urandom(32)
        write_private_file(_authkey_path(self.records, record.session_id), key)
        self._key = key
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        address = f"{host}:{port}"
        self.session.publish_agent(os.getpid(), address)
        log.info("agent_listening", session_id=record.session_id, address=address)
        return address

    def serve_forever(self) -> None:
        """Accept connections until a close/abort finished or ``shutdown`` is called."""
        assert self._listener is not None
        try:
            while not self._stop.is_set():
                try:
                    conn = self._listener.accept()
                except AuthenticationError:
                    log.warning("agent_auth_refused")
                    continue
                except OSError:
                    break
                if self._stop.is_set():
                    conn.close()  # the wake-up call from shutdown()
                    break
                thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                thread.start()
                self._threads.append(thread)
        finally:
            self._listener.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def shutdown(self) -> None:
        """Stop accepting; ``serve_forever`` returns.

        Closing a socket does not wake a thread blocked in ``accept`` on Linux, so
        shutdown connects to its own listener once to let the accept loop see the flag.
        """
        self._stop.set()
        if self._listener is None or self._key is None:
            return
        try:
            with Client(self._listener.address, authkey=self._key):
                pass
        except (OSError, EOFError, AuthenticationError):
            pass  # the listener is already closed: nothing to wake

    def _handle(self, conn: Connection) -> None:
        with conn:
            try:
                request = conn.recv()
                cmd = str(request.get("cmd"))
                args = dict(request.get("args") or {})
            except (EOFError, OSError, AttributeError):
                return
            finishing = cmd in ("close", "abort")
            try:
                result = self._dispatch(cmd, args, conn)
                conn.send({"ok": result})
            except AgentError as exc:
                finishing = finishing and self.session.is_closed
                conn.send(
                    {
                        "error": {
                            "type": type(exc).__name__,
                            "message": exc.format_message(),
                            "exit_code": exc.exit_code,
                        }
                    }
                )
            except Exception as exc:
                log.exception("agent_request_failed", cmd=cmd)
                finishing = False
                conn.send({"error": {"type": "AgentError", "message": repr(exc), "exit_code": 1}})
        if finishing:
            self.shutdown()

    def _dispatch(self, cmd: str, args: dict[str, Any], conn: Connection) -> Any:
        def progress(message: str, pct: int) -> None:
            with contextlib.suppress(OSError):
                conn.send({"progress": [message, pct]})

        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            return self.session.status()
        if cmd == "flush":
            return {"flushed": self.session.flush(timeout=float(args.get("timeout", 60.0)))}
        if cmd == "close":
            self.session.progress.connect(progress)
            try:
                report = self.session.close(
                    allow_mass_delete=bool(args.get("allow_mass_delete")),
                    skip_unsupported=bool(args.get("skip_unsupported")),
                )
            finally:
                self.session.progress.disconnect(progress)
            return report.as_dict()
        if cmd == "abort":
            self.session.abort()
            return {"aborted": True}
        raise SessionError(f"unknown agent command {cmd!r}")


class AgentClient:
    """Talks to the background agent of one recorded session."""

    def __init__(self, record: SessionRecord, state_dir: Path) -> None:
        self.record = record
        self.records = SessionStore(state_dir)

    def _gone(self, why: str) -> AgentUnreachableError:
        r = self.record
        return AgentUnreachableError(
            f"the background agent of {r.projekt_id}/{r.stage} (session {r.session_id}, "
            f"pid {r.agent_pid}) {why}. Your files and the journal are kept: run "
            "`agent recover` to resume or discard the session"
        )

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: Callable[[str, int], None] | None = None,
    ) -> Any:
        """Send one request; return its result or raise the agent's error class."""
        if not self.record.agent_address:
            raise self._gone("was never started")
        host, _, port = self.record.agent_address.rpartition(":")
        try:
            key = _authkey_path(self.records, self.record.session_id).read_bytes()
        except OSError as exc:
            raise self._gone("left no authkey") from exc
        try:
            conn = Client((host, int(port)), authkey=key)
        except AuthenticationError as exc:
            raise AgentUnreachableError(
                f"the agent at {self.record.agent_address} refused our key; it is not this "
                "session's agent"
            ) from exc
        except OSError as exc:
            alive = self.record.agent_pid is not None and pid_alive(self.record.agent_pid)
            raise self._gone("does not answer" if alive else "is not running") from exc
        with conn:
            try:
                conn.send({"cmd": cmd, "args": args or {}})
                while True:
                    message = conn.recv()
                    if "progress" in message:
                        if on_progress is not None:
                            text, pct = message["progress"]
                            on_progress(str(text), int(pct))
                        continue
                    break
            except (EOFError, OSError) as exc:
                raise self._gone("stopped while answering") from exc
        if "error" in message:
            err = message["error"]
            cls = getattr(errors, str(err.get("type")), AgentError)
            if not (isinstance(cls, type) and issubclass(cls, AgentError)):
                cls = AgentError
            raise cls(str(err.get("message")))
        return message["ok"]


def spawn_agent(config_path: Path | None, session_id: str, state_dir: Path) -> SessionRecord:
    """Start the background agent for ``session_id`` and wait until it answers."""
    argv = [sys.executable, "-m", "agent"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += ["_serve", session_id]
    log_path = SessionStore(state_dir).folder(session_id) / "agent.out"
    with log_path.open("ab") as out:
        proc = spawn_detached(argv, out)
    _SPAWNED.append(proc)
    records = SessionStore(state_dir)
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        record = records.load(session_id)
        if record.agent_pid == proc.pid and record.agent_address:
            AgentClient(record, state_dir).call("ping")
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
