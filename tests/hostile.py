"""A hostile S3 endpoint on 127.0.0.1: answers that a broken or malicious bucket could give.

::

    with HostileS3() as server:
        server.listing = "endless"          # what ListObjectsV2 answers
        server.objects["a/b.lock.json"] = b"{}"
        server.huge_objects["a/x.json"] = 300 * MiB
        ...                                 # point an S3 store at server.endpoint

Every request is accepted whatever its signature (no SigV4 check). Path-style:
``/<bucket>?list-type=2...`` is a listing, ``/<bucket>/<key>`` an object.
``listing`` picks the listing's behaviour:

- ``"endless"``: every page truncated, one new key and a fresh token each time;
- ``"same_token"``: every page truncated with the same continuation token;
- ``"no_progress"``: fresh tokens, but every page lists the same key again;
- ``"empty"``: fresh tokens, truncated pages with nothing on them;
- ``"trickle"``: a page whose body comes one byte every ``trickle_interval``
  seconds and never ends (no ``Content-Length``);
- ``"huge"``: a page declaring (``Content-Length``) ``huge_size`` bytes of entries;
- ``"huge_undeclared"``: the same without ``Content-Length`` (read until closed);
- ``"bomb"``: an XML entity bomb ("billion laughs");
- ``"ok"``: one complete page of ``keys`` and the objects' keys under the prefix
  (with ``delimiter``: the objects directly in it and its sub-prefixes).

An object in ``objects`` is answered with its bytes; one in ``huge_objects``
with that many bytes (generated, never held), sent until the client hangs up;
one in ``undeclared_objects`` the same without a ``Content-Length`` (read until
the connection closes).
HEAD of the bucket answers 200 with a ``Date``. ``requests`` counts requests
by kind. Threads are named ``pdagent-hostile-*`` (the thread-leak check sees them).

``run_measured`` runs a command and reports its own peak resident memory (its
``VmHWM``, read while it runs; not ``ru_maxrss``, which survives ``exec``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HostileS3", "Measured", "run_measured"]

_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_ENTRY = (
    "<Contents><Key>{key}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
    '<ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag><Size>1</Size></Contents>'
)
_BOMB = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">'
    '<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">'
    '<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">'
    '<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">'
    '<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">'
    '<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">'
    '<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>\n'
    f'<ListBucketResult xmlns="{_NS}"><IsTruncated>false</IsTruncated>'
    "<Contents><Key>&lol9;</Key><Size>1</Size></Contents></ListBucketResult>"
)


def _page(keys: Sequence[str], *, token: str | None, prefix: str = "") -> bytes:
    more = (
        f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
        if token is not None
        else "<IsTruncated>false</IsTruncated>"
    )
    entries = "".join(_ENTRY.format(key=quote(k, safe="/")) for k in keys)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_NS}">'
        f"<Name>b</Name><Prefix>{quote(prefix, safe='/')}</Prefix><KeyCount>{len(keys)}</KeyCount>"
        f"<MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType>{more}{entries}"
        "</ListBucketResult>"
    ).encode()


class HostileS3:
    """The server; ``start()``/``stop()`` or a ``with`` block."""

    def __init__(self) -> None:
        self.listing = "ok"
        self.keys: list[str] = []
        self.objects: dict[str, bytes] = {}
        self.huge_objects: dict[str, int] = {}
        self.undeclared_objects: dict[str, int] = {}
        self.huge_size = 1024**3
        self.trickle_interval = 1.0
        self.requests: Counter[str] = Counter()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            server_owner: ClassVar[HostileS3] = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="pdagent-hostile-server",
            daemon=True,
        )

    def count(self, kind: str) -> None:
        """Count one request of ``kind``."""
        with self._lock:
            self.requests[kind] += 1

    def start(self) -> HostileS3:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering; bodies still being sent end within a trickle interval."""
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def env(self) -> dict[str, str]:
        """Credentials (any will do: nothing is checked)."""
        return {
            "AWS_ACCESS_KEY_ID": "hostile",
            "AWS_SECRET_ACCESS_KEY": "hostile-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def cli_env(self, home: Path, **extra: str) -> dict[str, str]:
        """The environment of an ``agent`` process against this endpoint: a private HOME
        and base folder, no AWS files, two tries, the agent under test on PYTHONPATH
        (a worktree or a checkout); ``extra`` adds or overrides variables."""
        return {
            **self.env(),
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AGENT_PATHS__BASE_DIR": str(home / "base"),
            "AGENT_STORE__URL": "s3://bucket/p",
            "AGENT_STORE__ENDPOINT_URL": self.endpoint,
            "AGENT_STORE__REGION": "us-east-1",
            "AGENT_RETRY__ATTEMPTS": "2",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **extra,
        }

    def __enter__(self) -> HostileS3:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_owner: ClassVar[HostileS3]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Date", formatdate(usegmt=True))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, body: bytes, content_type: str = "application/xml") -> None:
        self._head(200, {"Content-Type": content_type, "Content-Length": str(len(body))})
        self.wfile.write(body)

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_HEAD(self) -> None:
        """A bucket (or object) that exists."""
        owner = self.server_owner
        owner.count("head")
        _bucket, _, key = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        size = len(owner.objects.get(key, b""))
        self._head(200, {"Content-Length": str(size), "ETag": '"0"'})

    def do_PUT(self) -> None:
        """Any write succeeds (the probe of conditional writes is not what is tested)."""
        self.server_owner.count("put")
        self._discard_body()
        self._head(200, {"ETag": '"0"', "Content-Length": "0"})

    def do_DELETE(self) -> None:
        """Any delete succeeds."""
        self.server_owner.count("delete")
        self._head(204, {})

    def do_GET(self) -> None:
        """A listing (``list-type=2``) or an object."""
        owner = self.server_owner
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        _bucket, _, key = unquote(split.path).lstrip("/").partition("/")
        with contextlib.suppress(OSError):
            if "list-type" in query:
                owner.count("list")
                self._listing(owner, query)
            elif key in owner.huge_objects:
                owner.count("get")
                self._huge(owner.huge_objects[key], declared=True, unit=b" " * 65536)
            elif key in owner.undeclared_objects:
                owner.count("get")
                self._huge(owner.undeclared_objects[key], declared=False, unit=b" " * 65536)
            elif key in owner.objects:
                owner.count("get")
                self._send(owner.objects[key], "application/json")
            else:
                owner.count("get")
                body = b"<Error><Code>NoSuchKey</Code><Message>none</Message></Error>"
                self._head(
                    404, {"Content-Type": "application/xml", "Content-Length": str(len(body))}
                )
                self.wfile.write(body)

    def _listing(self, owner: HostileS3, query: dict[str, list[str]]) -> None:
        token = query.get("continuation-token", [""])[0]
        prefix = query.get("prefix", [""])[0]
        n = int(token.removeprefix("t")) if token.startswith("t") else 0
        mode = owner.listing
        if mode == "endless":
            self._send(_page([f"{prefix}k{n:09d}"], token=f"t{n + 1}", prefix=prefix))
        elif mode == "same_token":
            self._send(_page([f"{prefix}k{owner.requests['list']:09d}"], token="same"))
        elif mode == "no_progress":
            self._send(_page([f"{prefix}k000000000"], token=f"t{n + 1}", prefix=prefix))
        elif mode == "empty":
            self._send(_page([], token=f"t{n + 1}", prefix=prefix))
        elif mode == "trickle":
            self._trickle(owner)
        elif mode in ("huge", "huge_undeclared"):
            entries = "".join(_ENTRY.format(key=f"{prefix}k{i:09d}") for i in range(1000))
            self._huge(owner.huge_size, declared=mode == "huge", unit=entries.encode())
        elif mode == "bomb":
            self._send(_BOMB.encode())
        else:
            self._send(self._level(owner, prefix, query.get("delimiter", [""])[0]))

    @staticmethod
    def _level(owner: HostileS3, prefix: str, delimiter: str) -> bytes:
        """One complete page of every known key under ``prefix`` (rolled up by ``delimiter``)."""
        keys = sorted({*owner.keys, *owner.objects, *owner.huge_objects, *owner.undeclared_objects})
        objects, subs = [], set()
        for key in keys:
            if not key.startswith(prefix):
                continue
            head, cut, _rest = key[len(prefix) :].partition(delimiter or "\0")
            if delimiter and cut:
                subs.add(prefix + head + delimiter)
            else:
                objects.append(key)
        page = _page(objects, token=None, prefix=prefix)
        common = "".join(
            f"<CommonPrefixes><Prefix>{quote(sub, safe='/')}</Prefix></CommonPrefixes>"
            for sub in sorted(subs)
        )
        return page.replace(b"</ListBucketResult>", common.encode() + b"</ListBucketResult>")

    def _trickle(self, owner: HostileS3) -> None:
        """A page that never ends, one byte at a time (the idle timeout never fires)."""
        self._head(200, {"Content-Type": "application/xml", "Connection": "close"})
        self.close_connection = True
        start = f'<?xml version="1.0"?><ListBucketResult xmlns="{_NS}">'.encode()
        self.wfile.write(start[:1])
        self.wfile.flush()
        for byte in _forever(start[1:] + b" "):
            if owner.stopping.wait(owner.trickle_interval):
                return
            self.wfile.write(byte)
            self.wfile.flush()

    def _huge(self, size: int, *, declared: bool, unit: bytes) -> None:
        """``size`` bytes of ``unit`` repeated, until the client hangs up."""
        headers = {"Content-Type": "application/octet-stream"}
        if declared:
            headers["Content-Length"] = str(size)
        else:
            headers["Connection"] = "close"
            self.close_connection = True
        self._head(200, headers)
        if not declared and unit.startswith(b"<"):  # a listing page
            self.wfile.write(f'<?xml version="1.0"?><ListBucketResult xmlns="{_NS}">'.encode())
        sent = 0
        while sent < size and not self.server_owner.stopping.is_set():
            piece = unit[: size - sent]
            self.wfile.write(piece)
            sent += len(piece)


def _forever(head: bytes) -> Any:
    """Each byte of ``head``, then spaces, one at a time, without end."""
    for i in range(len(head)):
        yield head[i : i + 1]
    while True:
        yield b" "


@dataclass(frozen=True)
class Measured:
    """A finished command: exit code, output, and its own peak resident memory."""

    returncode: int
    stdout: str
    stderr: str
    max_rss: int
    """Bytes (Linux reports ``ru_maxrss`` in KiB)."""


def _high_water(pid: int) -> int | None:
    """The process's own peak resident memory so far (``VmHWM``, bytes), if readable."""
    try:
        with open(f"/proc/{pid}/status") as status:  # noqa: PTH123 - a /proc file
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_measured(
    args: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> Measured:
    """Run ``args``; its own peak RSS (killed after ``timeout`` seconds).

    The peak is the child's ``VmHWM``, read every 10 ms while it runs (a high-water
    mark: a later read still sees an earlier peak). Not ``ru_maxrss``: Linux does not
    reset that at ``exec``, so a child of a large pytest process reported the parent's
    size (357 MiB for a command that used 60). ``ru_maxrss`` only where /proc is absent.
    """
    out, err = cwd / f".measured-{os.getpid()}.out", cwd / f".measured-{os.getpid()}.err"
    peak = 0
    done = threading.Event()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr)

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                seen = _high_water(proc.pid)
                if seen is not None:
                    peak = max(peak, seen)
                done.wait(0.01)

        watcher = threading.Thread(target=watch, name="pdagent-hostile-hwm", daemon=True)
        watcher.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.name = "pdagent-hostile-killer"
        killer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            killer.cancel()
            killer.join()
            watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    text_out, text_err = out.read_text(errors="replace"), err.read_text(errors="replace")
    out.unlink()
    err.unlink()
    return Measured(proc.returncode, text_out, text_err, peak or usage.ru_maxrss * 1024)
