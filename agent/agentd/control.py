"""The control channel between ``agent`` commands and the background agent: its wire
format and its files.

Messages are JSON objects, each framed by a 4-byte big-endian length and capped in
size; nothing is ever unpickled or evaluated. The endpoint is a Unix domain socket
in an owner-only runtime folder (``control_path``); the session's token lives in a
0600 file of its private state folder. ``agent.agentd.server`` answers on the
channel, ``agent.agentd.client`` asks.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from pathlib import Path
from typing import Any

from agent import errors
from agent.config import PathsConfig
from agent.errors import AgentError, InsecureStateError
from agent.platform import ensure_private_dir
from agent.session.records import SessionStore

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "ProtocolError",
    "control_path",
    "decode_frame_length",
    "decode_message",
    "encode_message",
]

TOKEN_NAME = "token"  # noqa: S105 - a file name, not a secret
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer broke the framing or sent something that is not a request (internal)."""


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


def _float(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 86400:
        return float(value)
    return default


def _error_reply(kind: str, message: str, code: int) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "exit_code": code}}


def _error_frame(kind: str, message: str, code: int) -> bytes:
    return encode_message(_error_reply(kind, message, code))


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
