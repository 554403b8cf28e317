"""Local attacks on a real background agent (issue 9).

Each test attacks a session on the embedded store, its agent's control channel or
state folder, the way another program or user on the machine could, and then checks
the session is unharmed: the agent is alive, the lock is still held by the session,
and a save still streams to the store. The attacks that leave everything as they
found it share one session per module (``attacked``); the rest open their own.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.platform import pid_alive
from tests.cli.conftest import Run, cli_env, cli_runner, stop_agents_under
from tests.waiting import wait_for


class Opened:
    """A session opened by the CLI, with what the attacks need."""

    def __init__(self, run: Run, base: Path) -> None:
        self.run = run
        self.base = base
        result = run("open", "Secure_1", "--user", "alice", "--stage", "planning", "--json")
        assert 0 == result.returncode, result.stderr
        info = json.loads(result.stdout)
        self.work = Path(info["path"])
        self.pid = int(info["agent_pid"])
        self.session_id = str(info["session_id"])
        self.folder = base / "state" / "sessions" / self.session_id
        record = json.loads((self.folder / "session.json").read_text())
        self.socket = Path(record["agent_address"])
        self.saves = 0

    @property
    def token(self) -> str:
        return (self.folder / "token").read_text().strip()

    def assert_unharmed(self) -> None:
        """The agent lives, the lock is the session's, a new save streams to the store."""
        assert pid_alive(self.pid), "the background agent died"
        lock = self.run("lock", "show", "Secure_1", "--stage", "planning", "--json")
        assert 0 == lock.returncode, lock.stderr
        body = json.loads(lock.stdout)["lock"]["body"]
        assert ("held", self.session_id) == (body["state"], body["session_id"])
        self.saves += 1
        (self.work / f"save{self.saves}.txt").write_text(f"edit {self.saves}")
        flushed = self.run("flush", "--json", "--timeout", "30")
        assert 0 == flushed.returncode, flushed.stdout + flushed.stderr
        [row] = json.loads(self.run("status", "--json").stdout)["sessions"]
        assert ("running", 0) == (row["agent"], row["pending"])

    def logged(self, event: str) -> int:
        """How many times ``event`` is in the log files so far."""
        return sum(p.read_text().count(event) for p in (self.base / "state" / "logs").glob("*.log"))

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.socket))
        return sock


@pytest.fixture
def opened(run: Run, tmp_path: Path) -> Iterator[Opened]:
    """An open session with its background agent; aborted at the end."""
    session = Opened(run, tmp_path / "base")
    yield session
    if pid_alive(session.pid):
        run("abort")


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Opened]:
    """One session for the attacks that leave everything as they found it.

    Each of those tests attacks it and then checks it unharmed (``assert_unharmed``),
    so a harm is found by the test that did it; opening a session per attack cost
    each an open and an abort (two agent starts). Aborted at the end; its agent must
    be gone then.
    """
    base = tmp_path_factory.mktemp("attacked")
    with cli_env(base / "base") as env:
        run = cli_runner(env)
        session = Opened(run, base / "base")
        try:
            yield session
        finally:
            if pid_alive(session.pid):
                aborted = run("abort")
                assert 0 == aborted.returncode, aborted.stderr
            assert [] == stop_agents_under(base), "the attacked session's agent outlived it"


def _frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">I", len(data)) + data


def _read_reply(sock: socket.socket) -> dict[str, Any]:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            raise EOFError("closed")
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError("closed")
        body += chunk
    reply: dict[str, Any] = json.loads(body)
    return reply


def _closed_by_peer(sock: socket.socket) -> bool:
    """The agent closed the connection (EOF or reset) without answering."""
    try:
        return b"" == sock.recv(1)
    except ConnectionResetError:
        return True


def test_connect_and_close_at_once_does_not_end_the_session(attacked: Opened) -> None:
    """A client that connects and hangs up at once (a port scanner) changes nothing."""
    for _ in range(20):
        attacked.connect().close()
    attacked.assert_unharmed()


def test_an_http_request_is_dropped_and_the_session_goes_on(attacked: Opened) -> None:
    """A browser's or health checker's GET is not a request: dropped, no answer."""
    with attacked.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _closed_by_peer(sock)
    attacked.assert_unharmed()


