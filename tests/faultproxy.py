"""A fault-injecting HTTP/1.1 proxy between the agent and a real S3 server (issue 7).

::

    proxy = FaultProxy(seaweed.endpoint).start()
    rule = proxy.add(Rule(LOSE_ANSWER, method="PUT", path=r"\\.lock\\.json$"))
    ...                                   # point the agent at proxy.endpoint
    assert 1 == rule.fired                # the fault was really injected
    proxy.stop()

The proxy reads each request completely from the client (``Content-Length`` or
chunked body, answering ``Expect: 100-continue`` itself), then asks the rules,
in the order they were added, whether one fires; the first that fires decides:

- ``LOSE_ANSWER``: forward, read the whole upstream answer (so the store applied
  it), close the client connection without replying;
- ``Delay(seconds)``: reply nothing; after ``seconds`` (or ``rule.release()``),
  forward upstream although the client has long given up ("delivered late"),
  then close the client connection; ``rule.delivered`` is set then;
- ``RESET_BEFORE``: reset the client connection, forward nothing;
- ``Status(code)``: answer ``code`` with an S3 XML error body, forward nothing;
- ``Throttle(bytes_per_second)``: forward, then send the store's answer to the
  client at that rate (a slow office link: no pause is longer than a fraction
  of a second, but the whole answer takes as long as the rate says);
- ``CutBody(keep, reset=False)``: forward, then send the store's answer head (its
  ``Content-Length`` unchanged) and only the first ``keep`` bytes of its body,
  and close the client connection (``reset=True``: reset it instead), so the
  client sees a body cut short of the length it was promised.

A rule matches on method, a regex searched in the (unquoted) path, query
parameters and headers that must be present (or absent), and a regex on the
request body; it fires on matches ``skip+1 .. skip+times``, or on every
``every``-th match, or with ``probability`` drawn from its seeded
``random.Random``. Every request is recorded in ``proxy.seen`` with the rule
that fired, so a test can check its fault was injected.

``proxy.link(bytes_per_second)`` makes the whole proxy a slow office link, apart
from any rule: request bodies are read from the agent and answers sent to it in
slices paced by one clock shared by every connection, so parallel transfers
share the rate as they would share a real link (``link(None)`` lifts it).

``proxy.link_profile(LinkProfile(...))`` makes it a whole office link (issue 18)::

    proxy.link_profile(OFFICE_LINK)   # 15 ms each way, 100 Mbit/s, no resets
    proxy.link_profile(LinkProfile(latency=0.015, bytes_per_second=12_500_000,
                                   reset_probability=0.05, seed=3))
    proxy.link_stats                  # holds, peak of simultaneous holds, resets
    proxy.link_profile(None)          # loopback again

- ``latency``: each request is held that long once it has arrived, before it is
  forwarded (a new connection's first request one round trip more: the TCP
  handshake), and each answer is held that long before it is sent back. Every
  connection holds on its own thread, so parallel requests wait side by side,
  never one after another; ``link_stats.peak_held`` says how many were held at once.
- ``bytes_per_second``: the shared clock of ``link`` above (None: no cap).
- ``reset_probability``: after the inbound hold, a request no rule fired on is
  reset with that probability, drawn from ``random.Random(seed)``; the store never
  sees it (as ``RESET_BEFORE``). It is recorded in ``seen`` with rule ``"link"``.

``proxy.clock_offset = 600`` moves the ``Date`` of every answer 600 s ahead (a
store whose clock runs ahead of this machine's; negative: behind).

Requests are relayed byte for byte (headers included), except that ``Expect``
is dropped (the proxy already said 100 Continue); SigV4 does not sign it.
Threads are named ``pdagent-proxy-*``, so the thread-leak check sees them.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate, parsedate_to_datetime
from typing import IO, Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "LINK_RULE",
    "LOSE_ANSWER",
    "OFFICE_LINK",
    "RESET_BEFORE",
    "Action",
    "CutBody",
    "Delay",
    "FaultProxy",
    "LinkProfile",
    "LinkStats",
    "LoseAnswer",
    "ResetBefore",
    "Rule",
    "Seen",
    "Status",
    "Throttle",
]

_MAX_HEAD = 64 * 1024
_UPSTREAM_TIMEOUT = 60.0
_RECORDED_HEADERS = (
    "content-length",
    "transfer-encoding",
    "expect",
    "if-match",
    "if-none-match",
    "x-amz-copy-source",
    "x-amz-copy-source-if-match",
    "content-encoding",
)
_STATUS_TEXT = {
    429: ("Too Many Requests", "SlowDown", "Please reduce your request rate."),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error."),
    501: ("Not Implemented", "NotImplemented", "A header you provided is not implemented."),
    503: ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class LoseAnswer:
    """Forward, let the store apply it, then hang up without replying."""

    name: Literal["lose_answer"] = "lose_answer"


@dataclass(frozen=True)
class ResetBefore:
    """Reset the client connection; the store never sees the request."""

    name: Literal["reset_before"] = "reset_before"


@dataclass(frozen=True)
class Delay:
    """Hold the request ``seconds`` (or until ``Rule.release``), then deliver it late."""

    seconds: float
    name: Literal["delay"] = "delay"


@dataclass(frozen=True)
class Status:
    """Answer ``code`` with an S3 error body instead of forwarding (``s3_code`` overrides
    the error code the body names, e.g. ``ConditionalRequestConflict`` for a 409)."""

    code: int
    s3_code: str | None = None
    name: Literal["status"] = "status"


@dataclass(frozen=True)
class Throttle:
    """Relay the store's answer to the client at ``bytes_per_second``."""

    bytes_per_second: int
    name: Literal["throttle"] = "throttle"


