"""Shared fixtures: real stores (folder, SeaweedFS, moto), the non-conforming rclone server.

The SeaweedFS and moto servers start once per test session on free loopback ports;
each test gets a fresh prefix (SeaweedFS) or bucket (moto). Credentials for the tests are set in the
environment (monkeypatched), so the real boto3 credential chain is used and
nothing from the machine's own AWS config leaks in.
"""

from __future__ import annotations

import compileall
import gc
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.config import AgentConfig, load_config
from agent.store.base import ObjectStore
from agent.store.local import LocalStore
from tests.faultproxy import FaultProxy
from tests.servers import MotoServer, RcloneS3Server, SeaweedServer, free_port


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package once, in the controller, before any worker starts.

    The suite starts hundreds of agent processes; where ``PYTHONDONTWRITEBYTECODE`` is
    set (as on the project's machines) each of them compiled every module it imported
    again, about 0.13 s per process. ``compileall`` writes the cache files whatever that
    variable says, and Python reads them either way.
    """
    if not hasattr(config, "workerinput"):
        root = Path(__file__).parent.parent
        for package in ("agent", "tests"):  # tests: the helper processes import it too
            compileall.compile_dir(root / package, quiet=1)


# Qt tests (pytest-qt, the Qt host children) draw nowhere: no display is needed.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AGENT_* or AWS_* variable from the machine reaches a test."""
    for name in list(os.environ):
        if name.startswith(("AGENT_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # The lock keeper's 1 s between lock writes is R2's limit, not SeaweedFS's; tests of
    # the spacing itself set lock.write_gap (issue 12).
    monkeypatch.setenv("AGENT_LOCK__WRITE_GAP", "0")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts with structlog's default configuration."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    """A test must stop every thread it started (watchers, uploaders, heartbeats, pools),
    and leave the crash hooks down (the next test starts with the process's own handlers).

    Sessions the test dropped are collected first: a session made on the main thread
    installs the hooks, and one only the cyclic GC frees keeps them (and their relay
    thread) until it is collected or only never-opened ones are left.
    """
    before = set(threading.enumerate())
    crash = sys.modules.get("agent.session.crash")  # not imported: never installed
    up_before = crash is not None and crash.hooks().installed  # an earlier test's failure
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        # A foreign thread that ran Python (a QThreadPool worker) stays listed for good.
        and not isinstance(t, threading._DummyThread)
    ]
    crash = sys.modules.get("agent.session.crash")
    if crash is not None and crash.hooks().installed:
        gc.collect()
        # A session a fixture still holds that never opened (IDLE: no lock, no files)
        # keeps the hooks; the test is over, so it is unregistered here.
        from agent.state import SessionState

        for idle in crash.hooks().live_sessions():
            if idle.state in (SessionState.IDLE, SessionState.CLOSED):
                crash.unregister(idle)
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert [] == still, f"threads left running: {still}"
    if crash is not None and not up_before:
        live = [str(s.state) for s in crash.hooks().live_sessions()]
        assert not crash.hooks().installed, f"crash hooks left installed by sessions {live}"


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    """One SeaweedFS server for the whole test session."""
    server = SeaweedServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1 for the whole test session (it ignores the copy pin)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rclone_server() -> Iterator[RcloneS3Server]:
    """rclone's S3 server (ignores conditional writes), for the capability probe."""
    server = RcloneS3Server()
    server.start()
    yield server
    server.stop()


def _bucket_name() -> str:
    return f"pdt-{uuid.uuid4().hex[:20]}"


@pytest.fixture(scope="session")
def shared_bucket(seaweed: SeaweedServer) -> str:
    """One bucket for the test session: every bucket costs SeaweedFS volumes, and
    `weed mini` answers 500 once a few dozen exist; tests get fresh prefixes instead."""
    bucket = _bucket_name()
    seaweed.create_bucket(bucket)
    return bucket


@pytest.fixture
def s3_env(
    seaweed: SeaweedServer, shared_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A fresh prefix in the shared bucket; the environment that points the agent at it."""
    bucket = shared_bucket
    env = seaweed.env()
    env["AGENT_STORE__URL"] = f"s3://{bucket}/t{uuid.uuid4().hex[:12]}"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return env


def s3_config(env: dict[str, str], base_dir: Path, **sections: Any) -> AgentConfig:
    """An AgentConfig for the bucket in ``env`` (what a subprocess would load)."""
    store = {
        "url": env["AGENT_STORE__URL"],
        "endpoint_url": env["AGENT_STORE__ENDPOINT_URL"],
        "region": "us-east-1",
        **sections.pop("store", {}),
    }
    return load_config(
        store=store,
        paths={"base_dir": str(base_dir)},
        retry=sections.pop("retry", {"attempts": 3, "initial_backoff": 0.05, "max_backoff": 0.2}),
        **sections,
    )


# Through the fault proxy: short timeouts so a held request times out quickly, few
# fast retries so a test that loses answers stays fast.
PROXY_READ_TIMEOUT = 2.0
PROXY_RETRY = {"attempts": 4, "initial_backoff": 0.01, "max_backoff": 0.05, "jitter": 0}


@pytest.fixture
def fault_proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's SeaweedFS (no rules yet)."""
    proxy = FaultProxy(seaweed.endpoint).start()
    yield proxy
    proxy.stop()


def proxy_env(env: dict[str, str], proxy: FaultProxy) -> dict[str, str]:
    """``env`` with the agent pointed at ``proxy`` (for a CLI subprocess)."""
    return {
        **env,
        "AGENT_STORE__ENDPOINT_URL": proxy.endpoint,
        "AGENT_STORE__READ_TIMEOUT": str(PROXY_READ_TIMEOUT),
        "AGENT_STORE__CONNECT_TIMEOUT": "1",
        "AGENT_RETRY__ATTEMPTS": str(PROXY_RETRY["attempts"]),
        "AGENT_RETRY__INITIAL_BACKOFF": str(PROXY_RETRY["initial_backoff"]),
        "AGENT_RETRY__MAX_BACKOFF": str(PROXY_RETRY["max_backoff"]),
        "AGENT_RETRY__JITTER": "0",
    }


def proxy_config(
    env: dict[str, str], proxy: FaultProxy, base_dir: Path, **sections: Any
) -> AgentConfig:
    """An AgentConfig for the bucket in ``env``, reached through ``proxy``."""
    store = {
        "endpoint_url": proxy.endpoint,
        "read_timeout": PROXY_READ_TIMEOUT,
        "connect_timeout": 1.0,
        **sections.pop("store", {}),
    }
    retry = {**PROXY_RETRY, **sections.pop("retry", {})}
    return s3_config(env, base_dir, store=store, retry=retry, **sections)


@pytest.fixture
def s3_store(s3_env: dict[str, str], tmp_path: Path) -> Iterator[ObjectStore]:
    """The real S3Store on a fresh SeaweedFS bucket and prefix."""
    from agent.store import open_store

    store = open_store(s3_config(s3_env, tmp_path / "s3cfg"))
    yield store
    store.close()


@pytest.fixture
def moto_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket on the session's moto server; the environment that points the agent
    at it (moto keeps conditional writes but ignores the copy pin, issue 18)."""
    bucket = _bucket_name()
    moto.create_bucket(bucket)
    env = moto.env()
    env["AGENT_STORE__URL"] = f"s3://{bucket}/t"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return env


@pytest.fixture
def moto_store(moto_env: dict[str, str], tmp_path: Path) -> Iterator[ObjectStore]:
    """The real S3Store on a fresh moto bucket (a co-worker's view, for planting and reading)."""
    from agent.store import open_store

    store = open_store(s3_config(moto_env, tmp_path / "motocfg"))
    yield store
    store.close()


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """The embedded folder store in a fresh folder."""
    return LocalStore(tmp_path / "store", create=True)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each backend in turn: the contract both keep."""
    name = "local_store" if request.param == "local" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def rclone_store(
    rclone_server: RcloneS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ObjectStore]:
    """An S3Store pointed at rclone's non-conforming S3 server."""
    from agent.store import open_store

    bucket = _bucket_name()
    rclone_server.create_bucket(bucket)
    for name, value in rclone_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    config = load_config(
        store={
            "url": f"s3://{bucket}/p",
            "endpoint_url": rclone_server.endpoint,
            "region": "us-east-1",
        },
        paths={"base_dir": str(tmp_path / "rc")},
        retry={"attempts": 2, "initial_backoff": 0.05},
    )
    store = open_store(config)
    yield store
    store.close()


@pytest.fixture
def dead_endpoint() -> str:
    """An http endpoint on a loopback port where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