def test_two_hundred_connections_of_random_bytes_leave_the_agent_serving(
    attacked: Opened,
) -> None:
    """Random bytes (bad lengths, huge lengths, garbage JSON) are each dropped."""
    rng = random.Random(9)
    bad_before = attacked.logged("control_client_bad_request")  # the attack's own, below
    for i in range(200):
        with attacked.connect() as sock:
            if i % 4 == 0:
                payload = struct.pack(">I", rng.randrange(2**20, 2**32))  # over the cap
            elif i % 4 == 1:
                junk = rng.randbytes(rng.randrange(1, 200))
                payload = struct.pack(">I", len(junk)) + junk  # a frame of garbage
            else:
                payload = rng.randbytes(rng.randrange(1, 2000))
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(4096)
            except OSError:
                pass  # dropped while we were still sending: that is the point
    attacked.assert_unharmed()
    assert attacked.logged("control_client_bad_request") > bad_before


def test_a_silent_connection_does_not_stall_status(attacked: Opened) -> None:
    """While a client holds a connection open and sends nothing, status still answers."""
    with attacked.connect() as silent:
        status = attacked.run("status", "--json")
        assert 0 == status.returncode, status.stderr
        [row] = json.loads(status.stdout)["sessions"]
        assert "running" == row["agent"]
        # The silent client is dropped once its handshake deadline passes.
        silent.settimeout(30)
        assert _closed_by_peer(silent)
    attacked.assert_unharmed()


def test_a_wrong_token_is_refused_and_ends_nothing(attacked: Opened) -> None:
    """A well-formed ``abort`` with a wrong token is refused; the session stays open."""
    with attacked.connect() as sock:
        sock.sendall(_frame({"token": "0" * 64, "cmd": "abort", "args": {}}))
        reply = _read_reply(sock)
    assert "wrong token" in reply["error"]["message"]
    with attacked.connect() as sock:
        sock.sendall(_frame({"cmd": "close"}))  # no token at all
        assert "wrong token" in _read_reply(sock)["error"]["message"]
    attacked.assert_unharmed()


def test_the_right_token_answers_over_the_raw_protocol(attacked: Opened) -> None:
    """The protocol is plain framed JSON: with the session's token, ping answers."""
    with attacked.connect() as sock:
        sock.sendall(_frame({"token": attacked.token, "cmd": "ping", "args": {}}))
        reply = _read_reply(sock)
    assert {"pid": attacked.pid} == reply["ok"]


def _nobody() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def test_a_peer_of_another_uid_is_refused_even_with_the_token(attacked: Opened) -> None:
    """SO_PEERCRED: a process of another user is dropped although it has the token.

    The socket's folder and file are opened up for the test, so only the peer
    check stands between the other user and the agent.
    """
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (the tests run as an ordinary user)")
    uid, gid = _nobody()
    folder = attacked.socket.parent
    old_dir, old_sock = folder.stat().st_mode, attacked.socket.stat().st_mode
    folder.chmod(0o711)
    attacked.socket.chmod(0o777)
    token = attacked.token
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 3
            try:
                os.setgid(gid)
                os.setuid(uid)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(str(attacked.socket))
                try:
                    sock.sendall(_frame({"token": token, "cmd": "abort", "args": {}}))
                    code = 0 if _closed_by_peer(sock) else 1
                except OSError:
                    code = 0  # reset before we could even send: refused
            except BaseException:  # noqa: BLE001 - the forked child must reach os._exit
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        folder.chmod(stat.S_IMODE(old_dir))
        attacked.socket.chmod(stat.S_IMODE(old_sock))
    assert 0 == os.waitstatus_to_exitcode(status)
    attacked.assert_unharmed()


def test_a_loosened_state_folder_is_refused_with_exit_20(attacked: Opened) -> None:
    """A state folder others can write to: every command refuses it, naming folder and fix."""
    state = attacked.base / "state"
    state.chmod(0o777)
    try:
        refused = attacked.run("status")
        assert 20 == refused.returncode, refused.stderr
        assert str(state) in refused.stderr
        assert "chmod 700" in refused.stderr
        assert 20 == attacked.run("close").returncode
    finally:
        state.chmod(0o700)
    attacked.assert_unharmed()


