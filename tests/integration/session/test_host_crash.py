"""Crash hooks in real host processes (issue 10): Qt idling in C++, plain Python, workers.

Each host is a child process (``tests/hosts.py``) that uses only the seed's calls;
the test writes edits into its working folder, sends a signal, and then checks
from outside: the edits were saved, the lock released, and resume + close
commits every one of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import UnsavedWorkError
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.children import ChildOutput, as_from_a_terminal
from tests.conftest import s3_config
from tests.integration.bucket import lock_state, resume_and_close_commits, write_files

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
ROOT = Path(__file__).resolve().parents[3]
EDITS = {"plan.dwg": b"edited plan", "sub/notes.txt": b"notes", "new.step": b"new part"}


class Host:
    """One child host process and the JSON lines it printed."""

    def __init__(
        self, mode: str, env: dict[str, str], base: Path, ignored: tuple[str, ...] = ()
    ) -> None:
        """``ignored``: signals the host starts with ignored (else as from a terminal)."""
        self.env = {
            **os.environ,
            **env,
            "AGENT_PATHS__BASE_DIR": str(base),
            "AGENT_LOCK__HEARTBEAT_INTERVAL": "3600",
            "AGENT_LOCK__STALE_AFTER": "7200",
            "AGENT_WATCH__DEBOUNCE": "0.05",
            "AGENT_RECOVERY__CRASH_TIMEOUT": "5",
            "PYTHONPATH": str(ROOT),
        }
        self.proc = subprocess.Popen(
            as_from_a_terminal([sys.executable, "-m", "tests.hosts", mode], ignored),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output = ChildOutput(self.proc)
        self.lines: list[dict[str, Any]] = []
        self.err = ""

    def read(self, timeout: float = 120) -> dict[str, Any]:
        """The next JSON line (skipping anything else the host printed)."""
        try:
            data = self.output.next(timeout)
        except queue.Empty:
            raise AssertionError(
                f"the host printed nothing for {timeout} s\n{self._diagnose()}"
            ) from None
        if data is None:
            self.finish()
            raise AssertionError(f"host ended early: {self.err}")
        self.lines.append(data)
        return data

    def stderr(self) -> str:
        """What the host wrote to stderr (after ``finish``)."""
        return self.err

    def finish(self, timeout: float = 60) -> int:
        """Wait for the host to end (its stdin closed, as ``communicate`` does); its exit
        status, and every line it printed in ``lines``.

        A host still running after ``timeout`` fails the test with what it was doing:
        its signal state (``/proc``) and every thread's stack (``faulthandler`` on
        SIGUSR2, registered by ``tests.hosts``), then it is killed.
        """
        if not self.output.ended(timeout):
            raise AssertionError(f"the host is still running after {timeout} s\n{self._diagnose()}")
        self.lines += self.output.rest()
        self.err = self.output.stderr()
        return self.proc.returncode

    def _diagnose(self) -> str:
        """The running host's signal masks and its threads' stacks; the host is ended."""
        try:
            with Path(f"/proc/{self.proc.pid}/status").open() as status:
                sig = "".join(line for line in status if line.startswith(("Sig", "Shd")))
        except OSError as exc:
            sig = f"(no /proc status: {exc})"
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGUSR2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.output.rest()
        out, err = self.output.stdout(), self.output.stderr()
        return f"{sig}stdout:\n{out[-4000:]}\nstderr (stacks at the end):\n{err[-12000:]}"

    def kill(self) -> None:
        """Make sure the process is gone."""
        self.output.kill()


@pytest.fixture
def host_env(s3_env: dict[str, str]) -> dict[str, str]:
    """The agent's environment for a host child."""
    return s3_env


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Hosts started by a test are gone after it."""
    started: list[Host] = []
    yield started
    for h in started:
        h.kill()


def _start(hosts: list[Host], mode: str, env: dict[str, str], base: Path) -> tuple[Host, Path]:
    h = Host(mode, env, base)
    hosts.append(h)
    return h, Path(h.read()["ready"])


@pytest.fixture
def qt() -> None:
    """These hosts need PySide6 (the ``qt`` extra)."""
    pytest.importorskip("PySide6")


@pytest.mark.usefixtures("qt")
@pytest.mark.parametrize("mode", ["qt-seed", "qt-worker-open"])
def test_sigterm_to_an_idle_qt_host_with_only_the_seeds_calls_saves_and_releases(
    mode: str, host_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[Host]
) -> None:
    """Qt idles in C++ (no Python timer): the relay saves, releases, and ends the process."""
    h, work = _start(hosts, mode, host_env, tmp_path / "m")
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGTERM)
    code = h.finish()
    assert code in (128 + signal.SIGTERM, -signal.SIGTERM), h.stderr()
    resume_and_close_commits(host_env, tmp_path / "m", s3_store, work, EDITS)


@pytest.mark.usefixtures("qt")
def test_a_qt_hosts_own_sigterm_handler_is_chained_and_it_quits_cleanly(
    host_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[Host]
) -> None:
    """Host's wake-up fd + notifier + handler: saved first, then its handler, aboutToQuit, 0."""
    h, work = _start(hosts, "qt-own-handler", host_env, tmp_path / "m")
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGTERM)
    code = h.finish()
    assert 0 == code, h.stderr()
    events = [line["event"] for line in h.lines if "event" in line]
    assert ["host-handler", "about-to-quit", "exited"] == events
    resume_and_close_commits(host_env, tmp_path / "m", s3_store, work, EDITS)


