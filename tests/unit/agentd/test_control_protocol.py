"""The control channel's wire format, the CLI's escaping, and the Windows seams (faked)."""

from __future__ import annotations

import struct
import subprocess
from typing import Any, cast

import pytest

from agent import platform
from agent.agentd.control import (
    MAX_REQUEST_BYTES,
    ProtocolError,
    decode_frame_length,
    decode_message,
    encode_message,
)
from agent.text import printable, printable_lines


def test_a_message_is_a_length_prefixed_json_object() -> None:
    """Four bytes of big-endian length, then the JSON; it decodes to the same object."""
    frame = encode_message({"cmd": "status", "args": {}})
    (length,) = struct.unpack(">I", frame[:4])
    assert len(frame) - 4 == length
    assert {"cmd": "status", "args": {}} == decode_message(frame[4:])


def test_a_frame_over_the_cap_is_refused_before_it_is_read() -> None:
    """The announced length alone is checked: a 4 GiB frame costs nothing."""
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_frame_length(struct.pack(">I", 2**32 - 1), MAX_REQUEST_BYTES)
    with pytest.raises(ProtocolError):
        encode_message({"x": "y" * MAX_REQUEST_BYTES}, MAX_REQUEST_BYTES)


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"not json", b"[1, 2]", b'"text"', b"1e999999", b"[" * 100_000],
)
def test_anything_but_a_json_object_is_a_protocol_error(body: bytes) -> None:
    """Bytes that are not a JSON object (even deeply nested ones) are refused, never run."""
    with pytest.raises(ProtocolError):
        decode_message(body)


def test_printable_escapes_terminal_controls_from_the_bucket() -> None:
    """ESC, CR, newline, DEL, C1 and bidi overrides are shown, not obeyed."""
    raw = "\x1b[2Jbob\r\nerror: x\x7f\x9b\u202e"
    shown = printable(raw)
    assert "\\x1b[2Jbob\\x0d\\x0aerror: x\\x7f\\x9b\\u202e" == shown
    assert "a\nb\\x1b" == printable_lines("a\nb\x1b")


class _FakeDll:
    """Records calls to the Windows functions the pipe code makes."""

    def __init__(self, **results: Any) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.results = results

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            return self.results.get(name, 1)

        return call


def test_the_pipe_is_owner_only_first_instance_and_local() -> None:
    """CreateNamedPipeW gets the owner-only descriptor, first-instance and reject-remote."""
    kernel32, advapi32 = _FakeDll(CreateNamedPipeW=77), _FakeDll()
    sid = "S-1-5-21-1-2-3-1001"
    name = platform.windows_pipe_name(sid, "20260101T000000-abcd")
    handle = platform.windows_create_pipe(name, sid, kernel32=kernel32, advapi32=advapi32)
    assert 77 == handle
    assert r"\\.\pipe\pd-session-agent-S-1-5-21-1-2-3-1001-20260101T000000-abcd" == name
    [(_, sd_args)] = advapi32.calls
    assert "O:S-1-5-21-1-2-3-1001D:P(A;;GA;;;S-1-5-21-1-2-3-1001)" == sd_args[0]
    created = next(args for fn, args in kernel32.calls if fn == "CreateNamedPipeW")
    assert created[1] & platform.FILE_FLAG_FIRST_PIPE_INSTANCE
    assert created[2] & platform.PIPE_REJECT_REMOTE_CLIENTS
    assert "LocalFree" in [fn for fn, _ in kernel32.calls]


def test_a_squatted_pipe_name_is_an_error() -> None:
    """If someone created the pipe first, CreateNamedPipeW fails and so do we."""
    kernel32 = _FakeDll(CreateNamedPipeW=-1)
    with pytest.raises(OSError, match="already taken"):
        platform.windows_create_pipe(
            r"\\.\pipe\x", "S-1-5-21-1", kernel32=kernel32, advapi32=_FakeDll()
        )


def test_pipe_names_keep_only_safe_characters() -> None:
    """A user SID or session id cannot steer the pipe name elsewhere."""
    name = platform.windows_pipe_name("S-1\\..\\evil", "x/../y")
    assert "\\.." not in name.removeprefix("\\\\.\\pipe\\")
    assert "/" not in name


def test_detached_start_breaks_away_and_falls_back_on_access_denied() -> None:
    """Windows: new group, no console, breakaway; a job that forbids it gets a plain start."""
    tried: list[int] = []
    started = cast("subprocess.Popen[bytes]", object())

    def start(flags: int) -> subprocess.Popen[bytes]:
        tried.append(flags)
        if flags & platform.CREATE_BREAKAWAY_FROM_JOB:
            err = OSError("denied")
            err.winerror = 5  # type: ignore[attr-defined]
            raise err
        return started

    assert started is platform.spawn_with_breakaway_fallback(start, windows=True)
    base = platform.CREATE_NEW_PROCESS_GROUP | platform.DETACHED_PROCESS
    assert [base | platform.CREATE_BREAKAWAY_FROM_JOB, base] == tried


def test_other_start_errors_are_not_retried() -> None:
    """Only ACCESS_DENIED means "breakaway not allowed"; anything else is raised."""

    def start(flags: int) -> subprocess.Popen[bytes]:
        raise FileNotFoundError("python missing")

    with pytest.raises(FileNotFoundError):
        platform.spawn_with_breakaway_fallback(start, windows=True)


def test_posix_start_uses_no_creation_flags() -> None:
    """On POSIX the flags are 0 (start_new_session detaches)."""
    seen: list[int] = []

    def start(flags: int) -> subprocess.Popen[bytes]:
        seen.append(flags)
        return cast("subprocess.Popen[bytes]", object())

    platform.spawn_with_breakaway_fallback(start, windows=False)
    assert [0] == seen