def test_a_forged_record_address_is_not_trusted(attacked: Opened, tmp_path: Path) -> None:
    """A record pointing at someone else's listener: the client refuses to talk to it."""
    listener_path = Path(f"/tmp/pdt-forged-{os.getpid()}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(listener_path))
    listener.listen(1)
    listener.settimeout(0.1)
    record_path = attacked.folder / "session.json"
    good = record_path.read_bytes()
    forged = json.loads(good)
    forged["agent_address"] = str(listener_path)
    record_path.write_text(json.dumps(forged))
    try:
        status = attacked.run("status", "--json")
        [row] = json.loads(status.stdout)["sessions"]
        assert "not trusted" in row["agent_error"]
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected to the forged address
    finally:
        record_path.write_bytes(good)
        listener.close()
        listener_path.unlink()
    attacked.assert_unharmed()


def test_a_forged_record_cannot_make_abort_delete_outside_the_base_folder(
    run: Run, tmp_path: Path
) -> None:
    """A record whose working folder lies outside the base folder is refused, nothing deleted."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    folder = tmp_path / "base" / "state" / "sessions" / "20260101T000000-deadbeef"
    folder.mkdir(parents=True)
    for part in (folder, folder.parent, folder.parent.parent):
        part.chmod(0o700)
    (folder / "session.json").write_text(
        json.dumps(
            {
                "session_id": "20260101T000000-deadbeef",
                "projekt_id": "P",
                "stage": "s",
                "user": "mallory",
                "machine": "m",
                "pid": 999999,
                "work_path": str(victim),
                "phase": "active",
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
            }
        )
    )
    for args in (("abort",), ("recover", "--discard", "--yes")):
        result = run(*args)
        assert result.returncode in (15, 16), result.stderr
    assert "keep me" == (victim / "precious.txt").read_text()


def test_planted_links_at_temp_names_are_never_followed(opened: Opened, tmp_path: Path) -> None:
    """Links planted where a private file's temp would go (old fixed names) are not used."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    for name in ("session.json", "token", "base.json"):
        (opened.folder / f".{name}.tmp").symlink_to(victim)
    opened.assert_unharmed()
    closed = opened.run("close", "--json")
    assert 0 == closed.returncode, closed.stderr
    assert "untouched" == victim.read_text()


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The agent runs with umask 000 (everything it creates would be world-writable)."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_everything_under_the_state_folder_is_owner_only(
    loose_umask: None, opened: Opened, tmp_path: Path
) -> None:
    """Folders 0700 and files 0600 under the state folder, whatever the umask."""
    opened.assert_unharmed()
    state = opened.base / "state"
    found = []
    for root, dirs, files in os.walk(state):
        for name in dirs:
            found.append((Path(root, name), 0o700))
        for name in files:
            found.append((Path(root, name), 0o600))
    assert len(found) > 5
    wrong = {
        str(path.relative_to(state)): f"{stat.S_IMODE(path.lstat().st_mode):04o}"
        for path, mode in found
        if stat.S_IMODE(path.lstat().st_mode) != mode
    }
    assert {} == wrong
    assert 0o700 == stat.S_IMODE(state.stat().st_mode)
    assert 0o700 == stat.S_IMODE(opened.socket.parent.stat().st_mode)
    assert 0o600 == stat.S_IMODE(opened.socket.stat().st_mode)


def test_status_says_the_agent_does_not_respond_when_it_is_stopped(attacked: Opened) -> None:
    """A stopped (SIGSTOP) agent: status answers within its bound, saying so."""
    import signal

    os.kill(attacked.pid, signal.SIGSTOP)
    try:
        status = attacked.run("status", "--json")
    finally:
        os.kill(attacked.pid, signal.SIGCONT)
    assert 0 == status.returncode, status.stderr
    [row] = json.loads(status.stdout)["sessions"]
    assert "does not respond" in row["agent_error"]
    assert wait_for(lambda: pid_alive(attacked.pid), 5)
    attacked.assert_unharmed()


def test_a_control_folder_others_can_write_to_is_refused(
    run: Run, agent_env: dict[str, str], tmp_path: Path
) -> None:
    """A runtime folder that is not private: open refuses with exit 20 and keeps no lock."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pdt-run-"))
    try:
        folder.chmod(0o777)
        env = dict(agent_env, AGENT_PATHS__RUNTIME_DIR=str(folder))
        refused = run("open", "Secure_2", "--user", "alice", "--stage", "planning", env=env)
        assert 20 == refused.returncode, refused.stderr
        assert str(folder) in refused.stderr
        shown = run("lock", "show", "Secure_2", "--stage", "planning", "--json")
        assert "released" == json.loads(shown.stdout)["lock"]["body"]["state"]
    finally:
        folder.rmdir()