@pytest.mark.usefixtures("qt")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_qt_adapter_saves_on_the_gui_thread_then_quits_the_app(
    sig: signal.Signals,
    host_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    hosts: list[Host],
) -> None:
    """Through agent.qt: the notifier wakes the loop, save, then app.quit(): aboutToQuit, 0."""
    h, work = _start(hosts, "qt-adapter", host_env, tmp_path / "m")
    write_files(work, EDITS)
    h.proc.send_signal(sig)
    assert 0 == h.finish(), h.stderr()
    assert ["about-to-quit", "exited"] == [line["event"] for line in h.lines if "event" in line]
    resume_and_close_commits(host_env, tmp_path / "m", s3_store, work, EDITS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_each_termination_signal_saves_a_plain_python_host(
    sig: signal.Signals,
    host_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    hosts: list[Host],
) -> None:
    """A plain host blocked in Event.wait(): saved, then the default action ends it."""
    h, work = _start(hosts, "plain-idle", host_env, tmp_path / "m")
    write_files(work, EDITS)
    h.proc.send_signal(sig)
    code = h.finish()
    assert code != 0
    resume_and_close_commits(host_env, tmp_path / "m", s3_store, work, EDITS)


def test_a_plain_host_that_exits_without_closing_is_saved_at_exit(
    host_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[Host]
) -> None:
    """Returning from main with the session ACTIVE: the exit hook saves it."""
    h, work = _start(hosts, "plain-exit", host_env, tmp_path / "m")
    write_files(work, EDITS)
    assert h.proc.stdin is not None
    h.proc.stdin.write("\n")
    h.proc.stdin.flush()
    assert 0 == h.finish(), h.stderr()
    resume_and_close_commits(host_env, tmp_path / "m", s3_store, work, EDITS)


@pytest.mark.parametrize("ignored", [(), ("SIGINT", "SIGHUP")], ids=["all-hooked", "nohup-bg"])
def test_open_on_the_main_thread_close_on_a_worker_restores_handlers_and_collects(
    ignored: tuple[str, ...], host_env: dict[str, str], tmp_path: Path, hosts: list[Host]
) -> None:
    """20 cycles: the host's handler comes back each time, sessions are collected, no
    threads; also when SIGTERM is the only signal hooked (a background job under nohup)."""
    h = Host("plain-cycles", host_env, tmp_path / "m", ignored=ignored)
    hosts.append(h)
    result = h.read()
    assert 0 == h.finish(), h.stderr()
    assert [True] * 20 == result["restored"]
    assert 20 == result["collected"]
    assert result["later_kept"], "close overwrote a handler the host set after open"
    assert ["MainThread"] == result["threads"]


def test_the_last_close_on_a_worker_takes_the_hooks_down_though_the_host_replaced_them(
    host_env: dict[str, str], tmp_path: Path, hosts: list[Host]
) -> None:
    """SIGINT and SIGHUP ignored (only SIGTERM hooked), the host's own SIGTERM handler set
    after open, close on a worker: no handler of ours is left to wake the main thread
    with, yet the relay thread ends and the host's wake-up fd is back once the main
    thread runs Python; the host's handler runs only for the real SIGTERM it raises."""
    h = Host("plain-replaced-close", host_env, tmp_path / "m", ignored=("SIGINT", "SIGHUP"))
    hosts.append(h)
    result = h.read()
    assert 0 == h.finish(), h.stderr()
    assert ["SIGINT", "SIGHUP"] == result["ignored"]
    assert ["SIGTERM"] == result["hooked"]
    assert result["relay_ended"], result["threads"]
    assert ["MainThread"] == result["threads"]
    assert result["wakeup_is_hosts"], "the host's wake-up fd was not put back"
    assert result["handlers_kept"], "close overwrote a handler the host set after open"
    host_calls = [line for line in h.lines if line.get("event") == "host-handler"]
    assert [{"event": "host-handler", "signal": int(signal.SIGTERM)}] == host_calls
    assert [int(signal.SIGTERM)] == h.lines[-1]["host_wakeup"]
    assert "crash_hooks_replaced_by_host" not in h.stderr()


@contextlib.contextmanager
def _ignoring(*signums: signal.Signals) -> Iterator[None]:
    """The test process ignores ``signums`` meanwhile (as under ``nohup pytest &``)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_host_starts_with_a_terminals_signal_handlers_whatever_the_test_process_ignores(
    host_env: dict[str, str], tmp_path: Path, hosts: list[Host]
) -> None:
    """pytest started under ``nohup ... &`` ignores SIGINT and SIGHUP; a host it starts
    does not (it would outlive the SIGINT/SIGHUP a test ends it with), but for a signal
    the test has it ignore on purpose."""
    with _ignoring(signal.SIGINT, signal.SIGHUP):
        plain = Host("signal-state", host_env, tmp_path / "m")
        nohup = Host("signal-state", host_env, tmp_path / "m", ignored=("SIGHUP",))
    hosts += [plain, nohup]
    assert {"SIGINT": "default_int_handler", "SIGHUP": "SIG_DFL", "SIGTERM": "SIG_DFL"} == (
        plain.read()
    )
    assert {"SIGINT": "default_int_handler", "SIGHUP": "SIG_IGN", "SIGTERM": "SIG_DFL"} == (
        nohup.read()
    )
    assert 0 == plain.finish(), plain.stderr()
    assert 0 == nohup.finish(), nohup.stderr()


def test_a_restore_request_is_not_taken_for_a_signal_when_a_new_session_opened_meanwhile(
    host_env: dict[str, str], tmp_path: Path, hosts: list[Host]
) -> None:
    """Our own wake of the main thread (to restore handlers) never saves or ends the process."""
    h = Host("plain-wake-race", host_env, tmp_path / "m")
    hosts.append(h)
    result = h.read()
    assert 0 == h.finish(), h.stderr()
    assert "active" == result["state_after_request"]


def test_sigkill_with_unsynced_edits_lists_them_and_discard_asks_first(
    host_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[Host]
) -> None:
    """kill -9: pending is computed from the folder; the working folder is the backup."""
    h, work = _start(hosts, "plain-idle", host_env, tmp_path / "m")
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGKILL)
    h.finish()
    config = s3_config(host_env, tmp_path / "m")
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None and "unseen" == info.kind
    assert set(EDITS) <= set(info.unsaved)
    assert work == info.backup_path
    assert {"projekt_id": P, "user": "admin", "stage": STAGE, "backup_path": str(work)}.items() <= (
        info.as_dict().items()
    )
    with pytest.raises(UnsavedWorkError) as refused:
        PlantDesignSession(config).discard(info.session_id)
    assert set(EDITS) <= set(refused.value.files)
    assert all((work / rel).exists() for rel in EDITS), "a refused discard deleted files"
    assert "held" == lock_state(s3_store), "kill -9: nobody released the lock"
    PlantDesignSession(config).discard(info.session_id, confirm_loss=info.unsaved)
    assert not work.exists()


def test_ctrl_c_in_a_foreground_cli_session_still_closes_cleanly(
    host_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path
) -> None:
    """`agent open --foreground`: Ctrl-C is the CLI's (close and commit), not a crash save."""
    env = {
        **os.environ,
        **host_env,
        "AGENT_PATHS__BASE_DIR": str(tmp_path / "m"),
        "AGENT_LOCK__HEARTBEAT_INTERVAL": "3600",
        "AGENT_LOCK__STALE_AFTER": "7200",
        "AGENT_WATCH__DEBOUNCE": "0.05",
    }
    argv = ["open", P, "--user", "admin", "--stage", STAGE, "--foreground", "--json"]
    proc = subprocess.Popen(
        as_from_a_terminal([sys.executable, "-m", "agent", *argv]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        work = Path(json.loads(proc.stdout.readline())["path"])
        write_files(work, EDITS)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 0 == proc.returncode, err
    for rel, data in EDITS.items():
        assert data == s3_store.get(KEYS.committed(rel)).body
    config = s3_config(host_env, tmp_path / "m")
    assert PlantDesignSession(config).check_previous_crash() is None
