"""The client of the background agent: ``AgentClient`` talks to one session's agent,
``spawn_agent`` starts one (``agent.agentd.server``) and waits until it answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.agentd.control import (
    MAX_REQUEST_BYTES,
    ProtocolError,
    _error_from,
    _float,
    _private_control_dir,
    _read_message,
    _token_path,
    control_path,
    encode_message,
)
from agent.config import AgentConfig, PathsConfig
from agent.errors import AgentUnreachableError, InsecureStateError
from agent.platform import (
    check_private_dir,
    connect_control_socket,
    current_uid,
    open_private_append,
    peer_uid,
    pid_alive,
    spawn_detached,
)
from agent.session.records import SessionRecord, SessionStore

__all__ = ["AgentClient", "spawn_agent"]

STATUS_TIMEOUT = 2.0
"""``status`` and ``ping`` answer within this, or the agent "does not respond"."""
# Spawned agents outlive us by design; keeping their Popen objects alive stops
# Popen.__del__ from warning that a child is "still running".
_SPAWNED: list[subprocess.Popen[bytes]] = []
_READY_TIMEOUT = 30.0
# How often the start waits to look for the agent's published address again: the
# agent starts in about a second; a look is one small file read.
_READY_POLL = 0.01


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
        time.sleep(_READY_POLL)
    raise AgentUnreachableError(
        f"the background agent did not answer within {_READY_TIMEOUT:.0f}s; see {log_path}"
    )
