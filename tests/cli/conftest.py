"""CLI tests run real background agents: none may outlive its test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from agent.platform import pid_alive
from tests.waiting import wait_for

Run = Callable[..., subprocess.CompletedProcess[str]]
"""``run("status", "--json")``: the ``agent`` command in a subprocess, never raising."""


@contextmanager
def cli_env(base: Path) -> Iterator[dict[str, str]]:
    """An environment whose agent writes only under ``base`` and reads no user config.

    The control sockets go to a runtime folder of its own (short, under /tmp, so a
    socket path fits), so a test that opens it up touches no other run, and no socket
    outlives the environment.
    """
    runtime = Path(tempfile.mkdtemp(prefix="pdr-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))}
    env["AGENT_PATHS__BASE_DIR"] = str(base)
    env["AGENT_PATHS__RUNTIME_DIR"] = str(runtime)
    try:
        yield env
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def cli_runner(agent_env: dict[str, str]) -> Run:
    """``run``: ``agent ARGS`` in ``agent_env`` (or the ``env`` given), never raising."""

    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=env or agent_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return _run


@pytest.fixture
def agent_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """``cli_env`` under tmp_path: the test's own agent state and control sockets."""
    with cli_env(tmp_path / "base") as env:
        yield env


@pytest.fixture
def run(agent_env: dict[str, str]) -> Run:
    """Run ``agent ARGS`` and return the completed process (never raises on exit codes)."""
    return cli_runner(agent_env)


@pytest.fixture
def s3_run(s3_env: dict[str, str], tmp_path: Path) -> Run:
    """``run``, on the test's SeaweedFS prefix (the one ``s3_store`` uses) instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))}
    env.update(s3_env)
    env["AGENT_PATHS__BASE_DIR"] = str(tmp_path / "base")

    def _run(
        *args: str, more_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env={**env, **(more_env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return _run


def agents_under(folder: Path) -> list[int]:
    """Live ``agent _serve`` processes whose base dir lies in ``folder`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"_serve" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(b"AGENT_PATHS__BASE_DIR=") and var.split(b"=", 1)[1].startswith(
                os.fsencode(folder)
            ):
                found.append(int(entry.name))
    return [pid for pid in found if pid_alive(pid)]


def _gone(pid: int) -> bool:
    return not pid_alive(pid)


@pytest.fixture(autouse=True)
def _no_agent_left_running(tmp_path: Path) -> Iterator[None]:
    """After closing, aborting or being killed, a test's background agents are gone."""
    yield
    assert [] == stop_agents_under(tmp_path), "background agents still running after the test"


def stop_agents_under(folder: Path) -> list[int]:
    """The agents under ``folder`` that did not end within 10 s, killed (-9) then."""
    left = [p for p in agents_under(folder) if not wait_for(partial(_gone, p), 10)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left