@dataclass(frozen=True)
class CutBody:
    """Relay the answer's head and ``keep`` bytes of its body, then close (or reset)."""

    keep: int
    reset: bool = False
    name: Literal["cut_body"] = "cut_body"


Action = LoseAnswer | ResetBefore | Delay | Status | Throttle | CutBody
LOSE_ANSWER = LoseAnswer()
RESET_BEFORE = ResetBefore()


@dataclass(frozen=True)
class LinkProfile:
    """A network link between the agent and the store (see the module docstring)."""

    latency: float = 0.0  # seconds, each way
    bytes_per_second: int | None = None  # shared by every connection; None: no cap
    reset_probability: float = 0.0  # per request, before it is forwarded
    seed: int = 0  # of the resets' random.Random

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency}")
        if self.bytes_per_second is not None and self.bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be > 0, got {self.bytes_per_second}")
        if not 0.0 <= self.reset_probability <= 1.0:
            raise ValueError(f"reset_probability must be in [0, 1], got {self.reset_probability}")


OFFICE_LINK = LinkProfile(latency=0.015, bytes_per_second=12_500_000)
"""An office's link to the store: 15 ms each way (a 30 ms round trip), 100 Mbit/s."""

LINK_RULE = "link"
"""``Seen.rule`` of a request the link profile reset."""


@dataclass(frozen=True)
class LinkStats:
    """What the link profile did so far (``FaultProxy.link_stats``)."""

    held_requests: int  # requests held ``latency`` before forwarding (or resetting)
    held_answers: int  # answers held ``latency`` before sending back
    peak_held: int  # the most holds in progress at one moment, over every connection
    resets: int  # requests the link reset


@dataclass(eq=False)
class Rule:
    """When a fault fires, and which one (see the module docstring)."""

    action: Action
    method: str | None = None
    path: str | None = None
    query: tuple[str, ...] = ()
    no_query: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    no_headers: tuple[str, ...] = ()
    body: bytes | None = None
    skip: int = 0
    times: int | None = 1
    every: int | None = None
    probability: float | None = None
    rng: random.Random | None = None
    name: str = ""
    matched: int = 0
    fired: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    delivered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.probability is not None and self.rng is None:
            raise ValueError("a probability rule needs a seeded rng (random.Random(seed))")
        if not self.name:
            self.name = f"{self.action.name}:{self.method or '*'}:{self.path or '*'}"
        self._path_re = re.compile(self.path) if self.path is not None else None
        self._body_re = re.compile(self.body, re.DOTALL) if self.body is not None else None

    def release(self) -> None:
        """Deliver a held (``Delay``) request now."""
        self.released.set()

    def matches(self, request: _Request) -> bool:
        """Whether the request is one this rule is about (whether it fires is separate)."""
        if self.method is not None and request.method != self.method.upper():
            return False
        if self._path_re is not None and not self._path_re.search(request.path):
            return False
        if any(q not in request.query for q in self.query):
            return False
        if any(q in request.query for q in self.no_query):
            return False
        if any(h.lower() not in request.header_names for h in self.headers):
            return False
        if any(h.lower() in request.header_names for h in self.no_headers):
            return False
        return self._body_re is None or bool(self._body_re.search(request.body))

    def decide(self) -> bool:
        """Count one match and say whether the fault fires on it (caller holds the lock)."""
        self.matched += 1
        n = self.matched - self.skip
        if n <= 0 or (self.times is not None and self.fired >= self.times):
            return False
        if self.every is not None and n % self.every != 0:
            return False
        if self.probability is not None:
            assert self.rng is not None
            if self.rng.random() >= self.probability:
                return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    rule: str | None
    action: str | None
    at: float
    status: int | None  # the store's answer (also when it was lost); None if not forwarded yet


@dataclass
class _Request:
    method: str
    target: str
    head: bytes  # request line + headers as sent upstream (Expect removed), CRLFCRLF ended
    raw_body: bytes  # as received (chunked framing kept)
    body: bytes  # decoded
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    header_names: set[str]
    close: bool

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class _ClosedError(Exception):
    """The peer closed the connection."""


def _read_head(stream: IO[bytes]) -> bytes:
    lines: list[bytes] = []
    total = 0
    while True:
        line = stream.readline(_MAX_HEAD)
        if not line:
            if lines:
                raise _ClosedError("connection closed inside a message head")
            raise _ClosedError("connection closed")
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerated stray CRLF between messages
        lines.append(line)
        total += len(line)
        if total > _MAX_HEAD:
            raise _ClosedError("message head too large")
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    text = head.decode("latin-1")
    first, *rest = text.split("\r\n")
    headers = []
    for line in rest:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return first, headers


class _Link:
    """One pacing clock for every connection: a slice may move when the link is free."""

    def __init__(self) -> None:
        self.rate: int | None = None
        self._lock = threading.Lock()
        self._free_at = 0.0

    def wait_for(self, size: int, stopping: threading.Event) -> None:
        """Block until ``size`` bytes may cross the link (at once if it is not slow)."""
        rate = self.rate
        if rate is None or size <= 0:
            return
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size / rate
        while (pause := start - time.monotonic()) > 0:
            if stopping.wait(min(pause, 0.05)):
                raise _ClosedError("proxy stopping")

    def slice(self) -> int:
        """How many bytes move at a time: a twentieth of a second's worth."""
        return max(1, (self.rate or 1 << 30) // 20)


def _read_exact(
    stream: IO[bytes], n: int, link: _Link | None = None, stopping: threading.Event | None = None
) -> bytes:
    if link is None or link.rate is None or stopping is None:
        data = stream.read(n)
    else:
        parts: list[bytes] = []
        got = 0
        while got < n:
            link.wait_for(min(link.slice(), n - got), stopping)
            part = stream.read(min(link.slice(), n - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
    if len(data) != n:
        raise _ClosedError(f"connection closed after {len(data)} of {n} body bytes")
    return data


def _read_chunked(
    stream: IO[bytes], link: _Link | None = None, stopping: threading.Event | None = None
) -> tuple[bytes, bytes]:
    """A chunked body: (raw bytes with framing and trailers, decoded bytes), paced by ``link``."""
    raw: list[bytes] = []
    decoded: list[bytes] = []
    while True:
        size_line = stream.readline(_MAX_HEAD)
        if not size_line:
            raise _ClosedError("connection closed inside a chunked body")
        raw.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                trailer = stream.readline(_MAX_HEAD)
                if not trailer:
                    raise _ClosedError("connection closed inside chunk trailers")
                raw.append(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return b"".join(raw), b"".join(decoded)
        chunk = _read_exact(stream, size + 2, link, stopping)
        raw.append(chunk)
        decoded.append(chunk[:size])


def _has_token(headers: list[tuple[str, str]], name: str, token: str) -> bool:
    return any(
        k.lower() == name and token in (p.strip().lower() for p in v.split(",")) for k, v in headers
    )


class FaultProxy:
    """The proxy: ``start()``, add/remove rules at any time, ``stop()``."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        # A timeout lets the accept loop see ``_stopping`` (closing does not wake accept).
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.endpoint = f"http://{host}:{self.port}"
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._link = _Link()
        self._profile: LinkProfile | None = None
        self._reset_rng = random.Random(0)
        self._holding = 0
        self._late = 0
        self._stats = LinkStats(held_requests=0, held_answers=0, peak_held=0, resets=0)
        self._ids = itertools.count(1)
        self.clock_offset = 0.0
        """Seconds added to the ``Date`` of every answer (the store's clock, as told)."""
        self._accepter = threading.Thread(
            target=self._accept_loop, name="pdagent-proxy-accept", daemon=True
        )

    # ------------------------------------------------------------------ API

    def start(self) -> FaultProxy:
        """Accept connections in a background thread."""
        self._accepter.start()
        return self

    def link(self, bytes_per_second: int | None) -> None:
        """Pace every body in both directions to ``bytes_per_second`` overall (None: off)."""
        self._link.rate = bytes_per_second

    def link_profile(self, profile: LinkProfile | None) -> None:
        """Make the proxy the link ``profile`` describes (None: loopback again).

        Sets ``link(profile.bytes_per_second)``, starts the resets' random.Random
        from ``profile.seed`` and zeroes ``link_stats``.
        """
        with self._lock:
            self._profile = profile
            self._reset_rng = random.Random(profile.seed if profile is not None else 0)
            self._stats = LinkStats(held_requests=0, held_answers=0, peak_held=0, resets=0)
        self.link(profile.bytes_per_second if profile is not None else None)

    @property
    def link_stats(self) -> LinkStats:
        """What the link profile did since it was set."""
        with self._lock:
            return self._stats

    def add(self, rule: Rule) -> Rule:
        """Add a rule (after the existing ones); returns it for ``fired``/``release``."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Remove a rule; a request it holds stays held until released or ``stop``."""
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def seen(self) -> list[Seen]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._seen)

    def faults(self) -> list[Seen]:
        """The requests on which a rule fired."""
        return [s for s in self.seen if s.rule is not None]

    def stop(self) -> None:
        """Close every connection, drop held requests, and join every thread."""
        self._stopping.set()  # held requests see it within 50 ms and are dropped
        if self._accepter.is_alive():
            self._accepter.join(timeout=10)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------- machinery

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(conn)
            worker = threading.Thread(
                target=self._serve,
                args=(conn,),
                name=f"pdagent-proxy-conn-{next(self._ids)}",
                daemon=True,
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(worker)
            worker.start()

    def _serve(self, client: socket.socket) -> None:
        conn = _Connection(client, self)
        try:
            while not self._stopping.is_set() and conn.handle_one():
                pass
        except (_ClosedError, OSError, ValueError):
            return
        finally:
            conn.close()

    @property
    def late_in_flight(self) -> int:
        """Requests held by a ``Delay`` rule and not yet delivered (or dropped at stop)."""
        with self._lock:
            return self._late

    def _deliver_late(self, request: _Request, action: Delay, rule: Rule) -> None:
        """Hold, then deliver on a fresh connection; the client's own has timed out."""
        with self._lock:
            self._late += 1
        try:
            self._deliver_late_now(request, action, rule)
        finally:
            with self._lock:
                self._late -= 1

    def _deliver_late_now(self, request: _Request, action: Delay, rule: Rule) -> None:
        deadline = time.monotonic() + action.seconds
        while not rule.released.wait(0.05) and time.monotonic() < deadline:
            if self._stopping.is_set():
                return
        if self._stopping.is_set():
            return
        late = _Upstream(self.upstream, self._track, self._untrack)
        try:
            late.exchange(request)
        finally:
            late.close()
        rule.delivered.set()

    def _hold(self, seconds: float, *, answer: bool) -> None:
        """Hold this connection's request or answer ``seconds`` (its own thread sleeps)."""
        with self._lock:
            self._holding += 1
            stats = self._stats
            self._stats = replace(
                stats,
                held_requests=stats.held_requests + (0 if answer else 1),
                held_answers=stats.held_answers + (1 if answer else 0),
                peak_held=max(stats.peak_held, self._holding),
            )
        try:
            if self._stopping.wait(seconds):
                raise _ClosedError("proxy stopping")
        finally:
            with self._lock:
                self._holding -= 1

    def _hold_request(self, *, new_connection: bool) -> None:
        """The way in: one-way latency (plus the handshake's round trip on a new connection)."""
        profile = self._profile
        if profile is not None and profile.latency > 0:
            self._hold(profile.latency * (3 if new_connection else 1), answer=False)

    def _hold_answer(self) -> None:
        """The way back: one-way latency."""
        profile = self._profile
        if profile is not None and profile.latency > 0:
            self._hold(profile.latency, answer=True)

    def _link_resets(self) -> bool:
        """Whether the link profile resets this request (one draw per request)."""
        with self._lock:
            profile = self._profile
            if profile is None or profile.reset_probability <= 0:
                return False
            if self._reset_rng.random() >= profile.reset_probability:
                return False
            self._stats = replace(self._stats, resets=self._stats.resets + 1)
            return True

    def _read_request(self, client: socket.socket, stream: IO[bytes]) -> _Request:
        head = _read_head(stream)
        first, headers = _parse_headers(head)
        method, target, _version = first.split(" ", 2)
        lower = {k.lower() for k, _v in headers}
        if _has_token(headers, "expect", "100-continue"):
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if _has_token(headers, "transfer-encoding", "chunked"):
            raw, body = _read_chunked(stream, self._link, self._stopping)
        else:
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            raw = body = _read_exact(stream, length, self._link, self._stopping)
        forwarded = [(k, v) for k, v in headers if k.lower() != "expect"]
        out_head = (
            first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in forwarded) + "\r\n"
        ).encode("latin-1")
        split = urlsplit(target)
        return _Request(
            method=method.upper(),
            target=target,
            head=out_head,
            raw_body=raw,
            body=body,
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            header_names=lower,
            close=_has_token(headers, "connection", "close"),
        )

    def _choose(self, request: _Request) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(request) and rule.decide():
                    return rule
        return None

    def _record(
        self, request: _Request, rule: Rule | None, status: int | None, *, link_reset: bool = False
    ) -> None:
        if link_reset:
            rule_name: str | None = LINK_RULE
            action_name: str | None = RESET_BEFORE.name
        else:
            rule_name = rule.name if rule is not None else None
            action_name = rule.action.name if rule is not None else None
        seen = Seen(
            method=request.method,
            path=request.path,
            query=request.query,
            headers={
                name: value
                for name in _RECORDED_HEADERS
                if (value := request.header(name)) is not None
            },
            rule=rule_name,
            action=action_name,
            at=time.monotonic(),
            status=status,
        )
        with self._lock:
            self._seen.append(seen)


def _shift_date(answer: bytes, seconds: float) -> bytes:
    """``answer`` with its ``Date`` header ``seconds`` later (the body untouched)."""
    head_end = answer.find(b"\r\n\r\n")
    if head_end < 0:
        return answer

    def shifted(match: re.Match[bytes]) -> bytes:
        when = parsedate_to_datetime(match[2].decode("latin-1")).timestamp() + seconds
        return match[1] + formatdate(when, usegmt=True).encode()

    head = re.sub(rb"(?im)^(date:[ \t]*)([^\r\n]+)", shifted, answer[:head_end])
    return head + answer[head_end:]


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, proxy: FaultProxy) -> None:
        self.client = client
        self.proxy = proxy
        self.stream = client.makefile("rb")
        self.upstream: _Upstream | None = None
        self.served = 0

    def handle_one(self) -> bool:
        """Serve one request; False when the client connection is done."""
        proxy = self.proxy
        request = proxy._read_request(self.client, self.stream)
        self.served += 1
        proxy._hold_request(new_connection=self.served == 1)
        rule = proxy._choose(request)
        action = rule.action if rule is not None else None
        if action is None and proxy._link_resets():
            proxy._record(request, None, None, link_reset=True)
            self._reset()
            return False
        if isinstance(action, ResetBefore):
            proxy._record(request, rule, None)
            self._reset()
            return False
        if isinstance(action, Status):
            proxy._record(request, rule, None)
            proxy._hold_answer()
            self.client.sendall(_error_response(action.code, request, action.s3_code))
            return not request.close
        if isinstance(action, Delay):
            assert rule is not None
            proxy._record(request, rule, None)
            proxy._deliver_late(request, action, rule)
            return False
        if self.upstream is None:
            self.upstream = _Upstream(proxy.upstream, proxy._track, proxy._untrack)
        answer, upstream_close = self.upstream.exchange(request)
        proxy._record(request, rule, int(answer.split(b" ", 2)[1]))
        if proxy.clock_offset:
            answer = _shift_date(answer, proxy.clock_offset)
        if upstream_close:
            self.upstream.close()
            self.upstream = None
        if isinstance(action, LoseAnswer):
            return False  # the store applied it; the client hears nothing
        proxy._hold_answer()
        if isinstance(action, CutBody):
            head_end = answer.find(b"\r\n\r\n") + 4
            self.client.sendall(answer[: head_end + action.keep])
            if action.reset:
                self._reset()
            return False
        self._send(answer, action)
        return not (request.close or upstream_close)

    def _send(self, answer: bytes, action: Action | None) -> None:
        """The store's answer to the client: throttled, paced by the link, or at once."""
        proxy = self.proxy
        if isinstance(action, Throttle):
            self._send_slowly(answer, action.bytes_per_second)
        elif proxy._link.rate is not None:
            for offset in range(0, len(answer), proxy._link.slice()):
                piece = answer[offset : offset + proxy._link.slice()]
                proxy._link.wait_for(len(piece), proxy._stopping)
                self.client.sendall(piece)
        else:
            self.client.sendall(answer)

    def _reset(self) -> None:
        """Close with an RST (linger 0) instead of a FIN."""
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _send_slowly(self, answer: bytes, rate: int) -> None:
        """Send in slices of a tenth of a second's worth, keeping to ``rate`` overall."""
        step = max(1, rate // 10)
        started = time.monotonic()
        for offset in range(0, len(answer), step):
            if self.proxy._stopping.is_set():
                raise _ClosedError("proxy stopping")
            self.client.sendall(answer[offset : offset + step])
            due = started + (offset + step) / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.close()
        if self.upstream is not None:
            self.upstream.close()
        self.proxy._untrack(self.client)


class _Upstream:
    """One keep-alive connection to the upstream server."""

    def __init__(
        self,
        address: tuple[str, int],
        track: Callable[[socket.socket], None],
        untrack: Callable[[socket.socket], None],
    ) -> None:
        self.address = address
        self._track, self._untrack = track, untrack
        self.sock: socket.socket | None = None
        self.stream: IO[bytes] | None = None
        self.used = False

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=_UPSTREAM_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(self.sock)
        self.stream = self.sock.makefile("rb")
        self.used = False

    def exchange(self, request: _Request) -> tuple[bytes, bool]:
        """Send the request, read the whole answer: (raw answer, upstream will close)."""
        for attempt in (1, 2):
            if self.sock is None:
                self._connect()
            assert self.sock is not None and self.stream is not None
            reused = self.used
            try:
                self.sock.sendall(request.head + request.raw_body)
                self.used = True
                return _read_response(self.stream, head_only=request.method == "HEAD")
            except (_ClosedError, ConnectionError):
                # A kept-alive connection the server closed meanwhile: once more, fresh.
                self.close()
                if not reused or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None
        if self.sock is not None:
            self._untrack(self.sock)
            self.sock = None


def _read_response(stream: IO[bytes], *, head_only: bool) -> tuple[bytes, bool]:
    while True:
        head = _read_head(stream)
        first, headers = _parse_headers(head)
        code = int(first.split(" ", 2)[1])
        if 100 <= code < 200:
            continue  # interim answers (we never forward Expect, but be tolerant)
        break
    close = _has_token(headers, "connection", "close")
    if head_only or code in (204, 304):
        return head, close
    if _has_token(headers, "transfer-encoding", "chunked"):
        raw, _body = _read_chunked(stream)
        return head + raw, close
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
    if length is None:
        return head + stream.read(), True
    return head + _read_exact(stream, length), close


def _error_response(code: int, request: _Request, named: str | None = None) -> bytes:
    reason, s3_code, message = _STATUS_TEXT.get(code, ("Error", "InternalError", "Injected."))
    s3_code = named or s3_code
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{s3_code}</Code><Message>{message} (injected by the test proxy)"
        f"</Message><Resource>{request.path}</Resource>"
        "<RequestId>pdagent-proxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: pdagent-proxy\r\n"
        + ("Retry-After: 0\r\n" if code in (429, 503) else "")
        + ("Connection: close\r\n" if request.close else "")
        + "\r\n"
    ).encode()
    return head if request.method == "HEAD" else head + body
